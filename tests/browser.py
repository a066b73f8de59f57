"""Headless Chromium, driven over the DevTools protocol: open a page, and tell what a person
would see (a screenshot, the text of marked elements) and what the page did (console
messages, script errors, every request it made).

    with Chromium() as browser:
        page = browser.open("file:///tmp/report.html")
        page.requests, page.console, page.screenshot, page.marks("data-metric")

Chromium runs as Debian's `chromium` package installs it (`.ci/run` installs it), as root
too: with --no-sandbox, a fresh profile, and no background networking (its own calls home
would count as the page's requests, and this machine's network refuses them).
"""

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--hide-scrollbars", "--window-size=1280,900", "--remote-debugging-port=0",
         "--remote-allow-origins=*"]
TIMEOUT = 60.0


@dataclass
class Page:
    url: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    console: list[str] = field(default_factory=list)  # console errors and warnings
    errors: list[str] = field(default_factory=list)  # uncaught script errors, failed loads
    screenshot: bytes = b""  # PNG of the whole page
    text: str = ""  # what the page shows, as text
    images: list[dict] = field(default_factory=list)  # each <img>: alt, loaded, width, height
    _marks: dict[str, dict[str, str]] = field(default_factory=dict)

    def marks(self, attribute: str) -> dict[str, str]:
        """The text of each element carrying `attribute`, by its value."""
        return self._marks.get(attribute, {})


class Chromium:
    def __init__(self):
        if CHROMIUM is None:
            raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="trainpipe-chromium-")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.endpoint = self._endpoint()
        import websocket

        self.ws = websocket.create_connection(self.endpoint, timeout=TIMEOUT,
                                              suppress_origin=True)
        self._id = 0

    def _endpoint(self) -> str:
        deadline = time.monotonic() + TIMEOUT
        seen = []
        for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/..."
            seen.append(line)
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                return found[1]
            if time.monotonic() > deadline:
                break
        raise RuntimeError("chromium did not start: " + "".join(seen[-20:]))

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, session: str | None = None, events: list | None = None,
             **params) -> dict:
        """Call a DevTools method and return its result; the events that arrive meanwhile
        go to `events`."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if events is not None and "method" in reply:
                events.append(reply)
        raise TimeoutError(method)

    def open(self, url: str, width: int = 1280) -> Page:
        """Load `url` in a new tab, wait for it (and its images) to load, and read it."""
        events: list[dict] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session, events)
        self.send("Emulation.setDeviceMetricsOverride", session, events, width=width,
                  height=900, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", session, events, url=url)
        deadline = time.monotonic() + TIMEOUT
        while not any(e["method"] == "Page.loadEventFired" for e in events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load")
            message = json.loads(self.ws.recv())
            if "method" in message:
                events.append(message)
        page = Page(url)
        metrics = self.send("Page.getLayoutMetrics", session, events)["cssContentSize"]
        shot = self.send("Page.captureScreenshot", session, events, format="png",
                         captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": metrics["width"],
                               "height": metrics["height"], "scale": 1})
        page.screenshot = base64.b64decode(shot["data"])
        read = self.send("Runtime.evaluate", session, events, returnByValue=True,
                         expression=READ_PAGE)["result"]["value"]
        page.text, page.images, page._marks = read["text"], read["images"], read["marks"]
        self.send("Target.closeTarget", events=events, targetId=target)
        for event in events:
            _note(page, event)
        return page


# What the test reads from the page once it has loaded (the page itself has no script).
READ_PAGE = """(() => {
  const marks = {};
  for (const el of document.querySelectorAll('*')) {
    for (const a of el.attributes) {
      if (a.name.startsWith('data-')) {
        (marks[a.name] = marks[a.name] || {})[a.value] = el.textContent.trim();
      }
    }
  }
  const images = [...document.images].map(i => ({alt: i.alt, loaded: i.complete,
    width: i.naturalWidth, height: i.naturalHeight}));
  return {text: document.body.innerText, images, marks};
})()"""


def _note(page: Page, event: dict) -> None:
    method, params = event["method"], event.get("params", {})
    if method == "Network.requestWillBeSent":
        page.requests.append(params["request"]["url"])
    elif method == "Network.loadingFailed":
        page.errors.append(f"failed to load: {params.get('errorText')}")
    elif method == "Runtime.exceptionThrown":
        page.errors.append(json.dumps(params["exceptionDetails"])[:500])
    elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning",
                                                                      "assert"):
        page.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                     for a in params["args"]))
    elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
        entry = params["entry"]
        page.console.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")


def outside(requests: list[str]) -> list[str]:
    """The requests that leave the page's own file: anything but file: and data: URLs."""
    return [u for u in requests if not u.startswith(("file:", "data:"))]


if __name__ == "__main__":  # python tests/browser.py PAGE.html SCREENSHOT.png
    import sys

    with Chromium() as browser:
        shown = browser.open(f"file://{os.path.abspath(sys.argv[1])}", width=1200)
    with open(sys.argv[2], "wb") as f:
        f.write(shown.screenshot)
    print(f"requests outside: {outside(shown.requests)}; console: {shown.console}; "
          f"errors: {shown.errors}")
