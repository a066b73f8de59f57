"""The lake on S3 (the moto server), in-process: publishing, reading, retracting, and the
errors a user sees; and the production config groups."""


import pandas as pd
import pytest
from integration_support import LAKE_BUCKET, free_port

from trainpipe import config, lake
from trainpipe.errors import ConfigError, SourceError
from trainpipe.lake import Lake, LakeUnavailable, read_source, to_parquet_bytes

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


@pytest.fixture
def s3_env(aws_env, monkeypatch):
    for name, value in aws_env.items():
        monkeypatch.setenv(name, value)
    return aws_env


def test_publish_read_remove_on_s3(s3_env, moto):
    root = f"s3://{LAKE_BUCKET}/unit"
    store = Lake(root)
    df = pd.DataFrame({"a": [1, 2, 3]})
    manifest = store.publish("landing/x/fp", {"t.parquet": to_parquet_bytes(df)}, run_id="r1")
    pd.testing.assert_frame_equal(store.read_parquet("landing/x/fp", "t.parquet"), df)
    assert store.manifest("landing/x/fp") == manifest
    assert store.outputs("landing/x") == [("landing/x/fp", manifest)]
    # objects are written in place (an S3 PUT is atomic): no temporary keys, no copies
    keys = moto.client().list_objects_v2(Bucket=LAKE_BUCKET, Prefix="unit/")["Contents"]
    assert sorted(k["Key"] for k in keys) == sorted(
        [f"unit/landing/x/fp/{manifest['files']['t.parquet']['path']}",
         "unit/landing/x/fp/manifest.json"])
    lake.write_file(f"{root}/raw/d.csv", b"a,b\n1,2\n")
    assert lake.exists(f"{root}/raw/d.csv") and read_source(f"{root}/raw/d.csv").format == "csv"
    store.remove("landing/x/fp")
    assert store.manifest("landing/x/fp") is None and store.outputs("landing/x") == []
    assert store.manifest("never/published") is None


def test_missing_bucket_is_named(s3_env):
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    with pytest.raises(SourceError, match=rf"s3://absent-bucket/lake/p: cannot publish there: "
                       rf"the bucket 'absent-bucket' does not exist \(endpoint {endpoint}\)"):
        Lake("s3://absent-bucket/lake").publish("p", {"a": b"1"})
    with pytest.raises(SourceError, match="the bucket 'absent-bucket' does not exist"):
        Lake("s3://absent-bucket/lake").manifest("p")
    with pytest.raises(SourceError, match="s3://absent-bucket/x.csv: cannot read it: the bucket"):
        read_source("s3://absent-bucket/x.csv")
    with pytest.raises(SourceError, match=r"s3://trainpipe-lake/none.csv: no such file"):
        read_source(f"s3://{LAKE_BUCKET}/none.csv")


def test_unreachable_endpoint_gives_up_in_bounded_time(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(LakeUnavailable, match=rf"s3://{LAKE_BUCKET}/lake/p: cannot publish "
                       rf"there: the S3 endpoint {endpoint} cannot be reached; gave up after "
                       rf"{lake.S3_ATTEMPTS} attempts \(EndpointConnectionError"):
        Lake(f"s3://{LAKE_BUCKET}/lake").publish("p", {"a": b"1"})
    with pytest.raises(LakeUnavailable) as caught:
        read_source(f"s3://{LAKE_BUCKET}/raw/x.csv")
    assert caught.value.exit_code == 1


def test_production_config_groups(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TRAINPIPE_LAKE_ROOT", raising=False)
    cfg = config.compose(["tracking=server", "lake=s3", "lake.root=s3://my-bucket/lake"])
    assert cfg.tracking.uri == "http://127.0.0.1:5000"  # where `trainpipe stack up` listens
    assert cfg.lake.root == "s3://my-bucket/lake"
    assert cfg.dataset.source == "s3://my-bucket/lake/raw/hotel_bookings/train.csv"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("TRAINPIPE_LAKE_ROOT", "s3://team-bucket/lake")
    cfg = config.compose(["tracking=server", "lake=s3"])
    assert cfg.tracking.uri == "http://mlflow.example:5000"
    assert cfg.lake.root == "s3://team-bucket/lake"
    monkeypatch.delenv("TRAINPIPE_LAKE_ROOT")
    with pytest.raises(ConfigError, match="TRAINPIPE_LAKE_ROOT"):
        config.compose(["lake=s3"])


def test_clean_works_on_s3(s3_env, moto):
    """`trainpipe clean` lists and retracts outputs on S3 like in a folder."""
    from trainpipe import housekeeping
    from trainpipe.catalog import output_base

    root = f"s3://{LAKE_BUCKET}/clean"
    cfg = config.compose(["lake=s3", f"lake.root={root}"])
    store = Lake(root)
    base = output_base(cfg.dataset.name, "split", "landing")
    store.publish(f"{base}/old", {"train.parquet": b"1"}, run_id="r1")
    store.publish(f"{base}/new", {"train.parquet": b"2"}, run_id="r2")
    assert sorted(p for p, m in store.outputs(base) if m) == [f"{base}/new", f"{base}/old"]
    lake.write_file(cfg.dataset.source, b"id\n1\n")  # clean reads it: what the config needs
    assert housekeeping.clean(cfg, "split", keep=1).removed == [f"{root}/{base}/old"]
    assert [p for p, _ in store.outputs(base)] == [f"{base}/new"]
    assert not [k for k in moto.client().list_objects_v2(
        Bucket=LAKE_BUCKET, Prefix=f"clean/{base}/old/").get("Contents", [])]
