"""A run that fails or is interrupted ends FAILED or KILLED, never RUNNING or FINISHED."""

import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from tests.conftest import FAST, compose, runs
from trainpipe import pipeline
from trainpipe.cli import app

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def statuses(workdir) -> dict[str, str]:
    df = runs(workdir)
    if "tags.trainpipe.step" not in df:  # no step run yet
        return {}
    name = df["tags.trainpipe.step"].fillna("pipeline")
    return dict(zip(name, df["status"], strict=True))


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT],
                                     [signal.SIGINT, signal.SIGINT]],
                         ids=["sigterm", "ctrl-c", "ctrl-c twice"])
def test_a_signal_during_train_ends_runs_killed(demo_lake, signals):
    """Also a second Ctrl-C, pressed while the first is ending the runs: it waits."""
    workdir = demo_lake  # 3,000 rows: 3,000 trees on one thread train for many seconds
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainpipe", "run", "model.params.n_estimators=3000",
         "model.params.n_jobs=1"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until training is under way
        if "▶ train" in line:
            break
        assert time.monotonic() < deadline
    # and the steps before it are recorded (on a busy machine the tracker can lag behind)
    while not (workdir / "mlflow.db").exists() or statuses(workdir).get("features") != (
            "FINISHED"):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: ending the runs KILLED" in stdout
    assert "interrupted: runs marked KILLED" in stderr
    assert statuses(workdir) == {"pipeline": "KILLED", "train": "KILLED", "ingest": "FINISHED",
                                 "validate": "FINISHED", "split": "FINISHED",
                                 "features": "FINISHED"}


def test_a_ctrl_c_during_the_exit_after_an_interrupt_still_exits_130(demo_lake):
    """The runs are ended and the command is on its way out when the second Ctrl-C lands:
    it exits 130 as said, not killed by the signal in the interpreter's exit (-2)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainpipe", "run", "model.params.n_estimators=3000",
         "model.params.n_jobs=1"],
        cwd=demo_lake, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "▶ train" in line:
            break
    proc.send_signal(signal.SIGINT)
    said = []
    for line in proc.stderr:
        said.append(line)
        if "runs marked KILLED" in line:
            break
    deadline = time.monotonic() + 120  # a bound on a hang, not a time limit
    while proc.poll() is None and time.monotonic() < deadline:  # Ctrl-C held down: some
        proc.send_signal(signal.SIGINT)                            # land in every moment
        time.sleep(0.005)                                          # of the exit
    if proc.poll() is None:
        proc.kill()
    assert proc.wait() == 130, "".join(said) + proc.stderr.read()


@pytest.mark.parametrize("moment", [("register", "running"), ("evaluate", "done")],
                         ids=["as register starts", "as evaluate is done"])
def test_ctrl_c_at_a_step_boundary_is_told_as_mlflow_records_it(demo_lake, monkeypatch,
                                                                 moment):
    """Ctrl-C just as a step starts, or just after it finished but before its outputs were
    published: the summary (and report.html) say "killed", as its run in MLflow does, never
    "running" or "done"."""
    monkeypatch.chdir(demo_lake)

    def on_step(step):  # what the CLI prints; the Ctrl-C comes at that exact moment
        if (step.name, step.status) == moment:
            raise KeyboardInterrupt

    result = pipeline.run(compose(*FAST), FAST, on_step=on_step)
    assert isinstance(result.error, KeyboardInterrupt)
    said = {step.name: step.status for step in result.steps}
    assert said[moment[0]] == "killed"
    recorded = statuses(demo_lake)
    assert recorded.pop("pipeline") == "KILLED"
    assert recorded == {name: {"done": "FINISHED", "killed": "KILLED"}[status]
                        for name, status in said.items() if name in recorded}
    assert "running" not in said.values() and said["register"] in ("pending", "killed")


def test_a_config_error_stops_before_any_run(demo_lake):
    # in-process (typer's runner, in the demo lake's folder): no process is stopped here
    result = CliRunner().invoke(app, ["run", "model.params.max_depth=-5"])
    assert result.exit_code == 2  # a config error, found before any step runs
    assert ("error: model.params: sklearn.ensemble.RandomForestClassifier refuses them: The "
            "'max_depth' parameter of RandomForestClassifier must be" in " ".join(
                result.stderr.split()))
    assert "Traceback" not in result.stderr
    assert not (demo_lake / "mlflow.db").exists() or runs(demo_lake).empty
    result = CliRunner().invoke(app, ["run", "+model.params.no_such_param=1"])
    assert result.exit_code == 2
    assert "model.params" in result.stderr and "no_such_param" in result.stderr


# trainpipe with one change: the fit fails (as out of memory would), after the data steps.
FAILING_FIT = """
import sys
from trainpipe.steps import train
def out_of_memory(*args, **kwargs):
    raise MemoryError("the fit ran out of memory")
train.run = out_of_memory
from trainpipe.cli import main
sys.argv[0] = "trainpipe"
main()
"""


def test_an_error_in_a_step_ends_runs_failed(demo_lake):
    result = subprocess.run([sys.executable, "-c", FAILING_FIT, "run"], cwd=demo_lake,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1
    assert "MemoryError: the fit ran out of memory" in result.stderr
    got = statuses(demo_lake)
    assert got == {"pipeline": "FAILED", "train": "FAILED", "ingest": "FINISHED",
                   "validate": "FINISHED", "split": "FINISHED", "features": "FINISHED"}
    published = [s for s in ("validate", "split", "features", "train")
                 if list(demo_lake.glob(f"lake/*/hotel_bookings/{s}/*/manifest.json"))]
    assert published == ["validate", "split", "features"]  # what finished is kept


def test_no_caller_blocks_on_a_tracker_that_stopped_reading():
    """A tracker stuck in a call (a frozen tracking server) stops reading its pipe; a big
    call (a model) then fills it. Seen under load: the publishing thread blocked in the send
    while holding the call lock, and the main thread, ending the runs after SIGTERM, blocked
    behind it for ever. Calls are queued now: each caller waits on its Pending, with a
    timeout, and discarding the tracker fails whatever was still waiting."""
    import socket
    import threading
    from multiprocessing.connection import Connection

    from trainpipe.tracker import Tracker, TrackerLost

    ours, theirs = socket.socketpair()  # the other end lives in a process that never reads
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                              pass_fds=[theirs.fileno()])
    theirs.close()
    tracker = Tracker(frozen, Connection(ours.detach()), open("/dev/null", "rb"))  # noqa: SIM115
    model = b"x" * 20_000_000  # far more than a socket buffer holds
    answered = {}

    def calls() -> None:
        answered["model"] = tracker.call("log_model", model)
        answered["end"] = tracker.call("end_open_runs", "KILLED")

    caller = threading.Thread(target=calls, daemon=True)
    caller.start()
    caller.join(60)
    assert not caller.is_alive(), "a call blocked on the tracker's pipe"
    with pytest.raises(TimeoutError, match="did not answer within 1 s"):
        answered["end"].result(1)
    tracker.discard()
    for pending in answered.values():
        with pytest.raises(TrackerLost):
            pending.result(60)


def test_ctrl_c_in_a_sweep_stops_the_sweep(demo_lake, monkeypatch):
    """Ctrl-C during the first job of `run -m`: that job ends KILLED, the next never starts,
    and the command exits 130."""
    from trainpipe.steps import train

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(demo_lake)
    monkeypatch.setattr(train, "run", pressed)
    result = CliRunner().invoke(app, ["run", "-m", "seed=1,2", *FAST])
    assert result.exit_code == 130, result.output
    assert "job 1/2: seed=1" in result.output and "job 2/2" not in result.output
    assert statuses(demo_lake)["pipeline"] == "KILLED"
