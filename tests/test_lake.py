import hashlib

import pandas as pd
import pytest

from trainpipe.errors import SourceError
from trainpipe.lake import Lake, read_source, to_parquet_bytes


def test_publish_writes_files_then_manifest(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    df = pd.DataFrame({"a": [1, 2]})
    manifest = lake.publish("landing/x", {"t.parquet": to_parquet_bytes(df)}, run_id="r1")
    assert manifest["run_id"] == "r1"
    assert set(manifest["files"]) == {"t.parquet"}
    pd.testing.assert_frame_equal(lake.read_parquet("landing/x", "t.parquet"), df)
    # the files sit in one attempt folder; no temporary files are left behind
    files = sorted(str(p.relative_to(tmp_path / "lake/landing/x"))
                   for p in (tmp_path / "lake/landing/x").rglob("*") if p.is_file())
    assert files == [manifest["files"]["t.parquet"]["path"], "manifest.json"]


def test_racing_writers_leave_one_consistent_output(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    first = lake.publish("out/fp", {"a.bin": b"first"}, run_id="r1")
    second = lake.publish("out/fp", {"a.bin": b"second"}, run_id="r2")
    assert first["files"]["a.bin"]["path"] != second["files"]["a.bin"]["path"]
    manifest = lake.manifest("out/fp")
    assert manifest["run_id"] == "r2"
    data = lake.read("out/fp", "a.bin")
    assert hashlib.sha256(data).hexdigest() == manifest["files"]["a.bin"]["sha256"]


def test_a_file_without_manifest_does_not_exist_for_readers(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    (tmp_path / "lake/features/x/attempt").mkdir(parents=True)
    (tmp_path / "lake/features/x/attempt/train.parquet").write_bytes(b"half written")
    with pytest.raises(SourceError, match="not published yet"):
        lake.read("features/x", "train.parquet")


def test_missing_source_names_the_url(tmp_path):
    with pytest.raises(SourceError, match=r"nothere\.csv: no such file"):
        read_source(str(tmp_path / "nothere.csv"))


def test_format_is_detected_by_content(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(to_parquet_bytes(pd.DataFrame({"a": [1]})))
    assert read_source(str(path)).format == "parquet"
    assert len(read_source(str(path)).digest) == 64
