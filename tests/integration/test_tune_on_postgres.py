"""trainpipe tune on the machine's real PostgreSQL: the study in `<tracking db>_optuna`
(made by tune when missing), two worker processes on one study, a worker killed with
kill -9 in the middle of a trial."""

import os
import signal
import time
import uuid
from collections import Counter

import optuna
import pytest
from integration_support import ADMIN_URI, admin_connect, clean_env, start_trainpipe, trainpipe
from mlflow import MlflowClient

from trainpipe import demo

QUICK = ["model=lightgbm", "model.params.n_estimators=20", "model.params.n_jobs=1"]
STUDY = "hotel_bookings-lightgbm"
pytestmark = pytest.mark.slow


@pytest.fixture
def tracking_db():
    """A database of its own for the tracking store; tune makes `<name>_optuna` beside it.
    Both are dropped at the end."""
    name = f"trainpipe_tune_{uuid.uuid4().hex[:10]}"
    conn = admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    base = ADMIN_URI.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    conn = admin_connect()
    with conn.cursor() as cur:
        for db in (name, f"{name}_optuna"):
            cur.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                        "where datname = %s and pid <> pg_backend_pid()", (db,))
            cur.execute(f"DROP DATABASE IF EXISTS {db}")
    conn.close()


@pytest.fixture
def demo_folder(tmp_path):
    raw = tmp_path / "lake" / "raw" / "hotel_bookings"
    raw.mkdir(parents=True)
    demo.hotel_bookings(rows=3000, seed=1).to_csv(raw / "train.csv", index=False)
    return tmp_path


def _psycopg2(uri: str) -> str:
    return "postgresql+psycopg2://" + uri.split("://", 1)[1]


def _study(tracking_uri: str) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=_psycopg2(tracking_uri) + "_optuna")


def _trial_runs(tracking_uri: str) -> dict[int, object]:
    client = MlflowClient(_psycopg2(tracking_uri))
    experiment = client.get_experiment_by_name("trainpipe")
    found = client.search_runs([experiment.experiment_id],
                               "tags.trainpipe.kind = 'tune-trial'", max_results=1000)
    return {int(r.data.tags["trainpipe.trial.number"]): r for r in found}


def test_two_workers_on_one_study_run_exactly_the_trials_asked(tracking_db, demo_folder):
    env = clean_env() | {"COLUMNS": "200"}
    result = trainpipe("tune", *QUICK, "tune.trials=6", f"tracking.uri={tracking_db}",
                       "--workers", "2", cwd=demo_folder, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    study = _study(tracking_db)
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(6))  # none lost, none twice
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    attrs = [t.user_attrs["trainpipe"] for t in trials]
    assert Counter(a["worker"] for a in attrs) == {"w0": 3, "w1": 3}
    assert len({a["pid"] for a in attrs}) == 2  # two processes
    runs = _trial_runs(tracking_db)
    assert sorted(runs) == list(range(6))
    assert {runs[t.number].info.run_id for t in trials} == {a["mlflow_run_id"] for a in attrs}
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs.values()}) == 1
    for trial in trials:
        assert runs[trial.number].data.params["num_leaves"] == str(trial.params["num_leaves"])
    assert "6 in the study" in result.stdout


def test_a_worker_killed_mid_trial_leaves_that_trial_failed_and_the_study_completes(
        tracking_db, demo_folder):
    env = clean_env() | {"COLUMNS": "200"}
    # slower trials (more trees, no pruning) so that one is caught running
    process = start_trainpipe("tune", *QUICK, "model.params.n_estimators=1500",
                              "tune.pruner=false", "tune.trials=6", "tune.heartbeat=1",
                              f"tracking.uri={tracking_db}", "--workers", "2",
                              cwd=demo_folder, env=env)
    try:
        killed = _kill_a_running_trial(tracking_db, process)
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out + err
    trials = {t.number: t for t in _study(tracking_db).trials}
    assert trials[killed].state.name == "FAIL"
    finished = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert len(finished) == 6  # a new worker ran what the dead one left
    run = _trial_runs(tracking_db)[killed]
    assert run.info.status == "FAILED"
    assert run.data.tags["trainpipe.trial.state"] == "FAIL"
    assert "no heartbeat" in run.data.tags["trainpipe.trial.error"]
    assert "was killed (signal 9)" in out


def _kill_a_running_trial(tracking_db: str, process) -> int:
    """kill -9 the worker of the first trial seen running; its number."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            running = _study(tracking_db).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 - no study (or database) yet
            running = []
        for trial in running:
            attr = trial.user_attrs.get("trainpipe")
            if attr:
                os.kill(attr["pid"], signal.SIGKILL)
                return trial.number
        time.sleep(0.05)
    raise AssertionError("no trial was seen running")
