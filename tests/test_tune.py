"""trainpipe tune: search spaces checked before any trial, the study beside the tracking
store, trials as nested MLflow runs, resuming a study, the final run with the best params.
(Several workers on PostgreSQL and a killed worker: tests/integration/test_tune_on_postgres.py.)
"""

import json

import optuna
import pytest
from mlflow import MlflowClient

from tests.conftest import compose, runs, trainpipe
from trainpipe import tuning
from trainpipe.errors import ConfigError

# Tiny fits: the search, not the model, is under test.
QUICK = ["model=lightgbm", "model.params.n_estimators=20", "model.params.n_jobs=1"]


@pytest.mark.parametrize(("override", "message"), [
    ("model.search_space.num_leaves.low=300",
     "model.search_space.num_leaves: low 300 is above high 255"),
    ("model.search_space.num_leaves.type=integer",
     "model.search_space.num_leaves.type='integer': unknown type; must be one of int, float, "
     "categorical (did you mean 'int'?)"),
    ("model.search_space.learning_rate.low=0",
     "model.search_space.learning_rate: log: true needs low above 0"),
    ("+model.search_space.num_leaves.choices=[3,4]",
     "model.search_space.num_leaves.choices: unknown key"),
    ("model.search_space.num_leaves.high=fifty",
     "model.search_space.num_leaves.high='fifty': must be a whole number"),
])
def test_a_malformed_search_space_is_a_config_error_naming_the_key(workdir, override, message):
    with pytest.raises(ConfigError) as caught:
        compose(*QUICK, override)
    assert message in str(caught.value)


@pytest.mark.parametrize(("override", "message"), [
    ("+model.search_space.depth={type:int,low:2,high:8}",
     "model.search_space.depth: lightgbm.LGBMClassifier takes no parameter 'depth' (did you "
     "mean 'max_depth'?)"),
    ("model.search_space.num_leaves.low=1",  # LightGBM refuses one leaf when it fits
     "model.search_space: at {"),
])
def test_a_parameter_the_estimator_does_not_take_is_a_config_error(workdir, override, message):
    cfg = compose(*QUICK, override)
    with pytest.raises(ConfigError) as caught:
        tuning.plan(cfg)
    assert message in str(caught.value)


def test_a_model_without_a_search_space_and_an_unknown_metric_are_config_errors(workdir):
    with pytest.raises(ConfigError, match="model.search_space: logistic_regression has no "):
        tuning.plan(compose("model=logistic_regression"))
    with pytest.raises(ConfigError, match=r"tune.metric='r2_score': not a validation metric of "
                                          r"a binary task; one of roc_auc, log_loss"):
        tuning.plan(compose(*QUICK, "tune.metric=r2_score"))


def test_the_plan_defaults_to_the_primary_metric_and_a_store_beside_the_tracking_one(workdir):
    plan = tuning.plan(compose(*QUICK))
    assert (plan.study, plan.metric, plan.direction, plan.trials) == (
        "hotel_bookings-lightgbm", "roc_auc", "maximize", 20)
    assert plan.storage == f"sqlite:///{workdir / 'optuna.db'}"
    assert set(plan.space) >= {"learning_rate", "num_leaves"}
    loss = tuning.plan(compose(*QUICK, "tune.metric=log_loss", "tune.study=mine"))
    assert (loss.study, loss.direction) == ("mine", "minimize")

    on_postgres = compose(*QUICK, "tracking.uri=postgresql://ml:s3cret@db.example:5432/mlflow")
    assert tuning.default_storage(on_postgres) == (
        "postgresql+psycopg2://ml:s3cret@db.example:5432/mlflow_optuna")
    given = tuning.plan(compose(*QUICK, "tune.storage=postgresql://ml:s3cret@db.example/s"))
    assert given.storage == "postgresql+psycopg2://ml:s3cret@db.example/s"
    assert "s3cret" not in given.shown and "db.example/s" in given.shown  # what is printed
    with pytest.raises(ConfigError, match="tune.storage: no default beside tracking.uri="
                                          "http://tracking.example:5000"):
        tuning.default_storage(compose(*QUICK, "tracking.uri=http://tracking.example:5000"))


def test_the_override_line_replaces_searched_params_and_drops_tune_keys(workdir):
    cfg = compose(*QUICK)
    line = tuning.best_overrides(cfg, [*QUICK, "model.params.num_leaves=7", "tune.trials=3"],
                                 {"num_leaves": 40, "reg_lambda": 0.125, "boosting": "dart"})
    assert line == ["model=lightgbm", "model.params.n_estimators=20", "model.params.n_jobs=1",
                    "model.params.num_leaves=40", "+model.params.reg_lambda=0.125",
                    "+model.params.boosting=dart"]
    compose(*line)  # a config it composes to


@pytest.mark.no_store  # it checks that no store is made
def test_a_bad_search_space_exits_2_before_any_trial(demo_lake):
    result = trainpipe("tune", *QUICK, "model.search_space.num_leaves.low=300", cwd=demo_lake)
    assert result.returncode == 2, result.stderr
    assert "model.search_space.num_leaves: low 300 is above high 255" in result.stderr
    assert not (demo_lake / "optuna.db").exists()
    assert not (demo_lake / "mlflow.db").exists()  # nothing ran, nothing was recorded


@pytest.mark.slow
def test_one_worker_on_sqlite_records_nested_trials_and_a_second_command_adds_trials(demo_lake):
    first = trainpipe("tune", *QUICK, "tune.trials=3", cwd=demo_lake)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "reproduce   trainpipe run model=lightgbm" in first.stdout
    study = optuna.load_study(study_name="hotel_bookings-lightgbm",
                              storage=f"sqlite:///{demo_lake / 'optuna.db'}")
    assert len(study.trials) == 3

    all_runs = runs(demo_lake)
    parent = all_runs[all_runs["tags.trainpipe.kind"] == "tune"].iloc[0]
    trials = all_runs[all_runs["tags.trainpipe.kind"] == "tune-trial"]
    assert len(trials) == 3
    assert set(trials["tags.mlflow.parentRunId"]) == {parent.run_id}
    assert sorted(trials["tags.trainpipe.trial.number"].astype(int)) == [0, 1, 2]
    for _, run in trials.iterrows():  # params, state, duration; the metric when complete
        number = int(run["tags.trainpipe.trial.number"])
        trial = study.trials[number]
        assert run["params.num_leaves"] == str(trial.params["num_leaves"])
        assert run["params.n_estimators"] == "20"
        assert run["tags.trainpipe.trial.state"] == trial.state.name
        assert run["metrics.trial_seconds"] > 0
        assert run.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
        if trial.state.name == "COMPLETE":
            assert run["metrics.val_roc_auc"] == pytest.approx(trial.value)
        assert (trial.user_attrs["trainpipe"]["mlflow_run_id"]) == run.run_id

    assert parent.status == "FINISHED"
    assert parent["metrics.best_val_roc_auc"] == pytest.approx(study.best_value)
    assert json.loads(parent["tags.trainpipe.tune.best_params"]) == study.best_params
    client = MlflowClient(f"sqlite:///{demo_lake / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert "optimization_history.png" in artifacts
    final = all_runs[all_runs.run_id == parent["tags.trainpipe.tune.final_run_id"]].iloc[0]
    assert final["tags.trainpipe.kind"] == "pipeline"
    assert final["tags.trainpipe.tune.study"] == "hotel_bookings-lightgbm"
    assert final["params.model.params.num_leaves"] == str(study.best_params["num_leaves"])
    assert final["metrics.test_roc_auc"] > 0

    second = trainpipe("tune", *QUICK, "tune.trials=2", cwd=demo_lake)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "5 in the study" in second.stdout
    assert len(study.trials) == 5
    assert "up to date" in second.stdout  # the data steps came from the cache


@pytest.mark.slow
def test_sigterm_mid_trial_ends_the_trial_failed_and_the_tune_run_killed(demo_lake):
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "trainpipe", "tune", *QUICK, "model.params.n_estimators=3000",
         "tune.pruner=false", "tune.trials=50"], cwd=demo_lake, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{demo_lake / 'optuna.db'}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                study = optuna.load_study(study_name="hotel_bookings-lightgbm", storage=storage)
                if any(t.user_attrs.get("trainpipe") for t in study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))):
                    break
            except Exception:  # noqa: BLE001 - no study yet
                pass
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out + err
    states = {t.state.name for t in study.trials}
    assert "RUNNING" not in states and "FAIL" in states
    all_runs = runs(demo_lake)
    assert "RUNNING" not in set(all_runs.status)
    parent = all_runs[all_runs["tags.trainpipe.kind"] == "tune"].iloc[0]
    assert parent.status == "KILLED"
    stopped = all_runs[all_runs["tags.trainpipe.trial.state"] == "FAIL"].iloc[0]
    assert (stopped.status, stopped["tags.trainpipe.trial.error"]) == ("FAILED", "interrupted")


@pytest.mark.slow
def test_a_regression_study_minimises_rmse_with_lightgbm_reporting_it(task_config, workdir):
    conf = task_config("regression")
    result = trainpipe("tune", "--config-dir", str(conf), "dataset=toy_regression", *QUICK,
                       "tune.trials=3", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="toy_regression-lightgbm",
                              storage=f"sqlite:///{workdir / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert "minimize val_root_mean_squared_error" in result.stdout
    trials = runs(workdir)
    trials = trials[trials["tags.trainpipe.kind"] == "tune-trial"]
    assert len(trials) == 3  # and LightGBM's rmse, reported while it fit, is recorded
    assert trials["metrics.val_root_mean_squared_error_by_iteration"].notna().all()
