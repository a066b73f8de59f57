"""`trainpipe run compute=dask` without an address: a LocalCluster of 2 worker processes on
this machine, small data in a local lake."""

import hashlib
import json
import os

import pytest

from tests.conftest import runs, trainpipe

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

# 2 workers; the 3,000 demo rows (about 200 KB of CSV) in several partitions
DASK = ("compute=dask", "compute.workers=2", "compute.blocksize=64KB")
LIGHTGBM = ("model=lightgbm", "model.params.n_estimators=20")


def manifests(workdir, zone: str) -> dict[str, list[tuple]]:
    """Every manifest under a zone of the local lake: step -> [(folder, manifest)]."""
    found: dict[str, list[tuple]] = {}
    for path in sorted((workdir / "lake" / zone).glob("*/*/*/manifest.json")):
        found.setdefault(path.parts[-3], []).append((path.parent, json.loads(path.read_text())))
    return found


def test_full_run_on_a_local_cluster_then_a_changed_byte_in_the_source(demo_lake):
    """A full run in parts, train again (the same model), then a changed byte in the source,
    after which the same run again is up to date."""
    result = trainpipe("run", *DASK, *LIGHTGBM, cwd=demo_lake)
    assert result.returncode == 0, result.stdout + result.stderr
    landing = manifests(demo_lake, "landing")
    assert set(landing) == {"validate", "split"}
    for step, [(folder, manifest)] in landing.items():
        parts = sorted(n for n in manifest["files"] if n.startswith("train.part"))
        assert len(parts) >= 2, (step, manifest["files"])  # partitioned, in parts
        assert parts == [f"train.part{i:05d}.parquet" for i in range(len(parts))]
        for name in parts:
            entry = manifest["files"][name]
            data = (folder / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
    # the parent run names the cluster
    parent = runs(demo_lake).query("`tags.trainpipe.kind` == 'pipeline'")
    assert len(parent) == 1 and parent["status"].tolist() == ["FINISHED"]
    assert parent["tags.trainpipe.compute.engine"].tolist() == ["dask"]
    assert parent["tags.trainpipe.compute.workers"].tolist() == ["2"]
    assert parent["tags.trainpipe.compute.threads"].tolist() == ["2"]

    # the same data, config and number of workers train the same model (lightgbm.dask alone
    # ranks workers in a set's order, and the model depends on which rank holds which rows)
    forced = trainpipe("run", *DASK, *LIGHTGBM, "--force", "--from", "train", cwd=demo_lake)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    parents = runs(demo_lake).query("`tags.trainpipe.kind` == 'pipeline'")
    scores = parents[[c for c in parents if c.startswith("metrics.test_")]]
    assert len(scores) == 2 and scores.shape[1] >= 5, scores.T
    assert scores.iloc[0].tolist() == scores.iloc[1].tolist(), scores.T

    a_changed_byte_in_the_source_is_seen(demo_lake)


def a_changed_byte_in_the_source_is_seen(demo_lake):
    """After a run: the source's fingerprint trusts a file's size and modification time; a
    changed byte (same size, the file written again) is seen, and validate runs again."""
    source = demo_lake / "lake" / "raw" / "hotel_bookings" / "train.csv"
    assert len(manifests(demo_lake, "landing")["validate"]) == 1
    data = source.read_bytes()
    lines = data.split(b"\n")
    header = lines[0].split(b",")
    row = lines[1500].split(b",")
    column = header.index(b"required_car_parking_space")  # 0 or 1
    row[column] = b"1" if row[column] == b"0" else b"0"  # a valid value, one byte
    lines[1500] = b",".join(row)
    changed = b"\n".join(lines)
    assert len(changed) == len(data) and changed != data
    source.write_bytes(changed)
    assert source.stat().st_size == len(data)

    again = trainpipe("run", *DASK, *LIGHTGBM, cwd=demo_lake)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date" not in again.stdout
    assert "✓ validate" in again.stdout  # validated again: not reused
    assert len(manifests(demo_lake, "landing")["validate"]) == 2  # a second output
    # unchanged, the next run is up to date again: nothing is read in full each time
    third = trainpipe("run", *DASK, *LIGHTGBM, cwd=demo_lake)
    assert third.returncode == 0 and "up to date" in third.stdout, third.stdout + third.stderr


def test_a_scikit_learn_model_over_collect_limit_stops_before_any_step(demo_lake):
    result = trainpipe("run", *DASK, "model=random_forest", "compute.collect_limit=1KB",
                       cwd=demo_lake)
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, text
    assert "compute.collect_limit=1KB" in text and "model=lightgbm" in text, text
    assert "Traceback" not in text
    assert "✓" not in result.stdout  # no step ran
    assert not (demo_lake / "lake" / "landing").exists()  # nothing published


def test_a_task_whose_workers_keep_dying_fails_in_words():
    """A task that kills every worker it runs on (as running out of memory does): Dask gives
    up after its retries and the run's error says what happened and what to change."""
    import dask
    from distributed import get_client
    from omegaconf import OmegaConf

    from trainpipe import cluster
    from trainpipe.errors import ClusterError

    cfg = OmegaConf.create({"compute": {"engine": "dask", "address": None, "workers": 1,
                                        "threads_per_worker": 1, "memory_limit": "1GB"}})
    with pytest.raises(ClusterError) as caught, cluster.connected(cfg, lambda _: None):
        client = get_client()
        # a LocalCluster's workers never spill (lightgbm.dask's sockets cannot be pickled)
        spill = client.run(dask.config.get, "distributed.worker.memory.spill")
        assert list(spill.values()) == [False], spill
        client.submit(os._exit, 1).result()
    message = str(caught.value)
    assert "died more times than Dask retries a task" in message, message
    assert "compute.memory_limit" in message and "re-run resumes" in message, message


def test_parquet_parts_with_other_columns_stop_before_any_work(workdir):
    """A folder of Parquet parts, one without a column: exit 3 naming that part and the
    column (Dask alone would read every part with the first's columns and fail in a
    worker), no run left RUNNING, nothing published."""
    from trainpipe import demo

    data = demo.hotel_bookings(rows=3000, seed=1)
    parts = workdir / "parts"
    parts.mkdir()
    data.iloc[:1500].to_parquet(parts / "part-0.parquet", index=False)
    data.iloc[1500:].drop(columns=["lead_time"]).to_parquet(parts / "part-1.parquet",
                                                            index=False)
    result = trainpipe("run", *DASK, *LIGHTGBM, f"dataset.source={parts}", cwd=workdir)
    text = " ".join(result.stderr.split())
    assert result.returncode == 3, result.stdout + result.stderr
    assert (f"{parts / 'part-1.parquet'}: its columns differ from those of "
            f"{parts / 'part-0.parquet'}, the source's first part: missing lead_time") in text
    assert "Traceback" not in result.stderr
    assert not (workdir / "lake" / "landing").exists()  # nothing published
    assert "RUNNING" not in set(runs(workdir)["status"])


def test_workers_without_this_trainpipe_are_named_before_any_work(monkeypatch):
    """Every worker needs trainpipe, the version this process runs; a worker without it
    would die at its first task and the run wait forever. Here this process claims another
    version than its workers have."""
    from importlib import metadata

    from omegaconf import OmegaConf

    from trainpipe import cluster
    from trainpipe.errors import ConfigError

    real, here = metadata.version, os.getpid()
    # this process (not the workers, which run the same function) says 9.9
    monkeypatch.setattr(metadata, "version",
                        lambda name: "9.9" if os.getpid() == here else real(name))
    cfg = OmegaConf.create({"compute": {"engine": "dask", "address": None, "workers": 1,
                                        "threads_per_worker": 1, "memory_limit": "1GB"}})
    with pytest.raises(ConfigError) as caught, cluster.connected(cfg, lambda _: None):
        pass
    message = str(caught.value)
    assert "every Dask worker needs trainpipe 9.9 (this one's version)" in message, message
    assert f"trainpipe {real('trainpipe')}" in message, message


def test_training_waits_for_a_worker_and_says_when_none_comes(monkeypatch):
    """A scheduler with no workers when training starts (the only one is being restarted
    by its nanny, or none were started): the run waits for one, and says so in words when
    none comes; it never fails with an IndexError."""
    import threading

    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client, LocalCluster

    from trainpipe import cluster
    from trainpipe.errors import ClusterError

    frame = dd.from_pandas(pd.DataFrame({"x": range(8), "y": [0, 1] * 4}), npartitions=2)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as local, \
            Client(local) as client:
        monkeypatch.setattr(cluster, "WORKER_WAIT", 1.0)
        with pytest.raises(ClusterError) as caught:
            cluster.spread(frame, "y")
        message = str(caught.value)
        assert f"the Dask scheduler at {client.scheduler.address} has no workers" in message
        assert "re-run resumes" in message

        monkeypatch.setattr(cluster, "WORKER_WAIT", 120.0)
        threading.Timer(0.5, local.scale, [1]).start()  # a worker comes back meanwhile
        features, labels, _ = cluster.spread(frame, "y")
        assert features.compute().shape == (8, 1) and list(labels.compute()) == [0, 1] * 4


def _predicted_rows(part, model) -> int:
    return len(model.predict(part[["a", "b"]]))


def test_the_same_model_shared_again_and_again_is_never_lost():
    """evaluate shares the model with the workers twice in a row (val, then test). Under a
    key made from its hash, the second share raced the first one's release: "Could not find
    data: ...", the task cancelled for lost dependencies (about one call in three here)."""
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
    from distributed import Client, LocalCluster
    from sklearn.ensemble import RandomForestClassifier

    from trainpipe import cluster

    rows = pd.DataFrame({"a": np.random.default_rng(0).random(4000),
                         "b": np.random.default_rng(1).random(4000)})
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(rows, rows.a > 0.5)
    frame = dd.from_pandas(rows, npartitions=4)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as local, \
            Client(local):
        for _ in range(30):
            for _ in ("val", "test"):
                assert sum(cluster.per_partition(_predicted_rows, frame, model)) == 4000
