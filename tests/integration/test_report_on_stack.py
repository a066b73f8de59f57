"""The run report on the PostgreSQL + S3 stack: the page is an object in the artifacts bucket
(the terminal gives its artifact URI, there is no local file), and `trainpipe report` makes a
local copy from what the server holds."""

import re
from pathlib import Path

import pytest
from integration_support import (
    ARTIFACTS_BUCKET,
    AWS_SECRET,
    FAST,
    LAKE_BUCKET,
    PG_PASSWORD,
    run_env,
    runs_of,
    s3_keys,
    s3_read,
    trainpipe,
    upload_demo,
)

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def test_the_report_of_a_run_on_the_stack(server, database, moto, aws_env, tmp_path):
    upload_demo(moto, "report")
    env = run_env(server, aws_env)
    store = ("tracking=server", "tracking.experiment=report")
    result = trainpipe("run", *store, "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/report", *FAST,
                       cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (parent,) = [r for r in runs_of(database, "report")
                 if r["tags"].get("trainpipe.kind") == "pipeline"]
    run_id = parent["run_id"]

    # the terminal names the artifact; the page is in the bucket, not on this machine
    [where] = [line.split()[1] for line in result.stdout.splitlines()
               if line.strip().startswith("report ")]
    assert re.fullmatch(rf"mlflow-artifacts:/\d+/{run_id}/artifacts/report\.html", where)
    [key] = [k for k in s3_keys(moto, ARTIFACTS_BUCKET, "mlartifacts/")
             if k.endswith(f"{run_id}/artifacts/report.html")]
    page = s3_read(moto, ARTIFACTS_BUCKET, key).decode()
    assert "hotel_bookings · random_forest <span class='badge finished'>FINISHED" in page
    assert f"s3://{LAKE_BUCKET}/report/raw/hotel_bookings/train.csv" in page
    assert AWS_SECRET not in page and PG_PASSWORD not in page
    assert not (tmp_path / "mlruns").exists()

    # a local copy, built again from what the server holds
    copy = trainpipe("report", *store, cwd=tmp_path, env=env)
    assert copy.returncode == 0, copy.stderr
    written = Path(copy.stdout.strip())
    assert written == tmp_path / f"report-{run_id[:12]}.html"

    def without_duration(text: str) -> str:
        return re.sub(r"<dt>duration</dt><dd>[^<]*</dd>", "", text)

    assert without_duration(written.read_text()) == without_duration(page)
