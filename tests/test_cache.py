"""Never redo work, never lose work: content-addressed caching, resume, safe publishing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import FAST, trainpipe
from trainpipe import cache, config, demo
from trainpipe.cli import app
from trainpipe.lake import Lake

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

STEPS = ["ingest", "validate", "split", "features", "train", "evaluate"]


def invoke(folder: Path, *args: str):
    return CliRunner().invoke(app, [*args, f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"])


def step_runs(folder: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"])


def ran(folder: Path, result=None) -> list[str]:
    """The steps the latest invocation ran: the child runs of its pipeline run (a reused
    step makes none), or none when it found everything up to date (and made no run)."""
    if result is not None and "up to date" in result.stdout:
        return []
    parent = latest_parent(folder)
    df = step_runs(folder)
    children = df[df["tags.mlflow.parentRunId"] == parent["run_id"]]
    return [s for s in STEPS if s in set(children["tags.trainpipe.step"])]


def latest_parent(folder: Path) -> pd.Series:
    df = step_runs(folder)
    return df[df["tags.trainpipe.kind"] == "pipeline"].iloc[0]


def reused(parent: pd.Series) -> list[str]:
    return [s for s in STEPS if isinstance(parent.get(f"tags.trainpipe.reused.{s}"), str)]


def test_mlflow_is_imported_only_where_runs_are_written(demo_lake):
    """The pipeline's process never imports MLflow: a full run writes its runs (and
    registers its model) through the tracker process; an up-to-date run writes none, and
    loads no pandas, numpy or pyarrow either (deferred.py: their imports stay shells)."""
    def run() -> tuple[str, set[str], set[str]]:  # printed; packages, modules imported
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "trainpipe", "run", *FAST],
            cwd=demo_lake, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                   if line.startswith("import time:")}
        return result.stdout, {m.split(".")[0] for m in modules}, modules

    loaded = {"pandas.core.frame", "numpy.linalg", "pyarrow.lib"}  # only when executed
    config.compose(FAST)  # kept composed: the runs need not import Hydra either
    printed, packages, modules = run()
    assert "register" in printed and "sklearn" in packages and loaded <= modules
    assert "mlflow" not in packages and "hydra" not in packages
    printed, packages, modules = run()
    assert "up to date" in printed
    assert "mlflow" not in packages and "hydra" not in packages
    assert not loaded & modules


def test_the_change_matrix(finished_lake):
    folder = finished_lake.folder  # after `trainpipe run *FAST` on the demo lake
    assert ran(folder) == STEPS
    first_model = latest_parent(folder)["tags.trainpipe.model_uri"]
    first_parent = latest_parent(folder)["run_id"]

    # nothing changed: nothing is redone and no run is made; the same model is the result
    runs_before = len(step_runs(folder))
    result = invoke(folder, "run", *FAST)
    assert result.exit_code == 0, result.output
    assert ran(folder, result) == []
    assert len(step_runs(folder)) == runs_before
    assert "up to date" in result.stdout
    assert f"model       {first_model}" in result.stdout
    assert "test_roc_auc" in result.stdout
    assert f"made by run {latest_parent(folder)['run_id']}" in result.stdout

    # a model parameter: train and what follows; the parent run lists the reused steps
    assert invoke(folder, "run", "model.params.n_estimators=25").exit_code == 0
    assert ran(folder) == ["train", "evaluate"]
    parent = latest_parent(folder)
    assert reused(parent) == ["validate", "split", "features"]
    assert parent["tags.trainpipe.reused.split"].endswith(f"made by run {first_parent}")
    assert parent["metrics.test_roc_auc"] > 0.5

    # the split ratio: from split on
    assert invoke(folder, "run", *FAST, "split.test_size=0.2").exit_code == 0
    assert ran(folder) == ["split", "features", "train", "evaluate"]

    # preprocessing: from features on
    assert invoke(folder, "run", *FAST, "model.preprocessing.categorical_encoding=onehot"
                  ).exit_code == 0
    assert ran(folder) == ["features", "train", "evaluate"]

    # one value in the source data: everything
    source = folder / "lake/raw/hotel_bookings/train.csv"
    df = pd.read_csv(source)
    df.loc[0, "lead_time"] += 1
    df.to_csv(source, index=False)
    assert invoke(folder, "run", *FAST).exit_code == 0
    assert ran(folder) == STEPS

    # --force and force=true: everything, and --from/--to slice
    assert invoke(folder, "run", *FAST, "--force").exit_code == 0
    assert ran(folder) == STEPS
    assert invoke(folder, "run", *FAST, "force=true", "--from", "train").exit_code == 0
    assert ran(folder) == ["train", "evaluate"]
    assert invoke(folder, "run", *FAST, "--force", "--to", "split").exit_code == 0
    assert ran(folder) == ["ingest", "validate", "split"]


def test_a_steps_code_version_covers_the_trainpipe_code_it_uses():
    from trainpipe.steps import features, train, validate

    assert {"trainpipe.steps.features", "trainpipe.schema"} <= set(cache.code_modules(features))
    assert "trainpipe.schema" in cache.code_modules(validate)
    assert "trainpipe.schema" not in cache.code_modules(train)
    assert cache.code_version(features) != cache.code_version(train)


def test_after_an_exception_the_same_config_resumes_where_it_failed(demo_lake, monkeypatch):
    from trainpipe.steps import train

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the fit ran out of memory")

    folder = demo_lake
    with monkeypatch.context() as patched:  # a failure the config has no part in
        patched.setattr(train, "run", out_of_memory)
        result = invoke(folder, "run", *FAST)
    assert result.exit_code == 1, result.output
    assert "MemoryError: the fit ran out of memory" in result.output
    assert latest_parent(folder)["status"] == "FAILED"
    result = invoke(folder, "run", *FAST)
    assert result.exit_code == 0, result.output
    assert ran(folder) == ["train", "evaluate"]  # validate, split, features: reused


def test_a_step_run_again_reruns_the_steps_reading_it(finished_lake):
    folder = finished_lake.folder  # after `trainpipe run *FAST`
    first_model = latest_parent(folder)["tags.trainpipe.model_uri"]
    assert invoke(folder, "clean", "--step", "train", "--keep", "0").exit_code == 0
    assert invoke(folder, "run", *FAST).exit_code == 0
    assert ran(folder) == ["train", "evaluate"]  # never a new model with the old metrics
    assert latest_parent(folder)["tags.trainpipe.model_uri"] != first_model


def test_a_store_in_another_folder_never_reuses_a_model_it_does_not_hold(finished_lake):
    """`sqlite:///mlflow.db` in two folders is two stores sharing one lake: the data steps
    are shared, the model is trained again into the second store."""
    folder = finished_lake.folder  # `trainpipe run *FAST` ran here, its store in this folder
    other = folder / "other"
    other.mkdir()
    lake = folder / "lake"
    shared_lake = [f"lake.root={lake}", f"dataset.source={lake}/raw/hotel_bookings/train.csv"]
    result = trainpipe("run", *FAST, *shared_lake, cwd=other)
    assert result.returncode == 0, result.stderr
    assert ran(other) == ["train", "evaluate"]
    model_uri = latest_parent(other)["tags.trainpipe.model_uri"]
    assert mlflow.pyfunc.load_model(model_uri) is not None  # it is in this store


def test_inspect_and_clean(finished_lake):
    folder = finished_lake.folder  # after `trainpipe run model.params.n_estimators=20`
    for n in (21, 22):
        assert invoke(folder, "run", f"model.params.n_estimators={n}").exit_code == 0
    result = invoke(folder, "inspect", "model.params.n_estimators=22")
    assert result.exit_code == 0, result.output
    for step in STEPS[1:]:
        assert step in result.stdout
    assert result.stdout.count("published") == 6
    result = invoke(folder, "inspect", "model.params.n_estimators=99")
    assert result.stdout.count("published") == 3 and result.stdout.count("missing") == 3

    train_outputs = folder / "lake/models/hotel_bookings/train"
    assert len(list(train_outputs.iterdir())) == 3
    result = invoke(folder, "clean", "--step", "train", "--keep", "1")
    assert result.exit_code == 0, result.output
    assert "2 output(s) removed" in result.stdout
    assert len(list(train_outputs.iterdir())) == 1
    result = invoke(folder, "run", "model.params.n_estimators=22")
    assert result.exit_code == 0
    assert ran(folder, result) == []  # the newest output was kept
    result = invoke(folder, "clean", "--step", "trian")
    assert result.exit_code == 2
    assert "--step trian: is not a step; steps with published outputs: validate," in result.output
    assert invoke(folder, "clean", "--keep", "0").exit_code == 0
    assert (folder / "lake/raw/hotel_bookings/train.csv").exists()  # never raw data
    # what the current (default) config needs stays: the data outputs every run above shares
    assert len(list((folder / "lake/landing").rglob("manifest.json"))) == 2
    assert not any(p.is_file() for p in (folder / "lake/models").rglob("*"))


def published_outputs_are_whole(lake_root: Path) -> int:
    """Every manifest names files that exist with the recorded digests. Returns the count."""
    lake = Lake(str(lake_root))
    count = 0
    for manifest_path in lake_root.rglob("manifest.json"):
        prefix = str(manifest_path.parent.relative_to(lake_root))
        manifest = json.loads(manifest_path.read_text())
        for name in manifest["files"]:
            lake.read(prefix, name)  # raises if missing
            data = (manifest_path.parent / manifest["files"][name]["path"]).read_bytes()
            import hashlib

            assert hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"]
        count += 1
    return count


def start(folder: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.Popen([sys.executable, "-m", "trainpipe", "run", *args], cwd=folder,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: a "lost machine" kill


# trainpipe with one change: at the moment named by its first argument, the process says so
# in a marker file of that name and waits to be killed. Polling the lake for a moment
# missed it on a fast machine (and needed big data to be slow enough); this hits it every
# time, on small data.
#   features, train: as that step starts (the steps before it have run; their outputs are
#     published in the background, see wait_for_manifests);
#   publishing: after the first features file is written, before its manifest.
PAUSE_AT = """
import importlib, sys, time
from pathlib import Path
moment = sys.argv.pop(1)
def pause():
    Path(moment).touch()
    time.sleep(3600)
if moment == "publishing":
    import trainpipe.lake as lake
    write = lake._write_atomic
    def write_then_pause(fs, path, data):
        write(fs, path, data)
        if "/features/" in path and not path.endswith("manifest.json"):
            pause()
    lake._write_atomic = write_then_pause
else:
    importlib.import_module(f"trainpipe.steps.{moment}").run = lambda *a, **k: pause()
from trainpipe.cli import main
sys.argv[0] = "trainpipe"
main()
"""


def start_paused_at(folder: Path, moment: str, *args: str, warm: bool = True
                    ) -> subprocess.Popen:
    """`warm=False`: the run starts its own tracker, in its process group (see test_warm)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if not warm:
        env["TRAINPIPE_WARM_TRACKER"] = "0"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AT, moment, "run", *args],
                            cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: a "lost machine" kill
    deadline = time.monotonic() + 120
    while not (folder / moment).exists():
        assert proc.poll() is None, f"ended before {moment}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"never reached {moment}"
        time.sleep(0.05)
    return proc


def wait_for_manifests(folder: Path, steps: list[str], timeout: float = 120) -> None:
    """Outputs are published in the background while the next step runs: wait for them."""
    deadline = time.monotonic() + timeout
    while not all(list(folder.glob(f"lake/*/*/{s}/*/manifest.json")) for s in steps):
        assert time.monotonic() < deadline, f"{steps} not all published in time"
        time.sleep(0.05)


def wait_for_no_running(folder: Path, timeout: float = 240) -> pd.DataFrame:
    deadline = time.monotonic() + timeout
    while "RUNNING" in set((df := step_runs(folder))["status"]):
        assert time.monotonic() < deadline, "runs still RUNNING"
        time.sleep(0.2)
    return df


# features (while that step runs), publishing: the pipeline's process is killed; its tracker
# process sees it go and ends the runs KILLED. machine (while train runs): the pipeline and
# its tracker die together (a lost machine); the next run marks what they left RUNNING as
# KILLED.
@pytest.mark.parametrize("moment", ["features", "publishing", "machine"])
def test_kill_9_then_resume(demo_lake, moment):
    folder = demo_lake
    args = FAST
    earlier = {"features": ["validate", "split"], "machine": ["validate", "split", "features"],
               "publishing": ["validate", "split"]}[moment]
    # a lost machine takes the tracker too: one started by the run, in its process group
    proc = start_paused_at(folder, "train" if moment == "machine" else moment, *args,
                           warm=moment != "machine")
    wait_for_manifests(folder, earlier)
    if moment == "machine":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    published_outputs_are_whole(folder / "lake")
    finished = [s for s in STEPS[1:] if list((folder / "lake").glob(f"*/*/{s}/*/manifest.json"))]
    assert finished == earlier  # the steps before the moment, and not one more
    if moment == "publishing":  # a features file is written, its manifest is not
        assert list((folder / "lake/features").glob("*/features/*/*/*"))
    if moment == "machine":
        before = step_runs(folder)
        assert "RUNNING" in set(before["status"])  # nobody was left to clean up
    else:
        before = wait_for_no_running(folder)  # the tracker ended them
    unfinished = set(before[before["status"] != "FINISHED"]["run_id"])
    assert unfinished  # the parent, at least

    result = trainpipe("run", *args, cwd=folder)
    assert result.returncode == 0, result.stderr
    after = step_runs(folder)
    assert "RUNNING" not in set(after["status"])
    assert set(after[after["run_id"].isin(unfinished)]["status"]) == {"KILLED"}
    assert reused(latest_parent(folder)) == finished  # reuses what finished
    published_outputs_are_whole(folder / "lake")


def test_concurrent_runs_share_upstream_and_never_overwrite(finished_lake):
    folder = finished_lake.folder  # after `trainpipe run *FAST`: the store and lake exist
    source = folder / "lake/raw/hotel_bookings/train.csv"
    demo.hotel_bookings(rows=4000, seed=9).to_csv(source, index=False)  # all steps rerun

    configs = [["model.params.n_estimators=20"], ["model.params.n_estimators=30"],
               ["model.params.n_estimators=30"]]  # the last two race on every fingerprint
    procs = [start(folder, *c) for c in configs]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr

    published_outputs_are_whole(folder / "lake")
    for step in ("validate", "split"):
        assert len(list((folder / f"lake/landing/hotel_bookings/{step}").iterdir())) == 2
    assert len(list((folder / "lake/models/hotel_bookings/train").iterdir())) == 3
    df = step_runs(folder)
    parents = df[df["tags.trainpipe.kind"] == "pipeline"]
    assert len(parents) == 4 and set(parents["status"]) == {"FINISHED"}
    models = set(parents.head(3)["tags.trainpipe.model_uri"])
    assert len(models) >= 2  # 20 trees and 30 trees are different models
