"""`trainpipe run compute=dask` on a real Dask cluster: a `dask scheduler` and two `dask
worker` processes on 127.0.0.1 (started here), the lake on the moto S3 server, the runs on
the MLflow server. The workers read and write the lake themselves, with the AWS_*
environment a user exports."""

import os

import pytest
from integration_support import (
    DaskCluster,
    clean_env,
    start_dask_cluster,
)

pytestmark = [pytest.mark.slow]  # runs the pipeline end to end: not in the quick command


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory, aws_env) -> DaskCluster:
    """A scheduler and two workers, each a process group of its own; killed at the end."""
    cluster = start_dask_cluster(tmp_path_factory.mktemp("dask"), clean_env() | aws_env)
    print(f"Dask cluster at {cluster.address}; logs in {cluster.folder}")
    yield cluster
    cluster.stop()


def test_the_cluster_fixture(tmp_path, aws_env):
    """The fixture's own cluster: it starts, a client sees both workers with the lake's
    environment, and it stops leaving no process behind."""
    from distributed import Client

    cluster = start_dask_cluster(tmp_path, clean_env() | aws_env)
    try:
        assert cluster.address.startswith("tcp://127.0.0.1:")
        with Client(cluster.address, timeout="30s") as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            assert sorted(w["name"] for w in workers) == ["worker-0", "worker-1"]
            assert {w["nthreads"] for w in workers} == {1}
            assert {w["memory_limit"] for w in workers} == {2 * 10**9}
            seen = client.run(lambda: os.environ.get("AWS_ENDPOINT_URL"))
            assert set(seen.values()) == {aws_env["AWS_ENDPOINT_URL"]}
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    finally:
        cluster.stop()
    assert not [name for name in cluster.procs if cluster.alive(name)], cluster.tail()
