"""Helpers for the integration tests: the services they start, runs, S3 and SQL checks."""

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainpipe import demo, stack

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ADMIN_URI = os.environ.get("TRAINPIPE_TEST_POSTGRES",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
LAKE_BUCKET = "trainpipe-lake"
ARTIFACTS_BUCKET = "trainpipe-artifacts"
FAST = ["model.params.n_estimators=20"]  # small forests keep end-to-end runs quick
# Distinctive secrets: the redaction tests grep everything they can reach for these.
PG_PASSWORD = f"pgpw-{uuid.uuid4().hex}"
AWS_SECRET = f"awssecret-{uuid.uuid4().hex}"
AWS_KEY_ID = "AKIATRAINPIPETESTKEY"


def unavailable(reason: str):
    """A service the tests need is missing: a failure in CI, a skip elsewhere."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.1)
    return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------ S3


@dataclass
class Moto:
    endpoint: str
    proc: subprocess.Popen
    log: Path

    def client(self, key: str = AWS_KEY_ID, secret: str = AWS_SECRET):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret)


def start_moto(log: Path, extra_env: dict | None = None) -> Moto:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        unavailable("moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | (extra_env or {})
    out = open(log, "wb")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    if not wait_for_http(endpoint + "/moto-api/", 30, proc):
        stop(proc)
        unavailable(f"the moto server did not start: {log.read_text()[-2000:]}")
    return Moto(endpoint, proc, log)




# ---------------------------------------------------------------------------------- Dask


class DaskCluster:
    """A real Dask cluster on 127.0.0.1: a `dask scheduler` process and `dask worker`
    processes (each with its nanny), every one in a process group of its own, logging to a
    file in `folder`. Workers get `env` (the lake's AWS_* variables) as a user exports it."""

    def __init__(self, folder: Path, env: dict[str, str]):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}  # name -> process (group leader)
        self.logs: dict[str, Path] = {}
        self.address = ""

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 - open while the process runs
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=self.folder, env=self.env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        out.close()  # the child holds its own copy
        self.procs[name], self.logs[name] = proc, log
        return proc

    def start_scheduler(self, timeout: float = 60) -> str:
        info = self.folder / "scheduler.json"
        proc = self._start("scheduler", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                           "--port", "0", "--scheduler-file", str(info),
                           "--dashboard-address", "127.0.0.1:0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.address = json.loads(info.read_text())["address"]
                return self.address
            time.sleep(0.1)
        raise RuntimeError(f"the Dask scheduler did not start\n{self.tail()}")

    def start_worker(self, name: str) -> subprocess.Popen:
        return self._start(name, "distributed.cli.dask_worker", self.address,
                           "--name", name, "--host", "127.0.0.1", "--nthreads", "1",
                           "--memory-limit", "2GB", "--no-dashboard", "--death-timeout", "60",
                           "--local-directory", str(self.folder / name))

    def wait_for_workers(self, n: int, timeout: float = 90) -> list[str]:
        """Block until `n` workers are connected; their names."""
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            try:
                client.wait_for_workers(n, timeout=timeout)
            except TimeoutError:
                raise RuntimeError(f"{n} Dask workers did not connect within {timeout} s\n"
                                   f"{self.tail()}") from None
            return sorted(w["name"] for w in client.scheduler_info(n_workers=-1)["workers"]
                          .values())

    def group(self, name: str) -> list[int]:
        """The live processes (zombies aside) of `name`'s process group."""
        pgid, pids = self.procs[name].pid, []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    pids.append(int(entry.name))
        return pids

    def alive(self, name: str, timeout: float = 0) -> bool:
        """Is any process of `name`'s group still there (after up to `timeout` s)?"""
        deadline = time.monotonic() + timeout
        while self.group(name):
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.1)
        return False

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process's whole group (a worker: its nanny and the worker it runs)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.procs[name].wait(30)
        self.alive(name, timeout=10)

    def stop(self) -> None:
        """Workers first, then the scheduler: SIGTERM, then SIGKILL for what is left of
        every process group."""
        names = [n for n in self.procs if n != "scheduler"] + ["scheduler"] * (
            "scheduler" in self.procs)
        for name in names:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name in names:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs[name].wait(max(0.1, deadline - time.monotonic()))
        for name in names:  # the group outlives its leader when a child is left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[name].pid, signal.SIGKILL)
            self.procs[name].wait()
            self.alive(name, timeout=10)  # until the orphans are gone

    def tail(self, chars: int = 3000) -> str:
        """The end of every process's log: what a failed test shows."""
        parts = []
        for name, log in self.logs.items():
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {name} ({log}):\n{text[-chars:]}")
        return "\n".join(parts)


def start_dask_cluster(folder: Path, env: dict[str, str], workers: int = 2) -> DaskCluster:
    """A scheduler and `workers` workers, all connected; stopped (and a failure shown with
    the logs) when any part does not start."""
    cluster = DaskCluster(folder, env)
    try:
        cluster.start_scheduler()
        for i in range(workers):
            cluster.start_worker(f"worker-{i}")
        cluster.wait_for_workers(workers)
    except Exception as exc:
        logs = cluster.tail()
        cluster.stop()
        pytest.fail(f"the Dask cluster did not start ({exc}):\n{logs}", pytrace=False)
    return cluster


# ---------------------------------------------------------------------------- PostgreSQL


@dataclass
class Database:
    name: str
    role: str
    uri: str  # with the role's password: what a user passes as --backend-store-uri
    admin_uri: str  # the admin connection to this database (for SQL checks)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(self.admin_uri, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def dump(self) -> str:
        """Every row of every table, as text: what the secrets test greps."""
        tables = [t for (t,) in self.query(
            "select table_name from information_schema.tables "
            "where table_schema = 'public' and table_type = 'BASE TABLE'")]
        return "\n".join(str(row) for t in tables
                         for row in self.query(f'select t::text from "{t}" t'))


def admin_connect(dbname: str = "postgres"):
    import psycopg2

    base = ADMIN_URI.rsplit("/", 1)[0]
    try:
        conn = psycopg2.connect(f"{base}/{dbname}", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {ADMIN_URI} ({' '.join(str(exc).split())})")
    conn.autocommit = True
    return conn




# -------------------------------------------------------------------------------- MLflow




# --------------------------------------------------------------------------------- runs


def clean_env() -> dict[str, str]:
    """This process's environment without MLflow's, AWS's and PostgreSQL's variables."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "AWS_", "PG", "TRAINPIPE_"))}


def run_env(server: stack.StackInfo, aws_env: dict, **extra: str) -> dict[str, str]:
    """The environment of a user who ran `stack up` and points at the S3 endpoint."""
    return clean_env() | aws_env | server.env | {"COLUMNS": "200"} | extra


def trainpipe(*args: str, cwd: Path, env: dict, timeout: float = 300,
              ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainpipe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def start_trainpipe(*args: str, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainpipe", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def upload_demo(moto: Moto, root: str, rows: int = 3000) -> str:
    """Demo hotel data in the raw zone of the lake at s3://LAKE_BUCKET/<root>."""
    key = f"{root}/raw/hotel_bookings/train.csv"
    body = demo.hotel_bookings(rows=rows, seed=1).to_csv(index=False).encode()
    moto.client().put_object(Bucket=LAKE_BUCKET, Key=key, Body=body)
    return f"s3://{LAKE_BUCKET}/{key}"


def s3_keys(moto: Moto, bucket: str, prefix: str = "") -> list[str]:
    s3 = moto.client()
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def s3_read(moto: Moto, bucket: str, key: str) -> bytes:
    return moto.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def check_manifests(moto: Moto, root: str) -> list[str]:
    """Every manifest under the lake root names files that exist with its digests."""
    keys = set(s3_keys(moto, LAKE_BUCKET, root + "/"))
    manifests = sorted(k for k in keys if k.endswith("/manifest.json"))
    for key in manifests:
        manifest = json.loads(s3_read(moto, LAKE_BUCKET, key))
        prefix = key.rsplit("/", 1)[0]
        for name, entry in manifest["files"].items():
            path = f"{prefix}/{entry['path']}"
            assert path in keys, f"{key} names {name} at {path}, which is missing"
            data = s3_read(moto, LAKE_BUCKET, path)
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{path} changed"
    return manifests


def runs_of(database: Database, experiment: str) -> list[dict]:
    rows = database.query(
        "select r.run_uuid, r.status, r.name from runs r join experiments e "
        "on r.experiment_id = e.experiment_id where e.name = %s", (experiment,))
    runs = []
    for run_id, status, name in rows:
        tags = dict(database.query("select key, value from tags where run_uuid = %s",
                                   (run_id,)))
        runs.append({"run_id": run_id, "status": status, "name": name, "tags": tags})
    return runs


# ------------------------------------------------------------------------------- faults


class TcpProxy:
    """A TCP relay to a server (S3, MLflow) that can vanish mid-run, like an endpoint that
    goes away (`close`), or freeze: accept connections and never answer (`freeze`), like a
    hung server or a black-holed network. The server behind it keeps its data."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.frozen = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        """From now on: connections are accepted, nothing is relayed either way."""
        self.frozen.set()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.frozen.is_set():
                self.sockets.append(client)  # held open, never answered
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.closed:
                    client.close()
                    upstream.close()
                    return
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.frozen.is_set():
                    continue  # swallowed: the other side waits for ever
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """From now on: connection refused; open connections are cut."""
        with self.lock:
            self.closed = True
            self.listener.close()
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def make_reachable_folder(prefix: str) -> Path:
    """A temporary folder the user `postgres` can reach (pytest's are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------- the stack's cluster


def psql_as(user: str | None, port: int, sql: str = "select 1",
            password: str | None = None) -> subprocess.CompletedProcess:
    """psql to 127.0.0.1:`port` as the database user `postgres`, run as the OS user `user`
    (None: this one), never prompting; with `password` in PGPASSWORD when given."""
    from trainpipe import stack

    psql = shutil.which("psql") or stack._pg_program("psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    if user is not None:
        import pwd

        env["HOME"] = pwd.getpwnam(user).pw_dir
    return subprocess.run([psql, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d",
                           "mlflow", "-w", "-X", "-A", "-t", "-c", sql], env=env, cwd="/",
                          capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, **as_user(user))


def as_user(user: str | None) -> dict:
    """subprocess arguments that run a command as the OS user `user` (None: this one)."""
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def make_trust_cluster(folder: Path, running: bool) -> dict:
    """A stack folder as trainpipe made them before the stack's cluster had a password: a
    cluster made with `initdb -A trust` (any local user connects as superuser), holding the
    database `mlflow` with a table `kept`, recorded in stack.json; running or stopped.
    Returns what stack.json records of it."""
    import psycopg2

    from trainpipe import stack, supervise

    pg_dir, data = folder / "postgres", folder / "postgres" / "data"
    pg_dir.mkdir(parents=True)
    user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    if user is not None:
        shutil.chown(pg_dir, user, user)
    pg_dir.chmod(0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def pg(*cmd: str) -> None:
        subprocess.run([stack._pg_program(cmd[0]), *cmd[1:]], cwd=pg_dir, env=env, check=True,
                       capture_output=True, timeout=180, stdin=subprocess.DEVNULL,
                       start_new_session=True, **as_user(user))

    pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
       "--no-sync")
    port = free_port()
    log = pg_dir / "postgres.log"
    pg("pg_ctl", "-D", str(data), "-l", str(log), "-o",
       f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''", "-w", "start")
    conn = psycopg2.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE mlflow")
    conn.close()
    with psycopg2.connect(f"postgresql://postgres@127.0.0.1:{port}/mlflow") as conn:
        conn.cursor().execute("CREATE TABLE kept AS SELECT 'made before' AS note")
    conn.close()
    pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    if not running:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        pid = None
    recorded = {"managed": True, "pid": pid, "started": supervise.start_time(pid),
                "port": port, "data": str(data), "user": user,
                "uri": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow",
                "log": str(log)}
    (folder / "stack.json").write_text(json.dumps({"postgresql": recorded}, indent=2))
    return recorded
