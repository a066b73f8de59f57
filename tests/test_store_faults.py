"""The embedded MLflow store (SQLite) under faults: a process killed while it creates the
store, several first runs at once, a store made half by another program, a full disk."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, runs, trainpipe

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command
# no_store marks the tests of how the store is made: their folders start without one

# trainpipe (or, with "mlflow" as first argument, bare MLflow) with one change, in every
# process it starts (the store is made by its tracker process): in the middle of the store's
# migrations, as the table MLflow's own error names is created, the process says so in a
# marker file and waits to be stopped.
PAUSE_IN_MIGRATIONS = """
import re, time
from pathlib import Path
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "after_cursor_execute")
def pause(conn, cursor, statement, *args):
    if re.match(r"\\s*CREATE TABLE evaluation_datasets", statement):
        Path("migrating").touch()
        time.sleep(3600)
"""


def start_paused_in_migrations(folder: Path, *args: str, warm: bool = True
                               ) -> subprocess.Popen:
    """`warm=False`: the run starts its own tracker, in its process group (see test_warm)."""
    hook = folder.parent / f"{folder.name}-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PAUSE_IN_MIGRATIONS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if not warm:
        env["TRAINPIPE_WARM_TRACKER"] = "0"
    # its tracker never answers: an interrupted run waits 4 s for it, not 20 (and stops it)
    env["TRAINPIPE_INTERRUPT_WAIT"] = "4"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    cmd = (["-c", "from mlflow import MlflowClient; MlflowClient('sqlite:///mlflow.db')"]
           if args[0] == "mlflow" else ["-m", "trainpipe", *args])
    proc = subprocess.Popen([sys.executable, *cmd], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (folder / "migrating").exists():
        assert proc.poll() is None, f"ended before the migrations: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "never reached the store's migrations"
        time.sleep(0.05)
    return proc


def store_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "mlflow.db" in p.name)


@pytest.mark.no_store
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["kill-9", "sigterm", "ctrl-c"])
def test_a_run_stopped_while_it_creates_the_store_leaves_no_half_store(demo_lake, sig):
    folder = demo_lake
    # kill -9: the pipeline and its tracker die together (a lost machine)
    proc = start_paused_in_migrations(folder, "run", "--to", "validate",
                                      warm=sig != signal.SIGKILL)
    assert not (folder / "mlflow.db").exists()  # the store appears whole or not at all
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # unwound: its temporary file is gone with it
        assert proc.returncode == 130, stderr
        # 4 s of waits, and 5 s more if the tracker does not unwind when stopped
        assert "interrupted: ending the runs KILLED (at most 9 s;" in stdout
        assert store_files(folder) == []
    assert not (folder / "mlflow.db").exists()

    result = trainpipe("run", "--to", "validate", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert store_files(folder) == ["mlflow.db"]  # what the killed process left is cleared
    assert set(runs(folder)["status"]) == {"FINISHED"}


@pytest.mark.no_store
def test_first_runs_at_once_in_a_new_folder_share_one_store(demo_lake):
    folder = demo_lake
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    procs = [subprocess.Popen([sys.executable, "-m", "trainpipe", "run", "--to", "validate"],
                              cwd=folder, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    df = runs(folder)
    parents = df[df["tags.trainpipe.kind"] == "pipeline"]
    assert len(parents) == 4 and set(df["status"]) == {"FINISHED"}
    assert store_files(folder) == ["mlflow.db"]


@pytest.mark.no_store
def test_a_store_made_half_by_another_program_says_what_to_do(demo_lake):
    folder = demo_lake
    proc = start_paused_in_migrations(folder, "mlflow")  # bare MLflow: no atomic creation
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (folder / "mlflow.db").exists()

    result = trainpipe("run", "--to", "validate", cwd=folder)
    assert result.returncode == 2
    store = folder / "mlflow.db"
    assert f"error: {store} is not a complete MLflow store (schema revision " in result.stderr
    assert "its creation or an upgrade was interrupted" in result.stderr
    assert f"It holds no runs: delete it and run again: rm {store}" in result.stderr
    assert "Traceback" not in result.stderr

    store.unlink()  # as told
    assert trainpipe("run", "--to", "validate", cwd=folder).returncode == 0


def test_a_store_with_runs_is_never_called_deletable(demo_lake):
    """A store with runs whose schema this MLflow cannot reach: keep a copy, then upgrade."""
    folder = demo_lake
    assert trainpipe("run", "--to", "validate", cwd=folder).returncode == 0
    with sqlite3.connect(folder / "mlflow.db") as db:  # as if an upgrade stopped half way
        db.execute("UPDATE alembic_version SET version_num = 'c48cb773bb87'")
        db.execute("DROP TABLE evaluation_datasets")
    result = trainpipe("run", "--to", "validate", "--force", cwd=folder)  # opens the store
    assert result.returncode == 2
    assert "It holds 3 run(s): keep a copy of it, then try `mlflow db upgrade" in result.stderr
    assert "rm " not in result.stderr


@pytest.mark.no_store
def test_a_run_that_fails_before_any_work_leaves_no_new_store(workdir):
    result = trainpipe("run", f"dataset.source={workdir}/nope.csv", cwd=workdir)
    assert result.returncode == 2
    assert f"{workdir}/nope.csv: no such file" in result.stderr
    assert store_files(workdir) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs; mounting needs root). Yields its folder and a function
    that resizes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, resize
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_under_the_store_is_named(demo_lake, small_disk):
    """The store and its artifacts (./mlruns) live on a 2 MB disk, the lake elsewhere:
    the store fits, the model's artifacts do not."""
    disk, resize = small_disk
    lake = demo_lake / "lake"
    args = ["run", *FAST, f"lake.root={lake}",
            f"dataset.source={lake}/raw/hotel_bookings/train.csv"]
    result = trainpipe(*args, cwd=disk)
    assert result.returncode == 1
    assert f"failed: no space left on device: {disk}/mlruns/" in result.stderr
    assert "then run again: the steps that finished are reused" in result.stderr
    assert "Traceback" not in result.stderr and "autoflush" not in result.stderr
    df = runs(disk)
    failed_step = df[df["tags.trainpipe.step"] == "train"].iloc[0]
    assert failed_step["status"] in ("FAILED", "RUNNING")  # RUNNING: the store was full too

    # with the disk full to the last byte, even the store's file cannot grow
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    result = trainpipe(*args, cwd=disk)
    assert result.returncode == 1
    assert f"failed: no space left on device: {disk}/" in result.stderr
    assert "Traceback" not in result.stderr

    filler.unlink()
    resize("16m")
    result = trainpipe(*args, cwd=disk)
    assert result.returncode == 0, result.stderr
    assert "RUNNING" not in set(runs(disk)["status"])  # what the full disk left is ended
