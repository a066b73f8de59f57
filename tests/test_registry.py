"""The register step: the gate (unit tests of the decision), then the whole thing through the
command line on the embedded store: versions, aliases, tags, exit codes, promote, rollback."""

import getpass
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tests.conftest import FAST, compose, task_table, trainpipe
from trainpipe.cli import app
from trainpipe.errors import ConfigError
from trainpipe.steps.register import Criteria, decide, metric_names

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

WORSE = ["model.params.n_estimators=1", "model.params.max_depth=1"]


def criteria(bounds=None, beat=True, delta=0.0, primary="test_roc_auc", higher=True):
    return Criteria(bounds or {}, beat, delta, primary, higher)


# ------------------------------------------------------------------------------- the gate


def test_the_first_version_passes_on_the_bounds_alone():
    d = decide("hotels", 1, {"test_roc_auc": 0.9}, criteria({"test_roc_auc": {"min": 0.85}}))
    assert d.passed
    assert d.line == ("promoted version 1 to champion: no champion before; bounds met: "
                      "test_roc_auc 0.9000 >= min 0.85")
    d = decide("hotels", 1, {"test_roc_auc": 0.8}, criteria({"test_roc_auc": {"min": 0.85}}))
    assert not d.passed
    assert d.line == ("version 1 not promoted (no champion yet): test_roc_auc 0.8000 < min "
                      "0.85")


def test_the_champion_must_be_beaten_by_min_delta():
    beaten = decide("hotels", 7, {"test_roc_auc": 0.9012}, criteria(delta=0.002), champion=5,
                    champion_scores={"test_roc_auc": 0.8899})
    assert beaten.passed
    assert beaten.line == ("promoted version 7 to champion: test_roc_auc 0.9012 vs 0.8899 "
                           "(version 5)")
    kept = decide("hotels", 7, {"test_roc_auc": 0.8905}, criteria(delta=0.002), champion=5,
                  champion_scores={"test_roc_auc": 0.8899})
    assert not kept.passed
    assert kept.line == "kept champion version 5: test_roc_auc 0.8905 < 0.8899 + 0.002"
    # a tie beats the champion by 0: enough when min_delta is 0
    assert decide("hotels", 7, {"test_roc_auc": 0.8899}, criteria(), champion=5,
                  champion_scores={"test_roc_auc": 0.8899}).passed


def test_lower_is_better_for_regression():
    rmse = criteria(delta=0.01, primary="test_root_mean_squared_error", higher=False)
    kept = decide("prices", 3, {"test_root_mean_squared_error": 1.25}, rmse, champion=2,
                  champion_scores={"test_root_mean_squared_error": 1.2})
    assert kept.line == ("kept champion version 2: test_root_mean_squared_error 1.2500 > "
                         "1.2000 - 0.01")
    assert decide("prices", 3, {"test_root_mean_squared_error": 1.1}, rmse, champion=2,
                  champion_scores={"test_root_mean_squared_error": 1.2}).passed


def test_bounds_hold_even_when_the_champion_is_beaten():
    d = decide("hotels", 7, {"test_roc_auc": 0.95, "test_log_loss": 0.6},
               criteria({"test_log_loss": {"max": 0.5}}), champion=5,
               champion_scores={"test_roc_auc": 0.9})
    assert not d.passed
    assert d.line == "kept champion version 5: test_log_loss 0.6000 > max 0.5"
    assert "test_roc_auc 0.9500 vs 0.9000 (version 5): beats the champion" in d.reasons


def test_a_champion_that_cannot_score_is_named_and_the_bounds_decide():
    problem = "it needs columns these rows lack: weight"
    passed = decide("toy", 2, {"test_roc_auc": 0.9}, criteria({"test_roc_auc": {"min": 0.5}}),
                    champion=1, problem=problem)
    assert passed.passed
    assert passed.line == ("promoted version 2 to champion: champion version 1 cannot score "
                           f"these rows ({problem}); bounds met: test_roc_auc 0.9000 >= min 0.5")
    failed = decide("toy", 2, {"test_roc_auc": 0.9}, criteria({"test_roc_auc": {"min": 0.95}}),
                    champion=1, problem=problem)
    assert failed.line == "kept champion version 1: test_roc_auc 0.9000 < min 0.95"
    assert f"champion version 1 cannot score these rows ({problem}): the bounds decide" in (
        failed.reasons)


def test_without_beat_champion_the_bounds_decide():
    d = decide("hotels", 4, {"test_roc_auc": 0.7}, criteria(beat=False), champion=3)
    assert d.passed
    assert d.line == ("promoted version 4 to champion: test_roc_auc 0.7000, no bounds set; "
                      "champion version 3 not compared (beat_champion=false)")


def test_a_champion_from_another_split_is_flagged():
    d = decide("hotels", 7, {"test_roc_auc": 0.88}, criteria(), champion=5,
               champion_scores={"test_roc_auc": 0.94}, other_split=True)
    assert d.line == ("kept champion version 5: test_roc_auc 0.8800 < 0.9400 (champion version 5 "
                      "came from another split: it may have trained on some of these rows)")


def test_a_version_that_is_the_champion_already_stays():
    d = decide("hotels", 5, {"test_roc_auc": 0.9}, criteria(), champion=5)
    assert d.passed and d.line == "version 5 is the champion already"


def test_bounds_name_metrics_the_task_reports():
    assert {"test_roc_auc", "test_log_loss", "test_recall"} <= set(metric_names("binary"))
    assert set(metric_names("multiclass")) == {"test_accuracy_score", "test_f1_score",
                                               "test_log_loss"}
    assert "test_r2_score" in metric_names("regression")


# ------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("override,words", [
    ("registry.gate.metrics={test_rocauc: {min: 0.8}}",
     "registry.gate.metrics.test_rocauc: not a test metric of a binary task (did you mean "
     "'test_roc_auc'?); the metrics: test_roc_auc, test_log_loss,"),
    ("registry.gate.metrics={test_roc_auc: {mn: 0.8}}",
     "registry.gate.metrics.test_roc_auc.mn: unknown key (did you mean 'min'?)"),
    ("registry.gate.metrics={test_roc_auc: {min: high}}",
     "registry.gate.metrics.test_roc_auc.min='high': must be a number"),
    ("registry.gate.metrics={roc_auc: {min: 0.8}}",
     "registry.gate.metrics.roc_auc: the gate reads test metrics (test_...)"),
    ("registry.gate.metrics={test_roc_auc: {min: 0.9, max: 0.8}}",
     "registry.gate.metrics.test_roc_auc: min 0.9 is above max 0.8"),
    ("registry.gate.min_delta=-0.1", "registry.gate.min_delta=-0.1: must be a number, 0 or more"),
    ("registry.name=../champions", "registry.name='../champions': must be a plain name"),
    ("registry.require_promotion=maybe", "registry.require_promotion='maybe': must be true or"),
    ("+registry.gate.beat_champoin=false", "registry.gate.beat_champoin: unknown key (did you "
                                           "mean 'beat_champion'?)"),
    ("+registry.gate.metrics.test_roc_auc.min=0.9x",
     "registry.gate.metrics.test_roc_auc.min='0.9x': must be a number"),
])
@pytest.mark.no_store  # it checks that no store is made
def test_gate_config_errors_exit_2_before_any_run(demo_lake, override, words):
    result = invoke(demo_lake, "run", override)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (demo_lake / "mlflow.db").exists()  # found out before any run


def test_the_registry_keys_are_in_the_resolved_config():
    cfg = compose()
    assert cfg.registry.name == "hotel_bookings"  # the dataset's name
    assert cfg.registry.gate.beat_champion is True and cfg.registry.gate.min_delta == 0
    with pytest.raises(ConfigError, match="registry.gate.metrics="):
        compose("registry.gate.metrics=0.85")


# ----------------------------------------------------------------------------- end to end


def invoke(folder: Path, *args: str):
    return CliRunner().invoke(app, [*args, f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"])


def store(folder: Path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return MlflowClient()


def versions(folder: Path, name: str = "hotel_bookings") -> dict[int, dict]:
    """Version -> its tags; the aliases under 'aliases'."""
    client = store(folder)
    aliases = client.get_registered_model(name).aliases
    return {int(v.version): dict(v.tags) | {"aliases": sorted(
        a for a, n in aliases.items() if int(n) == int(v.version))}
        for v in client.search_model_versions(f"name = '{name}'")}


def latest(folder: Path, step: str | None = None) -> pd.Series:
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["trainpipe"], order_by=["start_time DESC"])
    if step is None:
        return df[df["tags.trainpipe.kind"] == "pipeline"].iloc[0]
    return df[df["tags.trainpipe.step"] == step].iloc[0]


def gate_report(folder: Path) -> dict:
    run_id = latest(folder, "register")["run_id"]
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="gate_report.json")
    return json.loads(Path(path).read_text())


def recent(stamp: str) -> bool:
    return datetime.now(UTC) - datetime.fromisoformat(stamp) < timedelta(minutes=10)


def test_register_gate_promote_and_rollback(finished_lake):
    folder = finished_lake.folder
    # 1. the first version (`trainpipe run *FAST`) passes on the bounds alone and becomes the
    # champion
    assert ("promoted version 1 to champion: no champion before; test_roc_auc"
            in finished_lake.stdout)
    first = latest(folder)
    assert first["tags.trainpipe.gate"] == "passed"
    assert first["tags.trainpipe.registered_model"] == "hotel_bookings"
    assert first["tags.trainpipe.registered_version"] == "1"
    v1 = versions(folder)[1]
    assert v1["aliases"] == ["challenger", "champion"]
    assert v1["trainpipe.gate"] == "passed" and v1["trainpipe.champion.previous"] == "none"
    assert v1["trainpipe.champion.why"].startswith(
        f"gate passed in pipeline run {first['run_id']}: promoted version 1")
    assert store(folder).get_model_version("hotel_bookings", "1").source == (
        first["tags.trainpipe.model_uri"])

    # 2. a worse model: registered as the challenger, the champion stays, exit 0
    result = invoke(folder, "run", *WORSE)
    assert result.exit_code == 0, result.output
    worse = latest(folder)
    line = (f"kept champion version 1: test_roc_auc {worse['metrics.test_roc_auc']:.4f} < "
            f"{first['metrics.test_roc_auc']:.4f}")
    assert line in " ".join(result.output.split())
    assert "another split" not in result.output  # the champion's own test rows
    assert worse["tags.trainpipe.gate"] == "failed"
    assert worse["tags.trainpipe.gate.decision"] == line
    tags = versions(folder)
    assert tags[1]["aliases"] == ["champion"] and tags[2]["aliases"] == ["challenger"]
    assert tags[2]["trainpipe.gate"] == "failed" and tags[2]["trainpipe.gate.decision"] == line
    # the champion was scored here, on the same test rows: it scores what it scored then
    report = gate_report(folder)
    assert report["champion_before"] == 1 and report["champion_after"] == 1
    assert report["scores"]["champion"]["test_roc_auc"] == pytest.approx(
        first["metrics.test_roc_auc"], abs=1e-12)
    assert report["scores"]["new"]["test_roc_auc"] == worse["metrics.test_roc_auc"]
    assert latest(folder, "register")["metrics.champion_test_roc_auc"] == pytest.approx(
        first["metrics.test_roc_auc"])

    # 3. the same with require_promotion (for CI/CD): exit 4, though the run is up to date
    result = invoke(folder, "run", *WORSE, "registry.require_promotion=true")
    assert result.exit_code == 4, result.output
    assert "up to date" in result.output
    assert (f"not promoted: version 2 of hotel_bookings (registry.require_promotion=true): "
            f"{line}") in " ".join(result.output.split())
    assert "Traceback" not in result.output

    # 4. a re-run registers nothing new: neither up to date, nor with register redone
    assert invoke(folder, "run", *WORSE).exit_code == 0
    result = invoke(folder, "run", *WORSE, "--from", "register", "--force")
    assert result.exit_code == 0, result.output
    assert line in " ".join(result.output.split())
    assert sorted(versions(folder)) == [1, 2]
    assert gate_report(folder)["registered_now"] is False

    # 5. promote by hand: recorded who, when and why
    result = invoke(folder, "registry", "promote", "hotel_bookings", "2", "--reason",
                    "canary looked fine")
    assert result.exit_code == 0, result.output
    assert "champion of hotel_bookings: version 2 (was version 1)" in result.output
    tags = versions(folder)
    assert tags[2]["aliases"] == ["challenger", "champion"]
    assert tags[2]["trainpipe.champion.why"] == "canary looked fine"
    assert tags[2]["trainpipe.champion.set_by"] == getpass.getuser()
    assert recent(tags[2]["trainpipe.champion.set_at"])
    assert tags[2]["trainpipe.champion.previous"] == "1"
    assert tags[1]["trainpipe.champion.unset_why"] == (
        "version 2 became champion: canary looked fine")

    # 6. rollback: the champion goes back to the version that held it before
    result = invoke(folder, "registry", "rollback", "hotel_bookings", "--reason", "alerts")
    assert result.exit_code == 0, result.output
    assert "champion of hotel_bookings: version 1 (rolled back from version 2)" in result.output
    tags = versions(folder)
    assert tags[1]["aliases"] == ["champion"]
    assert tags[1]["trainpipe.champion.why"] == "rollback from version 2: alerts"
    assert tags[1]["trainpipe.champion.set_by"] == getpass.getuser()
    assert recent(tags[1]["trainpipe.champion.set_at"])
    result = invoke(folder, "registry", "rollback", "hotel_bookings")
    assert result.exit_code == 2
    assert ("nothing to roll back to: version 1 of hotel_bookings is the first champion") in (
        " ".join(result.output.split()))

    # 7. the list: versions with aliases, train runs, gate and test metrics
    result = trainpipe("registry", cwd=folder)  # (a wide terminal: run ids stay whole)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    client = store(folder)
    for number in (1, 2):
        assert client.get_model_version("hotel_bookings", str(number)).run_id in text
    assert f"roc_auc {first['metrics.test_roc_auc']:.4f}" in text
    assert "champion: version 1, set " in text and "rollback from version 2: alerts" in text
    assert "challenger: version 2" in text

    # 8. another seed, another test split: the champion may have trained on these rows
    result = invoke(folder, "run", *FAST, "seed=7")
    assert result.exit_code == 0, result.output
    assert ("(champion version 1 came from another split: it may have trained on some of "
            "these rows)") in " ".join(result.output.split())


def test_registry_commands_name_what_is_wrong(finished_lake):
    folder = finished_lake.folder  # after `trainpipe run *FAST`: version 1, the champion
    result = invoke(folder, "registry", "hotels")
    assert result.exit_code == 2
    assert "no registered model 'hotels' in sqlite:///" in result.output
    assert "(registered models: hotel_bookings)" in result.output
    result = invoke(folder, "registry", "promote", "hotel_bookings", "9")
    assert result.exit_code == 2 and "hotel_bookings has no version 9 (versions: 1)" in (
        result.output)
    result = invoke(folder, "registry", "promote", "hotel_bookings", "1")
    assert result.exit_code == 2
    assert "version 1 of hotel_bookings is the champion already" in result.output


def test_a_champion_on_other_columns_is_named_and_the_bounds_decide(task_config):
    conf = task_config("binary")
    folder = conf.parent
    args = ["--config-dir", str(conf), "dataset=toy_binary", "model.params.n_estimators=20"]
    assert invoke(folder, "run", *args).exit_code == 0
    # the data loses a column: the champion needs it and cannot score these rows
    source = folder / "binary.csv"
    task_table("binary").drop(columns=["weight"]).to_csv(source, index=False)
    dataset = conf / "dataset/toy_binary.yaml"
    dataset.write_text("\n".join(line for line in dataset.read_text().splitlines()
                                 if not line.startswith("  weight:")))

    result = invoke(folder, "run", *args, "registry.gate.metrics={test_roc_auc: {min: 0.999}}")
    assert result.exit_code == 0, result.output
    new = latest(folder)["metrics.test_roc_auc"]
    assert f"kept champion version 1: test_roc_auc {new:.4f} < min 0.999" in " ".join(
        result.output.split())
    report = gate_report(folder)
    assert report["champion_problem"] == "it needs columns these rows lack: weight"
    assert ("champion version 1 cannot score these rows (it needs columns these rows lack: "
            "weight): the bounds decide") in report["reasons"]

    # bounds it meets: promoted; the same model is the same version (registered once)
    result = invoke(folder, "run", *args, "registry.gate.metrics={test_roc_auc: {min: 0.5}}")
    assert result.exit_code == 0, result.output
    assert ("promoted version 2 to champion: champion version 1 cannot score these rows (it "
            "needs columns these rows lack: weight); bounds met: test_roc_auc "
            f"{new:.4f} >= min 0.5") in " ".join(result.output.split())
    tags = versions(folder, "toy_binary")
    assert sorted(tags) == [1, 2] and tags[2]["aliases"] == ["challenger", "champion"]


def test_a_champion_tested_on_these_rows_is_not_scored_again(finished_lake):
    """Its recorded test metrics are what scoring it again would give: its model is not even
    loaded. Tested on these rows another way (here: another configured positive class), it
    is loaded and scored."""
    folder = finished_lake.folder  # after `trainpipe run *FAST`

    def hide_model(version: int) -> None:  # scoring the version would fail now
        client = store(folder)
        source = client.get_model_version("hotel_bookings", str(version)).source
        files = client.get_logged_model(source.removeprefix("models:/")).artifact_location
        pickle = Path(files.removeprefix("file://")) / "model.pkl"
        pickle.rename(pickle.with_suffix(".away"))

    first = latest(folder)
    hide_model(1)
    result = invoke(folder, "run", *FAST, "--force")  # the same rows: version 2
    assert result.exit_code == 0, result.output
    report = gate_report(folder)
    assert report["champion_before"] == 1 and report["champion_problem"] is None
    assert report["scores"]["champion"]["test_roc_auc"] == first["metrics.test_roc_auc"]
    assert report["champion_after"] == 2  # a tie passes with min_delta 0

    hide_model(2)
    result = invoke(folder, "run", *FAST, "--force", "dataset.positive_class=1")
    assert result.exit_code == 1  # it was loaded to be scored
    assert "No such file or directory" in result.output and "model.pkl" in result.output
