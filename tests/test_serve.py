"""`trainpipe serve`: MLflow's scoring server for a model, over real HTTP on 127.0.0.1."""

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import FAST, copy_store, trainpipe
from trainpipe import demo, serving, supervise

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

READY = "Ctrl-C stops it."


@pytest.fixture(scope="module")
def model(tmp_path_factory, empty_store) -> dict:
    folder = tmp_path_factory.mktemp("served")
    copy_store(empty_store, folder)
    raw = folder / "lake/raw/hotel_bookings"
    raw.mkdir(parents=True)
    demo.hotel_bookings(rows=3000, seed=1).to_csv(raw / "train.csv", index=False)
    result = trainpipe("run", *FAST, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    store = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    parent = mlflow.search_runs(experiment_names=["trainpipe"],
                                filter_string="tags.`trainpipe.kind` = 'pipeline'").iloc[0]
    return {"folder": folder, "store": store, "uri": parent["tags.trainpipe.model_uri"]}


@dataclass
class Serving:
    proc: subprocess.Popen
    url: str
    cwd: Path
    lines: list[str] = field(default_factory=list)  # what the command printed so far

    def output(self) -> str:
        return "\n".join(self.lines)


def start_serve(model: dict, *args: str, cwd: Path, timeout: float = 180) -> Serving:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([sys.executable, "-m", "trainpipe", "serve", "--model",
                             model["uri"], f"tracking.uri={model['store']}", *args],
                            cwd=cwd, env=env | {"COLUMNS": "200"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # killed as a group if it will not stop
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    serving = Serving(proc, "", cwd)
    deadline = time.monotonic() + timeout
    while READY not in serving.lines:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            proc.wait()
            return serving
        serving.lines.append(line.rstrip("\n"))
    [serving.url] = [found[1] for line in serving.lines
                     if (found := re.search(r"^trainpipe serve .* at (http://\S+) ", line))]
    assert serving.lines[0].startswith("starting") and serving.lines[1].startswith(
        "trainpipe serve"), serving.output()  # nothing of MLflow's between

    def drain():
        while (line := lines.get()) is not None:
            serving.lines.append(line.rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()
    return serving


def stop_serve(serving: Serving, sig=signal.SIGINT) -> int:
    if serving.proc.poll() is None:
        serving.proc.send_signal(sig)
    try:
        return serving.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # the test fails; no server is left running after it
        os.killpg(serving.proc.pid, signal.SIGKILL)
        serving.proc.wait()
        raise


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    port = supervise.free_port()
    serving = start_serve(model, "--port", str(port), cwd=tmp_path_factory.mktemp("serve"))
    assert serving.url == f"http://127.0.0.1:{port}", serving.output()
    yield serving
    stop_serve(serving)


def post(url: str, body: bytes | str, content_type: str = "application/json"):
    """(status, parsed JSON or text) of a POST to /invocations."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"{url}/invocations", data=data, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def rows_to_score(n: int = 20) -> pd.DataFrame:
    df = demo.hotel_bookings(rows=n, seed=11).drop(columns=["booking_status"])
    return df.drop(columns=["id"])


def ping(url: str) -> int:
    with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
        return response.status


def test_ping_and_every_body_format_predict_as_trainpipe_predict(served, model, tmp_path):
    assert ping(served.url) == 200
    rows = rows_to_score()
    split = json.loads(rows.to_json(orient="split", index=False))
    bodies = {
        "split": (json.dumps({"dataframe_split": split}), "application/json"),
        "records": (json.dumps({"dataframe_records": rows.to_dict(orient="records")}),
                    "application/json"),
        "csv": (rows.to_csv(index=False), "text/csv"),
    }
    answers = {}
    for name, (body, content_type) in bodies.items():
        status, answer = post(served.url, body, content_type)
        assert status == 200, (name, answer)
        answers[name] = answer["predictions"]
    assert answers["split"] == answers["records"] == answers["csv"]

    rows.assign(id=range(len(rows))).to_csv(tmp_path / "rows.csv", index=False)
    result = trainpipe("predict", "--model", model["uri"], "--input", str(tmp_path / "rows.csv"),
                       "--output", str(tmp_path / "p.csv"), f"tracking.uri={model['store']}",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert answers["split"] == list(pd.read_csv(tmp_path / "p.csv")["prediction"])


@pytest.mark.parametrize("case,body,content_type,words", [
    ("missing column", "missing", "application/json", "Model is missing inputs ['lead_time']"),
    ("string in a numeric column", "string", "application/json",
     "Failed to convert column lead_time to type 'int64'"),
    ("not JSON", "{not json", "application/json", "Ensure that input is a valid JSON"),
    ("empty body", "", "application/json", "Ensure that input is a valid JSON"),
    ("empty CSV body", "", "text/csv", "No columns to parse from file"),
    ("no known key", '{"rows": []}', "application/json",
     "The input must be a JSON dictionary with exactly one of the input fields"),
    ("unknown content type", "a=1", "application/x-www-form-urlencoded",
     "This predictor only supports the following content types"),
])
def test_a_bad_payload_is_a_4xx_naming_the_problem(served, case, body, content_type, words):
    rows = rows_to_score(2)
    if body == "missing":
        body = json.dumps({"dataframe_records": rows.drop(columns=["lead_time"]).to_dict(
            orient="records")})
    elif body == "string":
        records = rows.to_dict(orient="records")
        records[0]["lead_time"] = "soon"
        body = json.dumps({"dataframe_records": records})
    status, answer = post(served.url, body, content_type)
    assert 400 <= status < 500, (case, status, answer)
    message = answer["message"] if isinstance(answer, dict) else answer
    assert words in message, (case, message)
    # and the server goes on answering
    assert ping(served.url) == 200
    good = json.dumps({"dataframe_records": rows.to_dict(orient="records")})
    assert post(served.url, good)[0] == 200


def test_a_post_without_content_type_is_a_4xx(served):
    """MLflow's scoring app (3.17) answers 500 here; trainpipe's answers 415 naming it."""
    import http.client

    host, port = served.url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/invocations", body=b"")  # no Content-Type header at all
    answer = connection.getresponse()
    assert answer.status == 415
    assert "no Content-Type header" in json.loads(answer.read())["message"]
    assert ping(served.url) == 200


def test_the_printed_curl_example_scores_a_row(served):
    [line] = [line for line in served.lines if line.lstrip().startswith("predict")]
    command = line.split("predict", 1)[1].strip()
    assert command.startswith(f"curl -s {served.url}/invocations")
    body = shlex.split(command)[-1]

    def not_json(constant):
        raise AssertionError(f"{constant} is not JSON: {body}")

    payload = json.loads(body, parse_constant=not_json)  # strict JSON: missing is null
    row = payload["dataframe_split"]["data"][0]
    row[next(i for i, v in enumerate(row) if isinstance(v, float))] = None
    status, answer = post(served.url, json.dumps(payload))  # and the server takes a null
    assert status == 200 and len(answer["predictions"]) == 1, answer
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["predictions"]) == 1


def test_the_curl_example_writes_a_missing_value_as_null(tmp_path):
    """MLflow's serving_input_example.json writes a missing value as NaN, which is not JSON."""
    (tmp_path / "serving_input_example.json").write_text(
        '{"dataframe_split": {"columns": ["a", "b"], "data": [[NaN, 1.5], [2.0, 3.0]]}}')
    model = serving.Model(uri=str(tmp_path), version=str(tmp_path), flavors=("sklearn",))
    assert serving._example_row(model) == {"columns": ["a", "b"], "data": [[None, 1.5]]}


def test_it_listens_on_loopback_only(served):
    port = int(served.url.rsplit(":", 1)[1])
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            listening.append(address)
    assert listening == ["0100007F"]  # 127.0.0.1


def test_extra_columns_warn_in_the_server_log_not_the_terminal(served):
    rows = rows_to_score(2).assign(id=[1, 2])
    assert post(served.url, json.dumps({"dataframe_records": rows.to_dict(
        orient="records")}))[0] == 200
    log = served.cwd / next(line for line in served.lines
                            if line.lstrip().startswith("log")).split()[-1]
    deadline = time.monotonic() + 10
    while "Found extra inputs" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Found extra inputs" in log.read_text()
    assert "Found extra inputs" not in served.output()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_server_cleanly(model, tmp_path, sig):
    port = supervise.free_port()
    serving = start_serve(model, "--port", str(port), cwd=tmp_path)
    assert serving.url, serving.output()
    pid = int(re.search(r"pid (\d+)", serving.lines[1])[1])
    assert ping(serving.url) == 200
    assert stop_serve(serving, sig) == 0, serving.output()
    assert "stopped the model server" in serving.output()
    assert "Traceback" not in serving.output()
    assert not supervise.alive(supervise.Process(pid))
    assert supervise.port_free(port)


def test_a_missing_model_or_a_busy_port_is_named(model, served, tmp_path):
    env = {"COLUMNS": "200"}
    missing = trainpipe("serve", "--model", "models:/nobody@champion", "--port",
                        str(supervise.free_port()), f"tracking.uri={model['store']}",
                        cwd=tmp_path, env=env, timeout=120)
    assert missing.returncode == 2
    assert ("error: --model models:/nobody@champion: no such model in the tracking "
            "store") in " ".join(missing.stderr.split())
    busy = served.url.rsplit(":", 1)[1]
    taken = trainpipe("serve", "--model", model["uri"], "--port", busy,
                      f"tracking.uri={model['store']}", cwd=tmp_path, env=env, timeout=120)
    assert taken.returncode == 2
    assert f"error: port {busy} is in use; choose another with --port" in taken.stderr
