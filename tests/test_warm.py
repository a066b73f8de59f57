"""The warm tracker: runs after the first get a tracker forked from a process that has
MLflow loaded, in their own folder and environment; it survives what a started tracker
survives, ends when idle, and can be turned off."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import pytest

from tests.conftest import FAST, runs, trainpipe, write_demo_data
from trainpipe import warm
from trainpipe.tracker import Tracker


@pytest.fixture
def warm_folder(monkeypatch) -> Path:
    """A runtime folder of this test's own (a short path: a socket's name has 108 bytes at
    most); its warm trackers end with the test."""
    folder = Path(tempfile.mkdtemp(prefix="tp-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    monkeypatch.setenv(warm.ENV, "120")
    yield folder
    for pid in warm_pids(folder):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(folder, ignore_errors=True)


def warm_pids(folder: Path) -> list[int]:
    pids = []
    for lock in folder.glob("*/*.lock"):
        with suppress(FileNotFoundError):  # removed by a warm tracker ending meanwhile
            if text := lock.read_text():
                pids.append(int(text))
    return pids


def left_behind(folder: Path) -> list[str]:
    """What ended warm trackers left: sockets, locks, logs with nothing in them."""
    return [p.name for p in folder.glob("*/*")
            if p.suffix in (".sock", ".lock") or p.suffix == ".log" and not p.stat().st_size]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def forked(tracker: Tracker) -> int:
    """The pid of a forked tracker, once the warm tracker has said it."""
    deadline = time.monotonic() + 120
    while tracker.proc.pid is None and tracker.proc.poll() is None and (
            time.monotonic() < deadline):
        time.sleep(0.05)
    assert tracker.proc.pid is not None, (
        f"the warm tracker never forked a tracker (exit {tracker.proc.returncode})")
    return tracker.proc.pid


def test_trackers_are_forked_by_one_warm_tracker_and_their_exit_codes_come_back(warm_folder):
    first = Tracker.start()
    assert isinstance(first.proc, warm.Forked)
    pid = forked(first)
    (server,) = warm_pids(warm_folder)
    assert parent_of(pid) == server and alive(server)
    first.close(120)
    assert first.proc.returncode == 0  # said "close", answered, exited

    second = Tracker.start()
    pid = forked(second)
    assert parent_of(pid) == server  # the same warm tracker
    second.discard()  # asked nothing (an up-to-date run): not waited for, it ends by itself
    deadline = time.monotonic() + 120
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)

    third = Tracker.start()
    forked(third)
    third.call("end_open_runs", "KILLED")  # asked something: discarding it stops it
    third.discard()  # told to stop: it unwinds and exits 1, as a started tracker does
    assert third.proc.returncode == 1
    assert warm_pids(warm_folder) == [server] and alive(server)


def test_a_tracker_outlives_its_warm_tracker_and_a_new_one_takes_over(warm_folder):
    tracker = Tracker.start()
    pid = forked(tracker)
    (server,) = warm_pids(warm_folder)
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(pid)
    tracker.close(120)  # still answers; its end is seen through its pidfd
    assert tracker.proc.returncode is not None and not alive(pid)

    again = Tracker.start()
    (new_server,) = warm_pids(warm_folder)
    assert new_server != server and parent_of(forked(again)) == new_server
    again.close(120)


def test_an_idle_warm_tracker_ends_and_takes_its_socket_along(warm_folder, monkeypatch):
    monkeypatch.setenv(warm.ENV, "1")
    tracker = Tracker.start()
    forked(tracker)
    (server,) = warm_pids(warm_folder)
    tracker.close(120)
    deadline = time.monotonic() + 120
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(server)
    assert not left_behind(warm_folder)


def test_a_run_that_asked_before_the_code_changed_is_served(warm_folder, monkeypatch):
    """The code changes (an upgrade, an edit) between a run finding its warm tracker's
    address and the warm tracker's first look at its code: the run is served all the same
    (it lost its tracker before). Then the warm tracker ends, here by idling (1 s)."""
    monkeypatch.setenv(warm.ENV, "1")
    stale = warm_folder / f"trainpipe-{os.getuid()}" / "tracker-0000000000000000.sock"
    stale.parent.mkdir(mode=0o700)
    monkeypatch.setattr(warm, "address", lambda: stale)  # not this code's digest
    tracker = Tracker.start()
    assert isinstance(tracker.proc, warm.Forked)
    forked(tracker)
    (server,) = warm_pids(warm_folder)
    tracker.close(120)
    assert tracker.proc.returncode == 0
    deadline = time.monotonic() + 120
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(server)


def test_turned_off_each_run_starts_its_own_tracker(warm_folder, monkeypatch):
    monkeypatch.setenv(warm.ENV, "0")
    tracker = Tracker.start()
    assert isinstance(tracker.proc, subprocess.Popen)
    assert parent_of(tracker.proc.pid) == os.getpid()
    tracker.close(120)
    assert not warm_pids(warm_folder)


def test_a_run_forked_from_the_warm_tracker_works_in_its_own_folder(tmp_path, warm_folder):
    """The second run's tracker is forked by the warm tracker the first run started, in
    another folder: its store and MLflow's artifacts (./mlruns) are the second folder's.
    (The S3 tests on the stack check that a forked tracker uses its run's environment:
    each test's endpoint and keys.)"""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        write_demo_data(folder)
    env = {"XDG_RUNTIME_DIR": str(warm_folder), warm.ENV: "120"}
    done = trainpipe("run", "--to", "features", cwd=first, env=env)
    assert done.returncode == 0, done.stderr
    (server,) = warm_pids(warm_folder)
    done = trainpipe("run", *FAST, "tracking.experiment=second", cwd=second,
                     env=env)
    assert done.returncode == 0, done.stderr
    assert warm_pids(warm_folder) == [server]  # it served the second run too
    assert len(runs(second, "second")) == 8  # the pipeline and its seven steps
    assert list((second / "mlruns").rglob("report.html"))
    assert not (first / "mlruns").exists() or not list((first / "mlruns").rglob("MLmodel"))


def test_the_code_digest_sees_an_edit(tmp_path, monkeypatch):
    package = tmp_path / "trainpipe"
    shutil.copytree(Path(warm.__file__).parent, package)
    monkeypatch.setattr(warm, "__file__", str(package / "warm.py"))
    before = warm.code_digest()
    (package / "steps" / "train.py").write_text("# edited\n")
    assert warm.code_digest() != before


def test_a_warm_tracker_ended_with_sigterm_takes_its_socket_along(warm_folder):
    tracker = Tracker.start()
    forked(tracker)
    tracker.close(120)
    (server,) = warm_pids(warm_folder)
    os.kill(server, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server)
    assert not left_behind(warm_folder)


@pytest.mark.parametrize(("value", "seconds"), [("", 600.0), ("30", 30.0), ("0", 0.0),
                                                ("off", 0.0), ("no", 0.0), ("-5", 0.0)])
def test_the_setting_in_words(monkeypatch, value, seconds):
    monkeypatch.setenv(warm.ENV, value)
    assert warm.idle_seconds() == seconds
