"""`trainpipe clean` never removes what a config needs, shows what it would remove, and can
delete the MLflow models of the train outputs it removes."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.conftest import FAST, Kept, keep
from tests.test_cache import invoke, ran

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

LGBM = ["model=lightgbm", "model.params.n_estimators=30"]
# Up to evaluate: models nobody registered (a registered one is never deleted: see the end)
RUN = ["run", "--to", "evaluate"]


def published(folder: Path, zone: str, step: str) -> set[str]:
    """The fingerprints of `step` with a manifest."""
    return {p.parent.name for p in (folder / "lake" / zone / "hotel_bookings" / step)
            .glob("*/manifest.json")}


def model_uri(folder: Path, fingerprint: str) -> str:
    pointer = folder / "lake/models/hotel_bookings/train" / fingerprint
    manifest = json.loads((pointer / "manifest.json").read_text())
    return json.loads((pointer / manifest["files"]["model.json"]["path"]).read_text())[
        "model_uri"]


def lake_files(folder: Path) -> set[Path]:
    return {p for p in (folder / "lake").rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def forest_lightgbm_forest(tmp_path_factory, empty_store) -> tuple[Kept, str, str]:
    """The issue's story, made once per worker: a forest, then LightGBM (the newest
    outputs), then the forest again, all of it reused. Returns the kept folder, the forest's
    train fingerprint and LightGBM's."""
    found = {}

    def story(folder: Path) -> None:
        assert invoke(folder, *RUN, *FAST).exit_code == 0
        found["forest"] = published(folder, "models", "train")
        assert invoke(folder, *RUN, *LGBM).exit_code == 0
        found["lightgbm"] = published(folder, "models", "train") - found["forest"]
        result = invoke(folder, *RUN, *FAST)
        assert result.exit_code == 0
        assert ran(folder, result) == []

    kept = keep(tmp_path_factory, empty_store, "forest-lightgbm-forest", story)
    [forest], [lightgbm] = found["forest"], found["lightgbm"]
    return kept, forest, lightgbm


@pytest.fixture
def forest_reused_after_lightgbm(forest_lightgbm_forest, monkeypatch):
    """The folder after the issue's story (each test's to change), the forest's train
    fingerprint and LightGBM's."""
    kept, forest, lightgbm = forest_lightgbm_forest
    return kept.put_back(monkeypatch), forest, lightgbm


def test_clean_never_removes_what_the_current_config_needs(forest_reused_after_lightgbm):
    folder, forest, lightgbm = forest_reused_after_lightgbm
    result = invoke(folder, "clean", *FAST)  # --keep 1: the newest (LightGBM's) stays too
    assert result.exit_code == 0, result.output
    assert "0 output(s) removed; kept the 5 output(s) this config needs" in result.stdout
    assert published(folder, "models", "train") == {forest, lightgbm}

    result = invoke(folder, "clean", *FAST, "--keep", "0")
    assert result.exit_code == 0, result.output
    assert f"removed {folder}/lake/models/hotel_bookings/train/{lightgbm}" in result.stdout
    assert "2 output(s) removed; kept the 5 output(s) this config needs" in result.stdout
    assert published(folder, "models", "train") == {forest}
    result = invoke(folder, *RUN, *FAST)
    assert result.exit_code == 0
    assert ran(folder, result) == []  # nothing the forest needs was removed


def test_keep_config_protects_another_config_and_dry_run_removes_nothing(
        forest_reused_after_lightgbm):
    folder, forest, lightgbm = forest_reused_after_lightgbm
    before = lake_files(folder)
    result = invoke(folder, "clean", *FAST, "--keep", "0", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"would remove {folder}/lake/models/hotel_bookings/train/{lightgbm}" in result.stdout
    assert f"would remove {folder}/lake/models/hotel_bookings/evaluate/" in result.stdout
    assert "dry run: 2 output(s) would be removed" in result.stdout
    assert lake_files(folder) == before

    result = invoke(folder, "clean", *FAST, "--keep", "0", "--keep-config", " ".join(LGBM))
    assert result.exit_code == 0, result.output
    assert ("0 output(s) removed; kept the 7 output(s) this config or a --keep-config needs"
            in result.stdout)  # 3 data outputs are shared by both
    assert lake_files(folder) == before
    result = invoke(folder, *RUN, *LGBM)
    assert result.exit_code == 0
    assert ran(folder, result) == []


def test_clean_models_deletes_the_models_of_removed_train_outputs(forest_reused_after_lightgbm):
    folder, forest, lightgbm = forest_reused_after_lightgbm
    lightgbm_uri, forest_uri = model_uri(folder, lightgbm), model_uri(folder, forest)
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    lightgbm_artifacts = Path(client.get_logged_model(lightgbm_uri[len("models:/"):])
                              .artifact_location.removeprefix("file://"))
    assert any(p.is_file() for p in lightgbm_artifacts.rglob("*"))

    result = invoke(folder, "clean", *FAST, "--keep", "0", "--models")
    assert result.exit_code == 0, result.output
    assert f"deleted model {lightgbm_uri} (artifacts at " in result.stdout
    assert "2 output(s) removed, 1 model(s) deleted" in result.stdout
    assert not any(p.is_file() for p in lightgbm_artifacts.rglob("*"))  # the space is back
    with pytest.raises(MlflowException, match="not found"):  # deleted
        client.get_logged_model(lightgbm_uri[len("models:/"):])
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    assert mlflow.pyfunc.load_model(forest_uri) is not None  # the kept one still loads

    # a model the registry serves is left alone, and clean says so
    mlflow.register_model(forest_uri, "hotels")
    result = invoke(folder, "clean", *LGBM, "--keep", "0", "--models")
    assert result.exit_code == 0, result.output
    assert f"left model {forest_uri}: registered as hotels version 1" in result.stdout
    assert "2 output(s) removed, 0 model(s) deleted" in result.stdout
    assert mlflow.pyfunc.load_model(forest_uri) is not None


def test_clean_says_why_it_cannot_tell_what_a_config_needs(demo_lake):
    folder = demo_lake
    result = invoke(folder, "clean", f"dataset.source={folder}/nope.csv")
    assert result.exit_code == 2
    assert ("cannot tell which outputs the current config needs, so nothing was removed: "
            f"{folder}/nope.csv: no such file") in result.output
    result = invoke(folder, "clean", "--keep-config", "modle=lightgbm")
    assert result.exit_code == 2
    assert "--keep-config 'modle=lightgbm': " in result.output
    assert "Traceback" not in result.output
