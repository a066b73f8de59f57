"""trainpipe.supervise: start detached, wait until healthy, alive by pid + start time, stop
the whole process group, the state file, the tracking server check."""

import os
import sys
from pathlib import Path

import pytest

from trainpipe import supervise
from trainpipe.errors import ConfigError


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_process_that_exits_before_it_is_healthy_is_named_with_its_log(tmp_path):
    process = supervise.start(python("import sys; print('no database here'); sys.exit(3)"),
                              env={"PATH": os.environ["PATH"]}, cwd=tmp_path,
                              log=tmp_path / "server.log", banner="the test server")
    url = f"http://127.0.0.1:{supervise.free_port()}/health"
    with pytest.raises(supervise.ServiceError) as caught:
        supervise.wait_until_healthy(process, url, timeout=120, what="the test server")
    message = str(caught.value)
    assert message.startswith("the test server exited (code 3) before it was healthy")
    assert f"last lines of {tmp_path / 'server.log'}:" in message
    assert "the test server ---" in message and "no database here" in message
    assert caught.value.exit_code == 2
    assert not supervise.alive(process)


def test_healthy_server_alive_then_stopped_with_its_workers(tmp_path):
    port = supervise.free_port()
    # a server that starts a worker of its own, as gunicorn/uvicorn do
    server = python(
        "import subprocess, sys, http.server\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "open('worker.pid', 'w').write(str(worker.pid))\n"
        f"http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port={port},"
        " bind='127.0.0.1')\n")
    process = supervise.start(server, env={"PATH": os.environ["PATH"]}, cwd=tmp_path,
                              log=tmp_path / "server.log")
    try:
        supervise.wait_until_healthy(process, f"http://127.0.0.1:{port}/", 120, "the server")
        assert supervise.alive(process) and not supervise.port_free(port)
        worker = supervise.Process(int((tmp_path / "worker.pid").read_text()))
        assert supervise.alive(worker)
        # the same pid with another start time is another process (pids are reused)
        assert not supervise.alive(supervise.Process(process.pid, process.started + 1))
        assert not supervise.stop(supervise.Process(process.pid, process.started + 1), 5)
        assert supervise.alive(process)
    finally:
        stopped = supervise.stop(process, 30)
    assert stopped and not supervise.alive(process) and not supervise.alive(worker)
    assert supervise.stop(process, 5) is False  # nothing left to stop


def test_the_process_gets_exactly_the_environment_given(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINPIPE_NOT_FOR_THE_SERVER", "x")
    process = supervise.start(
        python("import os; print(sorted(k for k in os.environ if k.startswith('TRAIN')))"),
        env={"PATH": os.environ["PATH"], "TRAINPIPE_FOR_THE_SERVER": "y"}, cwd=tmp_path,
        log=tmp_path / "env.log")
    with pytest.raises(supervise.ServiceError, match="exited"):
        supervise.wait_until_healthy(process, "http://127.0.0.1:1/", 120, "it")
    assert "['TRAINPIPE_FOR_THE_SERVER']" in (tmp_path / "env.log").read_text()


def test_a_program_that_cannot_run_is_named(tmp_path):
    with pytest.raises(supervise.ServiceError, match="cannot run /no/such/program"):
        supervise.start(["/no/such/program"], env={}, cwd=tmp_path, log=tmp_path / "x.log")


def test_state_file(tmp_path):
    path = tmp_path / "state.json"
    assert supervise.read_state(path) == {}
    with supervise.locked(tmp_path / ".lock"):
        supervise.write_state(path, {"server": {"pid": 1, "port": 5000}})
    assert supervise.read_state(path) == {"server": {"pid": 1, "port": 5000}}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    path.write_text("{half")
    with pytest.raises(supervise.ServiceError, match=f"{path}: unreadable"):
        supervise.read_state(path)


def test_a_tracking_uri_with_a_raw_slash_in_its_password_is_a_config_error():
    """urllib reads `ab` as the host's port: the error must not quote it (nor the rest)."""
    with pytest.raises(ConfigError) as caught:
        supervise.check_tracking_server("http://bob:ab/cdSECRET@127.0.0.1:5000")
    assert str(caught.value) == (
        "tracking.uri http://bob:***@127.0.0.1:5000: not a valid URI (in a password, '/', "
        "'?', '#' and '@' must be percent-encoded: %2F, %3F, %23, %40)")
    assert caught.value.exit_code == 2


def test_log_tail_is_redacted(tmp_path):
    log = Path(tmp_path / "x.log")
    log.write_text("starting\nconnecting to postgresql://u:hunter2@db/mlflow\n")
    assert supervise.log_tail(log) == (
        f"\nlast lines of {log}:\nstarting\nconnecting to postgresql://u:***@db/mlflow")
    assert supervise.log_tail(tmp_path / "missing.log") == ""
