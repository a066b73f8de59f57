"""`trainpipe run tracking=server lake=s3` against the real stack: PostgreSQL holds the runs,
the artifacts bucket the model and plots, the lake bucket the landing and feature zones."""

import mlflow
import pytest
from integration_support import (
    ARTIFACTS_BUCKET,
    FAST,
    LAKE_BUCKET,
    check_manifests,
    run_env,
    runs_of,
    s3_keys,
    start_trainpipe,
    trainpipe,
    upload_demo,
)

from trainpipe import demo

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

STEPS = {"ingest", "validate", "split", "features", "train", "evaluate", "register"}


def load_and_predict(server, model_uri: str):
    mlflow.set_tracking_uri(server.tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)  # artifacts come through the server
    rows = demo.hotel_bookings(rows=50, seed=9).drop(columns=["booking_status"])
    return model.predict(rows)


def test_run_on_the_stack(server, database, moto, aws_env, tmp_path):
    upload_demo(moto, "e2e")
    result = trainpipe("run", "tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/e2e",
                       "tracking.experiment=e2e", *FAST, cwd=tmp_path,
                       env=run_env(server, aws_env))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tracking {server.tracking_uri}" in " ".join(result.stdout.split())

    # The runs are rows in PostgreSQL: one parent, one child per step, all FINISHED.
    runs = runs_of(database, "e2e")
    assert len(runs) == 8 and {r["status"] for r in runs} == {"FINISHED"}
    (parent,) = [r for r in runs if r["tags"].get("trainpipe.kind") == "pipeline"]
    assert {r["tags"].get("trainpipe.step") for r in runs if r is not parent} == STEPS
    params = dict(database.query("select key, value from params where run_uuid = %s",
                                 (parent["run_id"],)))
    assert params["lake.root"] == f"s3://{LAKE_BUCKET}/e2e"
    assert params["tracking.uri"] == server.tracking_uri and params["seed"] == "42"
    metrics = dict(database.query("select key, value from latest_metrics where run_uuid = %s",
                                  (parent["run_id"],)))
    assert 0.6 < metrics["test_roc_auc"] <= 1.0

    # The model and the plots are objects in the artifacts bucket, not files on this machine.
    artifacts = s3_keys(moto, ARTIFACTS_BUCKET, "mlartifacts/")
    assert any(k.endswith("/MLmodel") for k in artifacts)
    assert any(k.endswith("/model.pkl") for k in artifacts)
    assert sum(k.endswith(".png") for k in artifacts) >= 4
    assert any(k.endswith(f"{parent['run_id']}/artifacts/config.yaml") for k in artifacts)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()

    # The landing and feature zones are on S3, each output with its manifest.
    manifests = check_manifests(moto, "e2e")
    zones = {m.split("/")[1] for m in manifests}
    assert {"landing", "features", "models"} <= zones
    assert not (tmp_path / "lake").exists()

    # The model loads back through the server and predicts raw rows.
    predictions = load_and_predict(server, parent["tags"]["trainpipe.model_uri"])
    assert len(predictions) == 50 and set(predictions) <= {0, 1}

    # A second run reuses every published output from the S3 lake.
    again = trainpipe("run", "tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/e2e",
                      "tracking.experiment=e2e", *FAST, cwd=tmp_path,
                      env=run_env(server, aws_env))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date" in again.stdout  # nothing to redo: no new run either
    assert f"model       {parent['tags']['trainpipe.model_uri']}" in again.stdout


@pytest.mark.slow
def test_two_pipelines_at_once(server, database, moto, aws_env, tmp_path):
    """Same server, same lake, same config, at the same time (--force: both do every step
    and publish to the same prefixes): both finish, with their own runs and models."""
    upload_demo(moto, "twice")
    args = ("run", "tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/twice",
            "tracking.experiment=twice", "--force", *FAST)
    procs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        procs.append(start_trainpipe(*args, cwd=tmp_path / str(i), env=run_env(server, aws_env)))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out + err

    runs = runs_of(database, "twice")
    parents = [r for r in runs if r["tags"].get("trainpipe.kind") == "pipeline"]
    assert len(parents) == 2 and len(runs) == 16
    assert {r["status"] for r in runs} == {"FINISHED"}
    ids = {r["run_id"] for r in runs}
    for parent in parents:
        children = database.query(
            "select run_uuid from tags where key = 'mlflow.parentRunId' and value = %s",
            (parent["run_id"],))
        assert len(children) == 7 and {c for (c,) in children} <= ids
    model_uris = {p["tags"]["trainpipe.model_uri"] for p in parents}
    assert len(model_uris) == 2  # two models, neither overwrote the other
    for uri in model_uris:
        assert len(load_and_predict(server, uri)) == 50

    # Both wrote every output, each into its own attempt folder; the manifests that won
    # are whole and consistent.
    manifests = check_manifests(moto, "twice")
    keys = s3_keys(moto, LAKE_BUCKET, "twice/landing/")
    for manifest in manifests:
        if "/landing/" in manifest:
            prefix = manifest.rsplit("/", 1)[0] + "/"
            attempts = {k[len(prefix):].split("/")[0] for k in keys
                        if k.startswith(prefix) and not k.endswith("manifest.json")}
            assert len(attempts) == 2, (manifest, attempts)


@pytest.mark.slow
def test_two_configs_at_once_share_upstream_outputs_on_s3(server, database, moto, aws_env,
                                                          tmp_path):
    """Different model configs at the same time on one S3 lake: the data steps they agree on
    end with one output each, each model its own; nothing is overwritten."""
    upload_demo(moto, "configs")
    base = ("run", "tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/configs",
            "tracking.experiment=configs")
    procs = []
    for trees in (20, 30):
        (tmp_path / str(trees)).mkdir()
        procs.append(start_trainpipe(*base, f"model.params.n_estimators={trees}",
                                     cwd=tmp_path / str(trees), env=run_env(server, aws_env)))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err

    manifests = check_manifests(moto, "configs")  # every published output is whole

    def outputs(step: str) -> set[str]:  # fingerprint folders holding a manifest
        return {m.split("/")[-2] for m in manifests if f"/{step}/" in m}

    for step in ("validate", "split", "features"):
        assert len(outputs(step)) == 1, step  # agreed on: one output, shared
    assert len(outputs("train")) == 2 and len(outputs("evaluate")) == 2
    parents = [r for r in runs_of(database, "configs")
               if r["tags"].get("trainpipe.kind") == "pipeline"]
    assert len(parents) == 2 and {r["status"] for r in parents} == {"FINISHED"}
    assert len({p["tags"]["trainpipe.model_uri"] for p in parents}) == 2
