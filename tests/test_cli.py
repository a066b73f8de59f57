"""The command line, end to end, in real subprocesses against the embedded store."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import FAST, HOTEL, REPO, runs, trainpipe
from trainpipe import demo

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

STEPS = ["ingest", "validate", "split", "features", "train", "evaluate", "register"]


def pipeline_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["tags.trainpipe.kind"] == "pipeline"]


@pytest.mark.no_store  # a first run: it makes the store too
def test_run_on_a_fresh_folder_makes_demo_data_and_a_model(workdir):
    result = trainpipe("run", *FAST, cwd=workdir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "synthetic demo data" in out
    for step in STEPS:
        assert step in out
    assert "test_roc_auc" in out and "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    assert (workdir / "lake/raw/hotel_bookings/train.csv").exists()
    assert list((workdir / "lake/features/hotel_bookings/features").glob("*/manifest.json"))

    all_runs = runs(workdir)
    parent = pipeline_runs(all_runs)
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    children = all_runs[all_runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert sorted(children["tags.trainpipe.step"]) == sorted(STEPS)
    assert set(children["status"]) == {"FINISHED"}
    row = parent.iloc[0]
    assert row["metrics.test_roc_auc"] > 0.7
    assert row["tags.trainpipe.version"]
    assert row["params.model.params.n_estimators"] == "20"
    assert row["tags.trainpipe.overrides"] == "model.params.n_estimators=20"

    # The model is the whole inference pipeline: it predicts on raw rows.
    model = mlflow.pyfunc.load_model(row["tags.trainpipe.model_uri"])
    raw = demo.hotel_bookings(rows=10, seed=9).drop(columns=["booking_status"])
    assert set(model.predict(raw)) <= {0, 1}

    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(row["run_id"])}
    assert {"config.yaml", "environment.json"} <= artifacts
    evaluate_run = children[children["tags.trainpipe.step"] == "evaluate"].iloc[0]["run_id"]
    plots = {a.path for a in client.list_artifacts(evaluate_run)}
    assert {"roc_curve.png", "precision_recall_curve.png", "confusion_matrix.png",
            "feature_importance.png"} <= plots
    run = client.get_run(row["run_id"])
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "hotel_bookings"
    source = json.loads(dataset_input.dataset.source)["uri"]
    assert source == str(workdir / "lake/raw/hotel_bookings/train.csv")


@pytest.mark.skipif(not (HOTEL / "train.csv").exists(), reason="shared hotel data not present")
def test_run_on_the_real_hotel_csv(workdir):
    result = trainpipe("run", f"dataset.source={HOTEL / 'train.csv'}",
                       "model=random_forest", "seed=7", *FAST, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "synthetic" not in result.stdout
    parent = pipeline_runs(runs(workdir)).iloc[0]
    assert parent["metrics.test_roc_auc"] > 0.85
    model = mlflow.pyfunc.load_model(parent["tags.trainpipe.model_uri"])
    scoring = pd.read_csv(HOTEL / "test.csv").head(20)
    assert len(model.predict(scoring)) == 20


@pytest.mark.no_store  # it checks that no store is made
def test_cfg_job_prints_the_resolved_config(workdir):
    result = trainpipe("run", "--cfg", "job", "model=lightgbm", "seed=5", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "_target_: lightgbm.LGBMClassifier" in result.stdout
    assert "random_state: 5" in result.stdout
    assert not (workdir / "mlflow.db").exists()  # printing the config runs nothing


def test_multirun_sweeps_every_combination(demo_lake):
    result = trainpipe("run", "-m", "seed=1,2", *FAST, cwd=demo_lake)
    assert result.returncode == 0, result.stderr
    assert "job 1/2: seed=1" in result.stdout and "job 2/2: seed=2" in result.stdout
    parents = pipeline_runs(runs(demo_lake))
    assert sorted(parents["params.seed"]) == ["1", "2"]


def test_one_step_alone_reads_its_inputs_from_the_lake(finished_lake):
    demo_lake = finished_lake.folder  # after `trainpipe run *FAST`
    result = trainpipe("step", "evaluate", *FAST, cwd=demo_lake)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout and len(pipeline_runs(runs(demo_lake))) == 1

    result = trainpipe("step", "evaluate", "--force", *FAST, cwd=demo_lake)
    assert result.returncode == 0, result.stderr
    latest = pipeline_runs(runs(demo_lake)).iloc[0]
    assert latest["tags.trainpipe.steps"] == "evaluate"
    assert latest["metrics.test_roc_auc"] > 0.7


def test_a_step_whose_inputs_were_never_published_says_so(demo_lake):
    result = trainpipe("step", "train", cwd=demo_lake)
    assert result.returncode == 2
    assert " ".join(result.stderr.split()).startswith(
        "error: train reads the output of split, which is not published for this config "
        "(fingerprint ")
    # the first step to run is the earliest missing one, in pipeline order
    assert "run from validate first: trainpipe run --from validate" in " ".join(
        result.stderr.split())
    assert not (demo_lake / "mlflow.db").exists() or runs(demo_lake).empty  # no run started


def test_usage_errors_exit_2(workdir):
    result = trainpipe("run", "dataset=nope", cwd=workdir)
    assert result.returncode == 2
    assert "dataset" in result.stderr and "nope" in result.stderr
    assert "Traceback" not in result.stderr
    result = trainpipe("step", "fly", cwd=workdir)
    assert result.returncode == 2 and "unknown step 'fly'" in result.stderr


def test_missing_source_outside_the_lake_is_an_error_not_demo_data(workdir):
    result = trainpipe("run", f"dataset.source={workdir / 'absent.csv'}", cwd=workdir)
    assert result.returncode == 2
    assert "absent.csv: no such file" in result.stderr
    assert not (workdir / "absent.csv").exists()
    assert runs(workdir).empty  # found out before any run was started


def test_invalid_data_exits_3_and_publishes_nothing(workdir):
    df = demo.hotel_bookings(rows=300, seed=2)
    df.loc[4, "arrival_month"] = 13
    df.loc[[5, 6], "avg_price_per_room"] = -1.0
    raw = workdir / "lake/raw/hotel_bookings"
    raw.mkdir(parents=True)
    df.to_csv(raw / "train.csv", index=False)
    result = trainpipe("run", cwd=workdir)
    assert result.returncode == 3
    assert "arrival_month" in result.stderr and "row 5: 13" in result.stderr
    assert "avg_price_per_room" in result.stderr and "2 rows" in result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.strip().startswith("validate")]
    cells = [cell.strip() for cell in row.split("│")]  # the summary table's row
    assert cells[:2] == ["validate", "failed"] and cells[3] == "see the error below", row
    assert not (workdir / "lake/landing").exists()
    all_runs = runs(workdir)
    assert set(all_runs["status"]) == {"FINISHED", "FAILED"}  # ingest ok; validate + parent
    validate_run = all_runs[all_runs["tags.trainpipe.step"] == "validate"].iloc[0]
    assert validate_run["status"] == "FAILED"
    path = mlflow.artifacts.download_artifacts(run_id=validate_run["run_id"],
                                               artifact_path="validation_report.json")
    report = json.loads(Path(path).read_text())
    assert report["valid"] is False
    assert {f["column"] for f in report["failures"]} == {"arrival_month", "avg_price_per_room"}


def test_a_source_path_with_spaces_is_one_argument(workdir):
    folder = workdir / "my data"
    folder.mkdir()
    demo.hotel_bookings(rows=400, seed=3).to_csv(folder / "hotel bookings.csv", index=False)
    result = trainpipe("run", f"dataset.source={folder / 'hotel bookings.csv'}", "--to",
                       "validate", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "400 rows" in result.stdout
    # several overrides in one string (as `mlflow run` passes them) go through --overrides
    result = trainpipe("run", "--cfg", "job", "--overrides",
                       f"seed=5 'dataset.source={folder / 'hotel bookings.csv'}'", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "seed: 5" in result.stdout and "hotel bookings.csv" in result.stdout


def test_a_relative_source_in_a_dataset_file_is_beside_that_file(workdir):
    conf = workdir / "project" / "conf" / "dataset"
    conf.mkdir(parents=True)
    demo.hotel_bookings(rows=400, seed=3).to_csv(conf / "bookings.csv", index=False)
    text = (REPO / "src/trainpipe/conf/dataset/hotel_bookings.yaml").read_text()
    (conf / "mine.yaml").write_text(text.replace("name: hotel_bookings", "name: mine")
                                    .replace("source: ${lake.root}/raw/hotel_bookings/train.csv",
                                             "source: bookings.csv"))
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    result = trainpipe("run", "--config-dir", str(workdir / "project/conf"), "dataset=mine",
                       "--to", "validate", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "400 rows" in result.stdout
    # on the command line a relative path is relative to the working folder, as in a shell
    result = trainpipe("run", "--config-dir", str(workdir / "project/conf"), "dataset=mine",
                       "dataset.source=bookings.csv", cwd=elsewhere)
    assert result.returncode == 2
    assert f"{elsewhere / 'bookings.csv'}: no such file" in result.stderr
