"""`mlflow run .` runs the pipeline; the run MLflow creates is the pipeline's parent."""

import os
import subprocess

import mlflow
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def mlflow_run(workdir, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    return subprocess.run(["mlflow", "run", str(REPO), "--env-manager", "local", *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def test_mlflow_run_main_and_a_single_step(demo_lake):
    lake = demo_lake / "lake"
    result = mlflow_run(demo_lake, "-P",
                        f"overrides=model.params.n_estimators=20 seed=3 lake.root={lake}")
    assert result.returncode == 0, result.stderr[-3000:]

    mlflow.set_tracking_uri(f"sqlite:///{demo_lake / 'mlflow.db'}")
    df = mlflow.search_runs(search_all_experiments=True)
    top = df[df["tags.mlflow.parentRunId"].isna()]
    assert len(top) == 1  # no duplicate parent
    parent = top.iloc[0]
    assert parent["tags.trainpipe.kind"] == "pipeline"
    assert parent["status"] == "FINISHED"
    assert "model.params.n_estimators=20" in parent["params.overrides"]
    assert parent["params.seed"] == "3"
    assert parent["tags.mlflow.project.entryPoint"] == "main"
    assert parent["tags.trainpipe.git_commit"]  # the project is a git checkout
    assert (df["tags.mlflow.parentRunId"] == parent["run_id"]).sum() == 7  # one per step

    result = mlflow_run(demo_lake, "-e", "validate", "-P", f"overrides=lake.root={lake}")
    assert result.returncode == 0, result.stderr[-3000:]
    df = mlflow.search_runs(search_all_experiments=True)
    validate_parent = df[df["tags.mlflow.project.entryPoint"] == "validate"].iloc[0]
    assert validate_parent["tags.trainpipe.steps"] == "validate"
    assert validate_parent["status"] == "FINISHED"
    # validate's output is published for this config: the run MLflow made records that it
    # was reused (and which run made it) instead of redoing it in a child run
    children = df[df["tags.mlflow.parentRunId"] == validate_parent["run_id"]]
    assert children.empty
    assert validate_parent["tags.trainpipe.reused.validate"].startswith("fingerprint ")

    result = mlflow_run(demo_lake, "-e", "validate", "-P",
                        f"overrides=lake.root={lake} force=true")
    assert result.returncode == 0, result.stderr[-3000:]
    df = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"])
    validate_parent = df[df["tags.mlflow.project.entryPoint"] == "validate"].iloc[0]
    children = df[df["tags.mlflow.parentRunId"] == validate_parent["run_id"]]
    assert list(children["tags.trainpipe.step"]) == ["validate"]
