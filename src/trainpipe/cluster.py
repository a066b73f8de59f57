"""compute=dask: the one place that knows Dask (dask.distributed).

It connects to the cluster a run works on (a LocalCluster on this machine, or a running
scheduler at `compute.address`), turns a lake table's parts into a Dask DataFrame and back,
and says whether a value is a Dask collection. Steps hold Dask DataFrames as they would
pandas ones; the catalog writes each partition as a Parquet part from the worker that
computed it, so no table passes through this process.

Workers need what this process needs to reach the lake: the same AWS_* environment for an
S3 lake, the same path for a local one (a LocalCluster's workers inherit both).
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainpipe import lake
from trainpipe.errors import ClusterError, ConfigError
from trainpipe.redaction import redact_uri

# what a step that failed on the cluster leaves behind (told with each such failure)
RESUMES = "Nothing of the step was published; a re-run resumes from the steps before it"
NO_SPILLING = {"distributed.worker.memory.target": False,
               "distributed.worker.memory.spill": False}


def enabled(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "compute.engine", default="local") == "dask"


def is_dask(value: Any) -> bool:
    return type(value).__module__.startswith("dask")


def plain(cfg: DictConfig) -> DictConfig:
    """The config resolved, for worker processes (which know none of trainpipe's resolvers)."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


@contextmanager
def connected(cfg: DictConfig, notice: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """A Dask client for the run (the default one while the block runs); yields the tags the
    parent run records: engine, workers, threads, memory, dashboard."""
    import dask
    from distributed import Client, KilledWorker, LocalCluster
    from distributed.comm import CommClosedError

    compute = cfg.compute
    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = None
    try:
        if compute.address:
            client = Client(str(compute.address), timeout="30s")
        else:
            # No spilling: lightgbm.dask keeps unpicklable sockets among a worker's data
            # (spilled, they fail the training) and the data steps hold nothing to spill.
            with dask.config.set(NO_SPILLING):
                cluster = LocalCluster(n_workers=int(compute.workers),
                                       threads_per_worker=int(compute.threads_per_worker),
                                       memory_limit=compute.memory_limit, processes=True,
                                       dashboard_address="127.0.0.1:0",
                                       silence_logs=logging.ERROR)
            client = Client(cluster)
            client.register_plugin(_quiet_workers())
    except OSError as exc:  # no scheduler there (distributed raises OSError after timeout)
        where = compute.address or "a LocalCluster"
        raise ConfigError(f"compute.address: cannot connect to the Dask scheduler at {where} "
                          f"({exc})") from None
    try:
        info = client.scheduler_info(n_workers=-1)
        workers = info["workers"].values()
        threads = sum(w["nthreads"] for w in workers)
        memory = sum(w.get("memory_limit") or 0 for w in workers)
        tags = {"trainpipe.compute.engine": "dask",
                "trainpipe.compute.scheduler": (
                    "LocalCluster" if cluster else redact_uri(str(compute.address))),
                "trainpipe.compute.workers": str(len(workers)),
                "trainpipe.compute.threads": str(threads),
                "trainpipe.compute.memory": f"{memory / 2**30:.1f} GiB"}
        if not workers:
            raise ConfigError(f"compute.address: the Dask scheduler at {compute.address} has no "
                              "workers; start some: dask worker " + str(compute.address))
        _check_versions(client)
        # a scheduler started with --no-dashboard has none (the link would answer 404)
        dashboard = client.dashboard_link if "dashboard" in info.get("services", {}) else None
        notice(f"Dask: {_count(len(workers), 'worker')}, {_count(threads, 'thread')}, "
               f"{tags['trainpipe.compute.memory']}"
               + (f"; dashboard {dashboard}" if dashboard else ""))
        try:
            yield tags
        except KilledWorker as exc:
            raise ClusterError(
                f"Dask: the workers computing {exc.args[0]} died more times than Dask retries "
                "a task; the likeliest cause is memory: raise "
                "compute.memory_limit (dask worker --memory-limit) or compute more, smaller "
                f"partitions (compute.blocksize). {RESUMES}") from None
        except CommClosedError as exc:
            raise ClusterError(f"Dask: lost the connection to the scheduler ({exc}). "
                               f"{RESUMES}") from None
    finally:
        # Closing a LocalCluster while a nanny restarts a worker that just died can raise
        # inside distributed ("can only join a started process", seen once): the run's own
        # outcome (its error in words, above) stands.
        with suppress(Exception):
            client.close()
        if cluster is not None:
            with suppress(Exception):
                cluster.close()


def _quiet_workers():
    """A plugin for a LocalCluster's workers, which share this terminal: what they print
    (LightGBM's network lines, from native code) goes nowhere, and scikit-learn's note that a
    model predicts with one job inside a worker is not shown. (Dask's logs: silence_logs.)"""
    from distributed import WorkerPlugin

    class QuietWorker(WorkerPlugin):
        name = "trainpipe-quiet"

        def setup(self, worker) -> None:
            import os
            import warnings

            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
            warnings.filterwarnings("ignore", message="Inside a Dask worker with daemon=True")

    return QuietWorker()


def _check_versions(client) -> None:
    """Workers run trainpipe's own code (reading and writing the lake, the steps' partition
    work): they need trainpipe, the version this process runs. A worker without it dies at
    its first task and the run would wait for workers forever."""
    from importlib.metadata import version

    here = version("trainpipe")
    found = client.run(version, "trainpipe", on_error="return")
    wrong = {w: ("not installed" if isinstance(v, Exception) else f"trainpipe {v}")
             for w, v in sorted(found.items()) if v != here}
    if wrong:
        raise ConfigError(
            f"compute.address: every Dask worker needs trainpipe {here} (this one's version) "
            "installed, with the packages it depends on: "
            + "; ".join(f"{w}: {v}" for w, v in wrong.items()))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def read_table(root: str, prefix: str, manifest: dict, table: str):
    """A table published as parts: a Dask DataFrame whose partitions are its parts, each
    checked against its digest as a worker reads it."""
    import dask.dataframe as dd

    names = lake.parts_of(table, manifest)
    entries = [manifest["files"][n] for n in names]
    meta = lake.read_part(root, prefix, names[0], entries[0]).iloc[:0]
    return dd.from_map(lake.read_part, [root] * len(names), [prefix] * len(names), names,
                       entries, meta=meta, enforce_metadata=False)


def write_tables(root: str, prefix: str, tables: dict[str, Any]) -> tuple[str, dict]:
    """Write Dask DataFrames as Parquet parts into a new attempt folder under `prefix`, all
    in one computation (tables made from one source are read once). Returns the attempt and
    the manifest entries by part name; nothing is published yet."""
    import dask

    attempt = lake.new_attempt()
    names, writes = [], []
    for table, frame in tables.items():
        for number, part in enumerate(frame.to_delayed()):
            names.append(lake.part_name(table, number))
            writes.append(dask.delayed(lake.write_part)(root, prefix, attempt, names[-1], part))
    return attempt, dict(zip(names, dask.compute(*writes), strict=True))


def collect(frame, limit: str | int, what: str, advice: str):
    """A Dask DataFrame as one pandas DataFrame when it fits in `limit` bytes of memory."""
    from dask.utils import parse_bytes

    size = int(frame.memory_usage(deep=True, index=False).sum().compute())
    if size > parse_bytes(limit):
        raise ConfigError(f"{what} {size / 2**20:,.0f} MiB in memory, over "
                          f"compute.collect_limit={limit}. {advice}")
    return frame.compute()


def spread(frame, label: str) -> tuple[Any, Any, Any]:
    """A Dask DataFrame as two Dask arrays, its features (every column but `label`, as
    float64) and its labels, held on the workers in contiguous blocks (of n workers in
    address order, worker k holds the k-th n-th of the partitions); and a client that lists
    where parts are in partition order.

    lightgbm.dask trains each worker on the parts it holds, ranks the workers in the order
    Client.who_has lists the parts (a set's order), and LightGBM's distributed model depends
    on which rank holds which rows: with these the same data, config and number of workers
    train the same model every time. Arrays, not DataFrames: LightGBM concatenates a
    worker's parts, and from DataFrames it makes one more copy of them all."""
    import operator

    import dask
    import dask.array as da
    from distributed import get_client

    client = get_client()
    workers = _workers(client)
    parts = frame.to_delayed()
    # loose restrictions: if a worker dies, its parts are computed again elsewhere
    held = [client.compute(dask.delayed(_as_arrays)(part, label),
                           workers=[workers[i * len(workers) // len(parts)]],
                           allow_other_workers=True) for i, part in enumerate(parts)]
    shapes = client.gather([client.submit(_shapes, pair) for pair in held])
    features, labels = ([client.submit(operator.itemgetter(i), pair) for pair in held]
                        for i in (0, 1))
    return (da.concatenate([da.from_delayed(f, shape=x, dtype="float64")
                            for f, (x, _) in zip(features, shapes, strict=True)]),
            da.concatenate([da.from_delayed(f, shape=y, dtype=frame[label].dtype)
                            for f, (_, y) in zip(labels, shapes, strict=True)]),
            _PartsInOrder(client))


WORKER_WAIT = 60.0  # seconds to wait for a worker when the scheduler has none


def _workers(client) -> list[str]:
    """The scheduler's workers in address order. With none (a nanny restarting the only
    one after a kill or going over its memory limit, workers not started yet), wait a
    while for one."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if workers:
        return workers
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT)
    except TimeoutError:
        raise ClusterError(
            f"the Dask scheduler at {client.scheduler.address} has no workers (none came in "
            f"{WORKER_WAIT:.0f} s): start some (dask worker {client.scheduler.address}), or "
            f"check why they stopped in their logs. {RESUMES}") from None
    return sorted(client.scheduler_info(n_workers=-1)["workers"])


def _as_arrays(part, label: str) -> tuple:
    return part.drop(columns=[label]).to_numpy(dtype="float64"), part[label].to_numpy()


def _shapes(pair: tuple) -> tuple:
    return tuple(a.shape for a in pair)


class _PartsInOrder:
    """A client whose who_has lists futures in the order asked (Client.who_has: a set's)."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def who_has(self, futures=None, **kwargs) -> dict:
        from distributed import futures_of

        found = self._client.who_has(futures, **kwargs)
        return {f.key: found[f.key] for f in futures_of(futures) if f.key in found}


def per_partition(fn: Callable, frame, *shared) -> list:
    """`fn(partition, *shared)` for every partition of a Dask DataFrame, on the workers; the
    results in partition order. `shared` values (a model: tens of MB) go to every worker
    once, not into the task graph."""
    import dask
    from distributed import get_client

    # hash=False: a key of its own each time. With the default, evaluate's second scatter of
    # the same model (test after val) reused the first one's key while the first future's
    # release was on its way: "Could not find data: LGBMClassifier-…" (lost dependencies).
    shared = [get_client().scatter(value, broadcast=True, hash=False) for value in shared]
    return list(dask.compute(*[dask.delayed(fn, pure=True)(part, *shared)
                               for part in frame.to_delayed()]))
