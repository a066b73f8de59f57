"""Batch scoring: the predict step of the pipeline, and `trainpipe predict` on any file,
validated against the dataset's contract, scored in chunks, written whole or not at all."""

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from tests.conftest import FAST, compose, copy_store, trainpipe
from trainpipe import demo, lake, serving
from trainpipe.cli import app
from trainpipe.errors import ConfigError, DataValidationError

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

SCORING_ROWS = 300


def scoring_rows(rows: int = SCORING_ROWS, seed: int = 7) -> pd.DataFrame:
    """Hotel rows to score: no target, ids of their own."""
    df = demo.hotel_bookings(rows=rows, seed=seed).drop(columns=["booking_status"])
    df["id"] += 1_000_000
    return df


@pytest.fixture(scope="module")
def trained(tmp_path_factory, empty_store) -> dict:
    """A pipeline run with scoring data: its folder, store, model and published predictions."""
    folder = tmp_path_factory.mktemp("trained")
    copy_store(empty_store, folder)
    raw = folder / "lake/raw/hotel_bookings"
    raw.mkdir(parents=True)
    demo.hotel_bookings(rows=3000, seed=1).to_csv(raw / "train.csv", index=False)
    scoring_rows().to_csv(folder / "score.csv", index=False)
    result = trainpipe("run", *FAST, f"dataset.scoring_source={folder / 'score.csv'}",
                       cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    store = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    parent = mlflow.search_runs(experiment_names=["trainpipe"],
                                filter_string="tags.`trainpipe.kind` = 'pipeline'").iloc[0]
    return {"folder": folder, "store": store, "run": result,
            "model_uri": parent["tags.trainpipe.model_uri"],
            "overrides": [f"tracking.uri={store}", f"lake.root={folder / 'lake'}"]}


def published_predictions(folder: Path) -> tuple[pd.DataFrame, dict]:
    [manifest] = list((folder / "lake/predictions/hotel_bookings/predict").glob(
        "*/manifest.json"))
    entry = json.loads(manifest.read_text())
    path = manifest.parent / entry["files"]["predictions.parquet"]["path"]
    return pd.read_parquet(path), entry


def predict(trained, *args: str, cwd: Path):
    return trainpipe("predict", *args, *trained["overrides"], cwd=cwd)


def test_the_predict_step_publishes_predictions_of_the_runs_model(trained):
    run = trained["run"]
    assert "predict" in run.stdout and f"{SCORING_ROWS} rows scored" in run.stdout
    predictions, manifest = published_predictions(trained["folder"])
    assert manifest["run_id"] and manifest["pipeline_run_id"]
    assert list(predictions.columns) == ["id", "prediction", "proba_0", "proba_1",
                                         "model_version"]
    rows = scoring_rows()
    assert list(predictions["id"]) == list(rows["id"])
    # the model as the registry knows it: this run registered it as version 1
    assert set(predictions["model_version"]) == {"models:/hotel_bookings/1"}
    np.testing.assert_allclose(predictions["proba_0"] + predictions["proba_1"], 1.0)
    model = mlflow.sklearn.load_model(trained["model_uri"])
    assert list(predictions["prediction"]) == list(model.predict(rows))
    np.testing.assert_allclose(predictions["proba_1"], model.predict_proba(rows)[:, 1])


def test_a_repeated_run_reuses_the_predictions(trained):
    again = trainpipe("run", *FAST, f"dataset.scoring_source={trained['folder'] / 'score.csv'}",
                      cwd=trained["folder"])
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout


def test_the_logged_model_predicts_on_one_thread(trained):
    """A forest trained with n_jobs=-1 would start a thread pool for every predict: slower
    than the prediction itself for the few rows a served request holds."""
    model = mlflow.sklearn.load_model(trained["model_uri"])
    assert model[-1].n_jobs == 1


def test_step_predict_without_scoring_data_says_why(demo_lake):
    result = trainpipe("step", "predict", cwd=demo_lake)
    assert result.returncode == 2
    assert ("error: nothing to run for this config: predict runs only when "
            "dataset.scoring_source is set (the rows to score)") in result.stderr
    assert "Traceback" not in result.stderr
    inspect = trainpipe("inspect", cwd=demo_lake)
    assert inspect.returncode == 0, inspect.stderr
    assert "does not apply" in next(line for line in inspect.stdout.splitlines()
                                    if line.lstrip().startswith("predict"))


def test_predict_command_scores_like_the_step_and_records_a_run(trained, tmp_path):
    source = trained["folder"] / "score.csv"
    result = predict(trained, "--model", trained["model_uri"], "--input", str(source),
                     "--output", str(tmp_path / "out" / "predictions.parquet"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{SCORING_ROWS} rows scored" in result.stdout
    # the model is given only its own columns: MLflow has no extra input (the id) to warn of
    assert "Found extra inputs" not in result.stdout + result.stderr
    assert "Warning" not in result.stderr
    scored = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    step, _ = published_predictions(trained["folder"])
    # the same predictions; each names the model as it was given (a URI; a registered version)
    pd.testing.assert_frame_equal(scored.drop(columns="model_version"),
                                  step.drop(columns="model_version"))

    mlflow.set_tracking_uri(trained["store"])
    [row] = mlflow.search_runs(experiment_names=["trainpipe"],
                               filter_string="tags.`trainpipe.kind` = 'predict'",
                               order_by=["start_time DESC"], max_results=1).itertuples()
    run = mlflow.get_run(row.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainpipe.model_version"] == trained["model_uri"]
    assert run.data.metrics["rows"] == SCORING_ROWS and run.data.metrics["seconds"] > 0
    assert run.data.params["output"] == str(tmp_path / "out" / "predictions.parquet")
    [dataset] = run.inputs.dataset_inputs
    assert json.loads(dataset.dataset.profile)["sha256"] == hashlib.sha256(
        source.read_bytes()).hexdigest()
    assert json.loads(dataset.dataset.source)["uri"] == str(source)
    assert [t.value for t in dataset.tags] == ["scoring"]


def test_csv_output_and_parquet_input_in_many_chunks(trained, tmp_path, monkeypatch):
    """Scoring never holds the whole file: Parquet is read batch by batch, CSV chunk by
    chunk, each chunk appended to the output; the result is the same as scoring at once."""
    rows = scoring_rows()
    rows.to_parquet(tmp_path / "in.parquet", row_group_size=40, index=False)
    rows.to_csv(tmp_path / "in.csv", index=False)
    cfg = compose(*trained["overrides"])
    seen = []
    real_score = serving.score

    def spy(model, chunk, *args):
        seen.append(len(chunk))
        return real_score(model, chunk, *args)

    monkeypatch.setattr(serving, "score", spy)
    serving.predict_file(cfg, trained["model_uri"], str(tmp_path / "in.parquet"),
                         str(tmp_path / "a.csv"), chunk_rows=70)
    assert seen == [70, 70, 70, 70, 20]
    serving.predict_file(cfg, trained["model_uri"], str(tmp_path / "in.csv"),
                         str(tmp_path / "b.parquet"), chunk_rows=70)
    assert pq.ParquetFile(tmp_path / "b.parquet").num_row_groups == 5
    # The step names the registered version; scoring by the logged model's URI names that.
    at_once = published_predictions(trained["folder"])[0].drop(columns="model_version")
    by_csv, by_parquet = pd.read_csv(tmp_path / "a.csv"), pd.read_parquet(tmp_path / "b.parquet")
    for scored in (by_csv, by_parquet):
        assert set(scored.pop("model_version")) == {trained["model_uri"]}
    pd.testing.assert_frame_equal(by_csv, at_once, check_dtype=False)
    pd.testing.assert_frame_equal(by_parquet, at_once)


def test_invalid_rows_anywhere_stop_it_with_one_report_and_no_output(trained, tmp_path,
                                                                       monkeypatch):
    rows = scoring_rows()
    rows.loc[20, "lead_time"] = -1  # first chunk
    rows.loc[[130, 250], "arrival_month"] = [13, 14]  # second and third chunk
    rows.loc[290, "id"] = rows.loc[10, "id"]  # a duplicate id two chunks apart
    bad = tmp_path / "bad.csv"
    rows.to_csv(bad, index=False)
    output = tmp_path / "out.parquet"
    output.write_bytes(b"the previous predictions")
    monkeypatch.setattr(serving, "CHUNK_ROWS", 100)
    result = CliRunner().invoke(app, ["predict", "--model", trained["model_uri"], "--input",
                                      str(bad), "--output", str(output), *trained["overrides"]])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    head = "data validation failed (rows numbered from 1, the header line not counted):"
    assert f"invalid data: {head}" in text
    # rows as a user counts them in the file (the frame's 10, 290, 20, 130 and 250)
    assert (f"{bad} · id · duplicate values (must be unique) · 2 rows · e.g. row 11: "
            f"{rows.loc[10, 'id']}, row 291: {rows.loc[10, 'id']}") in text
    assert f"{bad} · lead_time · greater_than_or_equal_to(0) · 1 row · e.g. row 21: -1" in text
    assert (f"{bad} · arrival_month · less_than_or_equal_to(12) · 2 rows · e.g. row 131: 13, "
            "row 251: 14") in text
    assert "full report: " in text and "validation_report.json" in text
    assert output.read_bytes() == b"the previous predictions"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "out.parquet"]
    run = mlflow.search_runs(experiment_names=["trainpipe"],
                             filter_string="tags.`trainpipe.kind` = 'predict'",
                             order_by=["start_time DESC"], max_results=1).iloc[0]
    assert run["status"] == "FAILED"

    # the validate step, reading the file whole, reports it in the same lines
    from trainpipe.steps import ingest, validate

    table = ingest.to_table(lake.read_source(str(bad)))
    _, failures, _, _ = validate._check(compose(), table, with_target=False)
    lines = result.output.split(f"{head}\n")[1].split("full report")[0]
    whole = validate.to_terminal(failures).split("\n", 1)[1]
    assert sorted(lines.splitlines()) == sorted(whole.splitlines())


def test_repeated_ids_in_a_parquet_file_are_found_across_chunks(trained, tmp_path):
    rows = scoring_rows()
    rows.loc[[150, 290], "id"] = rows.loc[10, "id"]
    rows.to_parquet(tmp_path / "in.parquet", row_group_size=50, index=False)
    cfg = compose(*trained["overrides"])
    with pytest.raises(DataValidationError) as caught:
        serving.predict_file(cfg, trained["model_uri"], str(tmp_path / "in.parquet"),
                             str(tmp_path / "out.csv"), chunk_rows=100)
    value = rows.loc[10, "id"]
    assert str(caught.value).splitlines()[1:] == [
        f"  {tmp_path / 'in.parquet'} · id · duplicate values (must be unique) · 3 rows · "
        f"e.g. row 11: {value}, row 151: {value}, row 291: {value}"]
    assert not (tmp_path / "out.csv").exists()


def test_whole_file_checks_see_the_whole_file(task_config, tmp_path):
    """A column without a value in one chunk is fine; without one in the whole file it is
    one line, however many chunks."""
    conf = task_config("binary")
    train = conf.parent / "binary.csv"
    cfg = compose("dataset=toy_binary", *FAST, f"tracking.uri=sqlite:///{tmp_path}/m.db",
                  f"lake.root={tmp_path / 'lake'}", config_dir=conf)
    result = CliRunner().invoke(app, ["run", "dataset=toy_binary", "--config-dir", str(conf),
                                      *FAST, f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                      f"lake.root={tmp_path / 'lake'}"])
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    model_uri = mlflow.search_runs(experiment_names=["trainpipe"]).dropna(
        subset=["tags.trainpipe.model_uri"]).iloc[0]["tags.trainpipe.model_uri"]
    rows = pd.read_csv(train).drop(columns=["label"]).head(200)
    rows.loc[:99, "weight"] = np.nan  # every value of the first chunk, not of the file
    rows.to_csv(tmp_path / "half.csv", index=False)
    scored = serving.predict_file(cfg, model_uri, str(tmp_path / "half.csv"),
                                  str(tmp_path / "half.parquet"), chunk_rows=100)
    assert scored.rows == 200
    predictions = pd.read_parquet(tmp_path / "half.parquet")
    assert list(predictions.columns) == ["key", "prediction", "proba_no", "proba_yes",
                                         "model_version"]

    rows["weight"] = np.nan
    rows.to_csv(tmp_path / "empty_column.csv", index=False)
    with pytest.raises(DataValidationError) as caught:
        serving.predict_file(cfg, model_uri, str(tmp_path / "empty_column.csv"),
                             str(tmp_path / "x.parquet"), chunk_rows=100)
    assert str(caught.value).splitlines()[1:] == [
        f"  {tmp_path / 'empty_column.csv'} · weight · every value is missing · 200 rows"]


def test_the_default_model_is_the_registered_champion(trained, tmp_path):
    source = str(trained["folder"] / "score.csv")
    missing = predict(trained, "--input", source, "--output", str(tmp_path / "p.csv"),
                      "registry.name=nobody", cwd=tmp_path)
    assert missing.returncode == 2
    assert ("error: the default model models:/nobody@champion (the champion of the "
            "registered model 'nobody'): no such model") in " ".join(missing.stderr.split())
    assert not (tmp_path / "p.csv").exists()

    # The pipeline's register step made the run's model the champion of hotel_bookings.
    mlflow.set_tracking_uri(trained["store"])
    version = mlflow.MlflowClient().get_model_version_by_alias("hotel_bookings", "champion")
    assert version.source == trained["model_uri"]
    found = predict(trained, "--input", source, "--output", str(tmp_path / "p.csv"),
                    cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert "model models:/hotel_bookings@champion" in found.stdout
    scored = pd.read_csv(tmp_path / "p.csv")
    assert set(scored["model_version"]) == {f"models:/hotel_bookings/{version.version}"}


@pytest.mark.parametrize("args,code,words", [
    (["--output", "{tmp}/p.json"], 2, "--output {tmp}/p.json: name a .csv or .parquet file"),
    (["--input", "{tmp}/nothere.csv"], 2, "{tmp}/nothere.csv: no such file"),
    (["--model", "models:/m-0123456789abcdef"], 2,
     "--model models:/m-0123456789abcdef: no such model in the tracking store"),
    (["--input", "{train}"], 3, "booking_status · scoring data must not contain the target"),
])
def test_bad_arguments_are_named(trained, tmp_path, monkeypatch, args, code, words):
    given = dict(zip(args[::2], args[1::2], strict=True))
    options = {"--model": trained["model_uri"], "--input": str(trained["folder"] / "score.csv"),
               "--output": "{tmp}/p.parquet"} | given
    values = {"tmp": tmp_path, "train": trained["folder"] / "lake/raw/hotel_bookings/train.csv"}
    argv = [part.format(**values) for pair in options.items() for part in pair]
    monkeypatch.chdir(tmp_path)  # in-process (typer's runner): no process is the point here
    result = CliRunner().invoke(app, ["predict", *argv, *trained["overrides"]])
    assert result.exit_code == code, result.output
    assert words.format(**values) in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("p.*")) and not list(tmp_path.glob(".tmp-*"))


def test_a_model_of_another_dataset_is_named(trained):
    mlflow.set_tracking_uri(trained["store"])
    model = mlflow.sklearn.load_model(trained["model_uri"])
    other = OmegaConf.create({"name": "penguins", "columns": {"no_of_adults": {"type": "int"}}})
    with pytest.raises(ConfigError, match=r"--model models:/m-x: it reads columns the dataset "
                                          r"'penguins' does not have: \['no_of_children'"):
        serving._check_inputs(other, serving.Model("models:/m-x", "models:/m-x", ()), model)


def test_staged_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "p.csv"
    with pytest.raises(RuntimeError), lake.staged_file(str(target)) as local:
        Path(local).write_text("half")
        raise RuntimeError("failed while writing")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    with lake.staged_file(str(target)) as local:
        Path(local).write_text("whole")
        assert not target.exists()  # not before the block ends
    assert target.read_text() == "whole" and len(list((tmp_path / "out").iterdir())) == 1


def test_local_file_streams_a_file_with_its_digest(tmp_path):
    path = tmp_path / "in.csv"
    data = b"a,b\n" + b"1,2\n" * 100_000
    path.write_bytes(data)
    with lake.local_file(str(path)) as source:
        assert source.path == str(path)  # a local file is read where it is
        assert source.digest == hashlib.sha256(data).hexdigest() and source.size == len(data)
        assert source.format == "csv"


def test_an_interrupted_predict_ends_killed_and_writes_nothing(trained, tmp_path, monkeypatch):
    calls, real_score = [], serving.score

    def interrupted_on_the_second_chunk(model, chunk, *args):  # Ctrl-C while scoring
        calls.append(len(chunk))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(model, chunk, *args)

    monkeypatch.setattr(serving, "score", interrupted_on_the_second_chunk)
    monkeypatch.setattr(serving, "CHUNK_ROWS", 100)
    result = CliRunner().invoke(app, ["predict", "--model", trained["model_uri"], "--input",
                                      str(trained["folder"] / "score.csv"), "--output",
                                      str(tmp_path / "p.parquet"), *trained["overrides"]])
    assert result.exit_code == 130, result.output
    assert "interrupted: the predict run is marked KILLED; nothing was written" in result.output
    assert calls == [100, 100] and list(tmp_path.iterdir()) == []
    run = mlflow.search_runs(experiment_names=["trainpipe"],
                             filter_string="tags.`trainpipe.kind` = 'predict'",
                             order_by=["start_time DESC"], max_results=1).iloc[0]
    assert run["status"] == "KILLED"
