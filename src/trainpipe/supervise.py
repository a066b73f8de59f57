"""Process supervision for the servers trainpipe starts (`stack`, `serve`), in one place.

    process = start(cmd, env=env, cwd=folder, log=folder / "server.log")   # detached
    wait_until_healthy(process, "http://127.0.0.1:5000/health", 120, "the server")
    alive(process)          # still this process? (pid + start time: pids get reused)
    stop(process, 30)       # SIGTERM to its process group, SIGKILL after the timeout

A started process runs in a session and process group of its own (Ctrl-C in the terminal
that started it does not reach it, and `stop` ends its workers with it), with stdin closed,
stdout and stderr appended to its log, and exactly the environment it is given.

Where a process is recorded: a JSON state file, replaced atomically (`write_state`) and
changed under an exclusive file lock (`locked`). Ports: `free_port`, `port_free`.
`check_tracking_server` tells, within seconds, whether an MLflow tracking server answers.
Linux only (start times come from /proc).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from trainpipe.errors import ConfigError, TrainpipeError
from trainpipe.redaction import redact_text, redact_uri


class ServiceError(TrainpipeError):
    """A supervised process cannot be started, does not become healthy, or its state file
    is unreadable: the message says which and why, with the last lines of its log."""

    exit_code = 2


class TrackingUnreachable(TrainpipeError):
    """The MLflow tracking server does not answer."""

    exit_code = 2


@dataclass(frozen=True)
class Process:
    """A process as recorded: its pid, and its start time so that a reused pid is never
    taken for it (clock ticks after boot, /proc/PID/stat; None: unknown, the pid alone)."""

    pid: int
    started: int | None = None
    log: str | None = None  # where its output goes


# ------------------------------------------------------------------------------ lifecycle


def start(cmd: Sequence[str], *, env: Mapping[str, str], cwd: str | os.PathLike,
          log: str | os.PathLike, banner: str | None = None) -> Process:
    """Start `cmd` detached (own session and process group, stdin closed, output appended
    to `log`, preceded by a `banner` line) with exactly the environment `env`."""
    log = Path(log)
    try:
        with open(log, "ab") as out:
            if banner:
                out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {banner} ---\n".encode())
                out.flush()
            popen = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env),
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise ServiceError(f"cannot run {cmd[0]} ({exc.strerror or exc})") from None
    # It outlives this handle: its exit is seen by pid (alive, wait_until_healthy), and no
    # "subprocess still running" warning is due when the handle goes.
    popen.returncode = 0
    return Process(popen.pid, start_time(popen.pid), str(log))


def wait_until_healthy(process: Process, url: str, timeout: float, what: str) -> None:
    """Return once `url` answers 200; raise ServiceError, with the last lines of the
    process's log, when the process exits first or `timeout` seconds pass. The process is
    left as it is (the caller stops it)."""
    deadline = time.monotonic() + timeout
    while not answers(url):
        if not alive(process):
            code = exit_code(process)
            how = f" (code {code})" if code is not None else ""
            raise ServiceError(f"{what} exited{how} before it was healthy"
                               f"{log_tail(process.log)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} was not healthy within {timeout:.0f} s"
                               f"{log_tail(process.log)}")
        time.sleep(0.2)


def answers(url: str, timeout: float = 2.0) -> bool:
    """`url` answers HTTP 200 (a health endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def alive(process: Process) -> bool:
    """The process runs (not a zombie) and is the one recorded (same start time)."""
    stat = _stat(process.pid)
    if stat is None:
        return False
    state, started = stat
    if state == "Z":  # exited, not yet reaped: gone for all purposes
        return False
    return process.started is None or started == process.started


def exit_code(process: Process) -> int | None:
    """The exit code of a process this one started and that has exited (None: unknown)."""
    try:
        pid, status = os.waitpid(process.pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if pid else None


def stop(process: Process, timeout: float, group: bool = True) -> bool:
    """SIGTERM to the process's group (the server and its workers; group=False: the
    process alone), SIGKILL when it still runs after `timeout` seconds. Returns whether it
    was running. A pid now used by another process is left alone."""
    if not alive(process):
        exit_code(process)  # reap it, if it is our child
        return False
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exit_code(process)
        if not (_group_alive(process.pid) if group else alive(process)):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(process.pid, signal.SIGKILL)
    exit_code(process)
    return True


def start_time(pid: int | None) -> int | None:
    """When `pid` started (clock ticks after boot); None when there is no such process."""
    stat = _stat(pid) if pid else None
    return stat[1] if stat else None


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces: count fields after its closing ')'
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for killpg: look for a live member
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def log_tail(log: str | os.PathLike | None, lines: int = 15) -> str:
    """The last lines of a log, redacted, as a paragraph to append to a message."""
    if log is None:
        return ""
    try:
        with open(log, "rb") as f:  # the end only: a log may be large
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64_000))
            text = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    if not text:
        return ""
    return redact_text(f"\nlast lines of {log}:\n" + "\n".join(text))


# ---------------------------------------------------------------------------- state file


@contextlib.contextmanager
def locked(lock_file: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (made if missing): one writer at a time."""
    import fcntl

    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; {} when there is no such file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{path}: unreadable ({exc}); remove it after stopping the "
                           "processes it names by hand") from None


def write_state(path: str | os.PathLike, state: dict) -> None:
    """Replace `path` with `state` as JSON, atomically: a reader sees the old or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)


# --------------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Nothing listens on `port` of 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------ tracking server


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingUnreachable, within about `timeout` seconds, when the tracking server
    at an http(s) URI does not answer. Any HTTP answer counts as reachable (a server that
    wants credentials answers 401). Other URIs (sqlite:, postgresql:, file:) pass."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        url = _without_userinfo(uri).rstrip("/") + "/health"
    except ValueError:  # its text would quote the URI: the password, perhaps
        raise ConfigError(
            f"tracking.uri {redact_uri(uri)}: not a valid URI (in a password, '/', '?', '#' "
            "and '@' must be percent-encoded: %2F, %3F, %23, %40)") from None
    deadline = time.monotonic() + timeout
    reason = ""
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(1.0, min(5.0, left))):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = exception_reason(getattr(exc, "reason", exc))
        if time.monotonic() + 1.0 >= deadline:
            break
        time.sleep(1.0)
    raise TrackingUnreachable(
        f"the MLflow tracking server {redact_uri(uri)} cannot be reached ({reason}); is it "
        "running? `trainpipe stack status` shows the local stack, `trainpipe stack up` "
        "starts it")


def exception_reason(reason: object) -> str:
    """An exception (or a reason) in a few redacted words: 'Connection refused'."""
    if isinstance(reason, BaseException):
        text = str(reason.strerror or reason) if isinstance(reason, OSError) else str(reason)
        return redact_text(text or type(reason).__name__)
    return redact_text(str(reason))


def _without_userinfo(uri: str) -> str:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
