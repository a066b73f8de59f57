"""Predictions on the real stack: the predict step and `trainpipe predict` reading and
writing S3 (the moto server), runs on the MLflow server (PostgreSQL), and `trainpipe serve`
loading the model through the server from the artifacts bucket."""

import hashlib
import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from integration_support import (
    FAST,
    LAKE_BUCKET,
    check_manifests,
    free_port,
    run_env,
    runs_of,
    s3_keys,
    s3_read,
    trainpipe,
    upload_demo,
)
from mlflow import MlflowClient

from trainpipe import demo

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def test_predictions_on_the_stack(server, database, moto, aws_env, tmp_path):
    env = run_env(server, aws_env)
    upload_demo(moto, "pred")
    rows = demo.hotel_bookings(rows=400, seed=4).drop(columns=["booking_status"])
    rows["id"] += 500_000
    s3 = moto.client()
    s3.put_object(Bucket=LAKE_BUCKET, Key="pred/incoming/score.csv",
                  Body=rows.to_csv(index=False).encode())
    parquet = io.BytesIO()
    rows.to_parquet(parquet, index=False)
    s3.put_object(Bucket=LAKE_BUCKET, Key="pred/incoming/score.parquet", Body=parquet.getvalue())
    common = ("tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/pred",
              "tracking.experiment=pred")

    # the step: predictions published in the S3 lake beside the other zones
    result = trainpipe("run", *common, *FAST,
                       f"dataset.scoring_source=s3://{LAKE_BUCKET}/pred/incoming/score.csv",
                       cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    manifests = [m for m in check_manifests(moto, "pred") if "/predictions/" in m]
    assert len(manifests) == 1 and "pred/predictions/hotel_bookings/predict/" in manifests[0]
    manifest = json.loads(s3_read(moto, LAKE_BUCKET, manifests[0]))
    prefix = manifests[0].rsplit("/", 1)[0]
    step = pd.read_parquet(io.BytesIO(s3_read(
        moto, LAKE_BUCKET, f"{prefix}/{manifest['files']['predictions.parquet']['path']}")))
    [parent] = [r for r in runs_of(database, "pred")
                if r["tags"].get("trainpipe.kind") == "pipeline"]
    model_uri = parent["tags"]["trainpipe.model_uri"]
    # the step names the version the run registered
    [registered] = {r["tags"]["trainpipe.registered_version"] for r in runs_of(database, "pred")
                    if "trainpipe.registered_version" in r["tags"]}
    assert list(step["id"]) == list(rows["id"])
    assert set(step.pop("model_version")) == {f"models:/hotel_bookings/{registered}"}

    # the command: S3 in, S3 out, the run on the server
    output = f"s3://{LAKE_BUCKET}/pred/scored/predictions.parquet"
    scored = trainpipe("predict", *common, "--model", model_uri, "--input",
                       f"s3://{LAKE_BUCKET}/pred/incoming/score.parquet", "--output", output,
                       cwd=tmp_path, env=env)
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert "400 rows scored" in scored.stdout
    got = pd.read_parquet(io.BytesIO(s3_read(moto, LAKE_BUCKET,
                                             "pred/scored/predictions.parquet")))
    assert set(got.pop("model_version")) == {model_uri}  # the command names what it was given
    pd.testing.assert_frame_equal(got, step)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "lake").exists()
    [run] = [r for r in runs_of(database, "pred") if r["tags"].get("trainpipe.kind") == "predict"]
    assert run["status"] == "FINISHED"
    assert run["tags"]["trainpipe.model_version"] == model_uri
    [dataset] = MlflowClient(server.tracking_uri).get_run(run["run_id"]).inputs.dataset_inputs
    assert json.loads(dataset.dataset.profile)["sha256"] == hashlib.sha256(
        parquet.getvalue()).hexdigest()
    assert json.loads(dataset.dataset.source)["uri"] == (
        f"s3://{LAKE_BUCKET}/pred/incoming/score.parquet")

    # invalid rows: exit 3, nothing at the output key
    bad_rows = rows.copy()
    bad_rows.loc[3, "arrival_month"] = 13
    s3.put_object(Bucket=LAKE_BUCKET, Key="pred/incoming/bad.csv",
                  Body=bad_rows.to_csv(index=False).encode())
    bad = trainpipe("predict", *common, "--model", model_uri, "--input",
                    f"s3://{LAKE_BUCKET}/pred/incoming/bad.csv", "--output",
                    f"s3://{LAKE_BUCKET}/pred/scored/bad.parquet", cwd=tmp_path, env=env)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert "arrival_month · less_than_or_equal_to(12) · 1 row · e.g. row 4: 13" in bad.stderr
    assert s3_keys(moto, LAKE_BUCKET, "pred/scored/") == ["pred/scored/predictions.parquet"]

    # serve: MLflow's scoring server gets the model through the tracking server
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainpipe", "serve", *common, "--model",
                             model_uri, "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline, printed = time.monotonic() + 240, []
        for line in proc.stdout:
            printed.append(line)
            if "Ctrl-C stops it." in line or time.monotonic() > deadline:
                break
        assert any(re.search(rf"at http://127\.0\.0\.1:{port} ", p) for p in printed), printed
        body = json.dumps({"dataframe_split": json.loads(
            rows.head(5).drop(columns=["id"]).to_json(orient="split", index=False))}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
        assert served == list(step["prediction"].head(5))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped the model server" in out
    # no secret of the stack in what the commands printed
    assert aws_env["AWS_SECRET_ACCESS_KEY"] not in "".join(printed) + out + scored.stdout
