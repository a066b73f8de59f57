"""A published output is trusted only as far as its manifest's digests: a damaged one is
never read (nor followed outside its folder); the pipeline says which, and redoes its step."""

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import FAST
from trainpipe.cli import app
from trainpipe.lake import DamagedOutput, Lake, OutsideLake

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def invoke(folder: Path, *args: str):
    return CliRunner().invoke(app, ["run", *FAST, *args,
                                    f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"])


def published(folder: Path, step: str) -> Path:
    [manifest] = folder.glob(f"lake/*/hotel_bookings/{step}/*/manifest.json")
    return manifest


def output_file(folder: Path, step: str, name: str) -> Path:
    manifest = published(folder, step)
    return manifest.parent / json.loads(manifest.read_text())["files"][name]["path"]


def flip_labels(path: Path) -> None:
    df = pd.read_parquet(path)
    df["booking_status"] = 1 - df["booking_status"]
    df.to_parquet(path, index=False)


def cut_rows(path: Path) -> None:
    pd.read_parquet(path).head(100).to_parquet(path, index=False)


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00not parquet at all")


def edit_manifest(edit):
    def damage(manifest: Path) -> None:
        manifest.write_text(edit(manifest.read_text()))
    return damage


@pytest.fixture
def trained(finished_lake) -> Path:
    """The folder of a finished run (`trainpipe run *FAST`), each test's to damage."""
    return finished_lake.folder


@pytest.mark.parametrize("damage", [flip_labels, cut_rows, garbage], ids=lambda f: f.__name__)
def test_a_damaged_file_is_not_trained_on_its_step_runs_again(trained, damage):
    folder = trained
    damage(output_file(folder, "features", "train.parquet"))
    result = invoke(folder, "model.params.n_estimators=21")  # train reads the features
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "damaged output: train.parquet is not the file that was published" in text
    assert "running features again" in text
    assert "✓ features" in result.output and "✓ train" in result.output
    auc = float(text.split("test_roc_auc ")[-1].split()[0])
    assert auc > 0.7  # trained on the real labels and rows, not the damaged file


@pytest.mark.parametrize("damage, words", [
    (edit_manifest(lambda text: "{ not json"), "not JSON"),
    (edit_manifest(lambda text: json.dumps({"created": "x"})), "it has no `files` mapping"),
    (edit_manifest(lambda text: text.replace(
        json.loads(text)["files"]["train.parquet"]["path"], "../../../../../../etc/hostname")),
     "the entry for 'train.parquet' does not name a file of this output"),
], ids=["not_json", "no_files", "path_outside"])
def test_a_damaged_manifest_is_not_followed(trained, damage, words):
    folder = trained
    damage(published(folder, "split"))
    result = invoke(folder)  # split is needed: its manifest no longer proves anything
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"damaged output: {words}" in text
    assert "running split again" in text
    assert "✓ split" in result.output
    json.loads(published(folder, "split").read_text())  # republished whole


def test_the_parent_runs_metrics_come_from_the_checked_file(trained):
    folder = trained
    metrics = output_file(folder, "evaluate", "metrics.json")
    values = json.loads(metrics.read_text())
    metrics.write_text(json.dumps(values | {"test_roc_auc": 0.999}))
    result = invoke(folder)
    assert result.exit_code == 0, result.output
    assert "metrics.json is not the file that was published" in " ".join(result.output.split())
    assert "0.9990" not in result.output
    assert "✓ evaluate" in result.output  # redone, not believed


def test_a_slice_over_a_damaged_output_names_the_step_to_rerun(trained):
    folder = trained
    garbage(output_file(folder, "features", "train.parquet"))
    result = CliRunner().invoke(app, ["step", "train", "--force", *FAST,
                                      f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"])
    assert result.exit_code == 2
    assert "run from features to make it again: trainpipe run --from features" in " ".join(
        result.output.split())


def test_nothing_is_read_or_written_outside_the_lake_root(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    for prefix in ("landing/../../escape", "/etc/x", "a/../../b"):
        with pytest.raises(OutsideLake, match="would reach outside the lake root"):
            lake.publish(prefix, {"x": b"1"})
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()
    lake.publish("out/fp", {"a.bin": b"ok"}, run_id="r")
    manifest = tmp_path / "lake/out/fp/manifest.json"
    manifest.write_text(manifest.read_text().replace('"path": "', '"path": "../../'))
    with pytest.raises(DamagedOutput, match="does not name a file of this output"):
        lake.read("out/fp", "a.bin")


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system (as root, permissions alone do not stop writes)."""
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_lake_on_a_read_only_folder_is_named(demo_lake, read_only_folder):
    source = demo_lake / "lake/raw/hotel_bookings/train.csv"
    result = invoke(demo_lake, f"lake.root={read_only_folder}", f"dataset.source={source}")
    assert result.exit_code == 2, result.output
    assert f"{read_only_folder}/landing/hotel_bookings/validate/" in result.output
    assert "cannot publish there: the file system is read-only" in " ".join(result.output.split())
    assert "Traceback" not in result.output
