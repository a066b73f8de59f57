"""The local production-like stack: PostgreSQL as MLflow's backend store, and an MLflow
tracking server on 127.0.0.1 whose artifacts it proxies to S3 or to a folder.

    up(...)      start what is missing, health-check it, return where it is (StackInfo)
    status(...)  each part: pid, port, health (ServiceStatus)
    down(...)    stop what `up` started, and nothing else

PostgreSQL is either an existing server (`backend_store_uri`) or, when none is given, a
cluster of the stack's own under `<folder>/postgres` (made with `initdb`, started with
`pg_ctl` on a free port; owned by the user `postgres` when run as root, since PostgreSQL
refuses to run as root). Its data and the artifacts folder survive `down` and `up`.

What `up` started is recorded in `<folder>/stack.json` (pids with their start times, so a
recycled pid is never mistaken for ours; ports; URIs with passwords masked). No secret is
written anywhere: the server gets the backend store URI through its environment
(`MLFLOW_BACKEND_STORE_URI`), not its command line, and every message is redacted.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from trainpipe.errors import ConfigError, TrainpipeError
from trainpipe.redaction import redact_text, redact_uri

DEFAULT_FOLDER = ".trainpipe/stack"
DEFAULT_PORT = 5000
STATE_FILE = "stack.json"
DATABASE = "mlflow"  # the database the stack's own cluster holds MLflow's tables in
SUPERUSER = "postgres"  # the stack's own cluster's superuser (trust auth, 127.0.0.1 only)
RUN_AS_ROOT_USER = "postgres"  # who runs the stack's own cluster when `up` runs as root
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")


class StackError(TrainpipeError):
    """A part of the stack cannot be started, reached or stopped: the message says which
    and why (a server refusing connections, a port in use, a missing program, ...)."""

    exit_code = 2


class TrackingUnreachable(TrainpipeError):
    """The MLflow tracking server does not answer."""

    exit_code = 2


@dataclass(frozen=True)
class ServiceStatus:
    name: str  # "postgresql" | "mlflow"
    managed: bool  # started by `up` (so `down` stops it); False: an external server
    pid: int | None  # None for an external server
    port: int | None
    address: str  # where it listens, password masked
    running: bool  # the process is alive (an external server: it accepts connections)
    healthy: bool  # it answers: PostgreSQL accepts a connection, MLflow's /health says OK
    detail: str  # one line for people


@dataclass(frozen=True)
class StackInfo:
    folder: str
    tracking_uri: str  # http://127.0.0.1:PORT
    backend_store_uri: str  # password masked
    artifacts_destination: str
    services: list[ServiceStatus]
    started: list[str] = field(default_factory=list)  # services this call started
    reused: list[str] = field(default_factory=list)  # services that already ran
    env: dict[str, str] = field(default_factory=dict)  # to export before `trainpipe run`
    seconds: float = 0.0  # from the call to healthy


# ---------------------------------------------------------------------------------- API


def up(folder: str | os.PathLike = DEFAULT_FOLDER, port: int | None = None,
       backend_store_uri: str | None = None, artifacts_destination: str | None = None, *,
       workers: int = 1, timeout: float = 120.0,
       env: Mapping[str, str] | None = None) -> StackInfo:
    """Start what is missing of the stack in `folder`, wait until it is healthy, return it.

    port: the MLflow server's port; None: the running server's, else 5000; 0: any free port.
    backend_store_uri: an existing PostgreSQL (`postgresql://user@host:port/db`; the
        database is created if missing); None: the running stack's, else a cluster of the
        stack's own under `<folder>/postgres` (needs `initdb` and `pg_ctl`).
    artifacts_destination: `s3://bucket/prefix` (credentials and endpoint from the
        environment: AWS_*, AWS_ENDPOINT_URL) or a folder; None: the running server's,
        else `<folder>/artifacts`.
    env: the environment the services get (default: this process's).

    Idempotent: what runs (and matches the arguments) is reused. An argument that
    contradicts what runs is a StackError (`down` first). On failure, whatever this call
    started is stopped again. Raises ConfigError for bad arguments, StackError otherwise.
    """
    t0 = time.monotonic()
    env = dict(os.environ if env is None else env)
    folder = Path(folder).expanduser().resolve()
    _check_arguments(port, backend_store_uri, artifacts_destination, workers)
    if artifacts_destination and artifacts_destination.startswith("s3://"):
        _check_bucket(artifacts_destination.rstrip("/"), env)  # before anything is started
    folder.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    reused: list[str] = []
    with _locked(folder):
        state = _load_state(folder)
        running = state.get("mlflow") if _mlflow_alive(state.get("mlflow")) else None
        try:
            if running:
                _check_matches(running, port, backend_store_uri, artifacts_destination)
            if running and not (state.get("postgresql") or {}).get("managed"):
                # on an external server: it is not ours to start; MLflow already uses it
                reused.append("mlflow")
            else:
                pg_uri = _ensure_postgres(folder, state, backend_store_uri, env, started,
                                          reused)
                if running and redact_uri(pg_uri) == running["backend"]:
                    reused.append("mlflow")
                else:
                    if running:  # its own cluster came back on another port: follow it
                        _stop_process_group(running["pid"], 15)
                    _start_mlflow(folder, state, pg_uri, port, artifacts_destination,
                                  workers, timeout, env)
                    started.append("mlflow")
        except BaseException:
            _stop_started(folder, state, started)
            raise
        mlflow_state = state["mlflow"]
    tracking_uri = f"http://127.0.0.1:{mlflow_state['port']}"
    return StackInfo(
        folder=str(folder), tracking_uri=tracking_uri,
        backend_store_uri=mlflow_state["backend"],
        artifacts_destination=mlflow_state["artifacts"],
        services=status(folder), started=started, reused=reused,
        env={"MLFLOW_TRACKING_URI": tracking_uri}, seconds=time.monotonic() - t0)


def status(folder: str | os.PathLike = DEFAULT_FOLDER) -> list[ServiceStatus]:
    """Each part of the stack in `folder` (PostgreSQL, then MLflow); [] when there is none."""
    folder = Path(folder).expanduser().resolve()
    state = _load_state(folder)
    services = []
    pg = state.get("postgresql")
    if pg:
        services.append(_postgres_status(pg))
    ml = state.get("mlflow")
    if ml:
        services.append(_mlflow_status(ml))
    return services


def down(folder: str | os.PathLike = DEFAULT_FOLDER, timeout: float = 30.0) -> list[str]:
    """Stop what `up` started in `folder` (never an external PostgreSQL); return one line per
    service stopped. Data (the cluster, the artifacts folder) stays for the next `up`."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / STATE_FILE).exists():
        return []
    stopped = []
    with _locked(folder):
        state = _load_state(folder)
        ml = state.get("mlflow")
        if ml and ml.get("pid"):
            if _alive(ml["pid"], ml.get("started")):
                _stop_process_group(ml["pid"], timeout)
                stopped.append(f"mlflow server (pid {ml['pid']}, port {ml['port']})")
            ml["pid"] = None
        pg = state.get("postgresql")
        if pg and pg.get("managed") and pg.get("pid"):
            if _alive(pg["pid"], pg.get("started")):
                _stop_postgres(pg, timeout)
                stopped.append(f"postgresql (pid {pg['pid']}, port {pg['port']})")
            pg["pid"] = None
        _save_state(folder, state)
    return stopped


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingUnreachable, within about `timeout` seconds, when the tracking server
    at an http(s) URI does not answer. Any HTTP answer counts as reachable (a server that
    wants credentials answers 401). Other URIs (sqlite:, postgresql:, file:) pass."""
    if not uri.startswith(("http://", "https://")):
        return
    url = _without_userinfo(uri).rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    reason = ""
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(1.0, min(5.0, left))):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = _exc_reason(getattr(exc, "reason", exc))
        if time.monotonic() + 1.0 >= deadline:
            break
        time.sleep(1.0)
    raise TrackingUnreachable(
        f"the MLflow tracking server {redact_uri(uri)} cannot be reached ({reason}); is it "
        "running? `trainpipe stack status` shows the local stack, `trainpipe stack up` "
        "starts it")


# ----------------------------------------------------------------------------- arguments


def _check_arguments(port, backend_store_uri, artifacts_destination, workers) -> None:
    if port is not None and not (0 <= int(port) <= 65535):
        raise ConfigError(f"--port {port}: must be between 1 and 65535 (0: any free port)")
    if int(workers) < 1:
        raise ConfigError(f"--workers {workers}: must be 1 or more")
    if backend_store_uri is not None:
        scheme = backend_store_uri.split("://", 1)[0].lower() if "://" in backend_store_uri else ""
        if scheme not in POSTGRES_SCHEMES:
            raise ConfigError(
                f"--backend-store-uri {redact_uri(backend_store_uri)}: not a PostgreSQL URI; "
                "expected postgresql://USER@HOST:PORT/DATABASE (the password, if any, is best "
                "left to PGPASSWORD or ~/.pgpass)")
    if artifacts_destination is not None and "://" in artifacts_destination:
        scheme = artifacts_destination.split("://", 1)[0].lower()
        if scheme not in ("s3", "file"):
            raise ConfigError(f"--artifacts-destination {redact_uri(artifacts_destination)}: "
                              "expected s3://BUCKET/PREFIX or a folder")


def _check_matches(running: dict, port, backend_store_uri, artifacts_destination) -> None:
    wanted = {"port": port if port not in (None, 0) else None,
              "backend": redact_uri(_normalise_pg(backend_store_uri)) if backend_store_uri
              else None,
              "artifacts": _artifacts_location(artifacts_destination, None)
              if artifacts_destination else None}
    for key, value in wanted.items():
        if value is not None and value != running[key]:
            raise StackError(
                f"the stack's MLflow server already runs (pid {running['pid']}) with {key} "
                f"{running[key]}, not {value}: run `trainpipe stack down` first, or use "
                "another --folder")


# ---------------------------------------------------------------------------- PostgreSQL


def _ensure_postgres(folder: Path, state: dict, backend_store_uri: str | None,
                     env: dict, started: list, reused: list) -> str:
    """The backend store URI to give MLflow (with its password, if any: never stored)."""
    pg = state.get("postgresql") or {}
    if backend_store_uri is None:
        if pg and not pg.get("managed"):
            if "***" not in pg["uri"]:  # no password in it (PGPASSWORD, ~/.pgpass): reuse
                _check_postgres(pg["uri"], create_database=True)
                return pg["uri"]
            raise StackError(
                f"the stack in {folder} runs on the PostgreSQL at {pg['uri']}, whose password "
                "is never stored: pass --backend-store-uri again (or keep the password in "
                "PGPASSWORD or ~/.pgpass, out of the URI)")
        return _ensure_own_cluster(folder, state, env, started, reused)
    if pg.get("managed") and pg.get("pid") and _alive(pg["pid"], pg.get("started")):
        raise StackError(
            f"the stack in {folder} runs a PostgreSQL of its own (pid {pg['pid']}, port "
            f"{pg['port']}): run `trainpipe stack down` before switching to "
            "--backend-store-uri, or use another --folder")
    uri = _normalise_pg(backend_store_uri)
    _check_postgres(uri, create_database=True)
    parts = urlsplit(uri)
    state["postgresql"] = {"managed": False, "pid": None, "port": parts.port or 5432,
                           "uri": redact_uri(uri)}
    _save_state(folder, state)
    return uri


def _ensure_own_cluster(folder: Path, state: dict, env: dict, started: list,
                        reused: list) -> str:
    pg = state.get("postgresql") or {}
    if pg.get("managed") and pg.get("pid") and _alive(pg["pid"], pg.get("started")):
        try:
            _check_postgres(pg["uri"], create_database=True)
        except StackError:
            pass  # alive but not answering: restart it below
        else:
            reused.append("postgresql")
            return pg["uri"]
    initdb, pg_ctl = _pg_program("initdb"), _pg_program("pg_ctl")
    user = _run_as_user()
    pg_dir = folder / "postgres"
    data = pg_dir / "data"
    pg_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _give_to(pg_dir, user)
        _check_reachable(pg_dir, user)
    if not (data / "PG_VERSION").exists():
        _run([initdb, "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
              "--locale=C", "--no-sync"], user, "initdb (making the PostgreSQL cluster)",
             cwd=pg_dir, timeout=180)
    elif (data / "postmaster.pid").exists():
        _stop_stale_postmaster(pg_ctl, data, user)
    port = pg.get("port") if pg.get("port") and _port_free(pg["port"]) else _free_port()
    log = pg_dir / "postgres.log"
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    _run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "90", "start"],
         user, f"pg_ctl start (PostgreSQL on 127.0.0.1:{port})", cwd=pg_dir, timeout=120,
         log=log)
    pid = _postmaster_pid(data)
    uri = f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
    state["postgresql"] = {"managed": True, "pid": pid, "started": _start_time(pid),
                           "port": port, "data": str(data), "user": user, "uri": uri,
                           "log": str(log)}
    _save_state(folder, state)
    started.append("postgresql")
    _check_postgres(uri, create_database=True)
    return uri


def _check_postgres(uri: str, create_database: bool) -> None:
    """Connect (5 s at most); create the database when it is missing and allowed to."""
    import psycopg2

    dsn = _libpq_uri(uri)
    try:
        psycopg2.connect(dsn, connect_timeout=5).close()
        return
    except psycopg2.OperationalError as exc:
        message = _pg_message(exc)
        missing_db = "does not exist" in message and "database" in message
        if not (missing_db and create_database):
            raise StackError(f"PostgreSQL at {redact_uri(uri)} refuses connections "
                             f"({message}); start it or check the URI") from None
    database = urlsplit(dsn).path.lstrip("/")
    admin = urlunsplit(urlsplit(dsn)._replace(path="/postgres"))
    try:
        conn = psycopg2.connect(admin, connect_timeout=5)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
    except psycopg2.Error as exc:
        raise StackError(f"PostgreSQL at {redact_uri(uri)}: the database {database!r} does "
                         f"not exist and cannot be created ({_pg_message(exc)}); create it "
                         "(createdb) or name another") from None


def _postgres_status(pg: dict) -> ServiceStatus:
    if pg.get("managed"):
        healthy, detail = True, "accepting connections"
        try:
            _check_postgres(pg["uri"], create_database=False)
        except StackError as exc:
            healthy, detail = False, str(exc)
        alive = bool(pg.get("pid")) and _alive(pg["pid"], pg.get("started"))
        if not alive:
            healthy, detail = False, "not running (`trainpipe stack up` starts it)"
        else:
            detail = f"{detail}; data {pg['data']}"
        return ServiceStatus("postgresql", True, pg.get("pid") if alive else None,
                             pg.get("port"), pg["uri"], alive, healthy, detail)
    # An external server: its password is never stored, so only see that it listens.
    host = urlsplit(pg["uri"]).hostname or "127.0.0.1"
    try:
        socket.create_connection((host, pg.get("port") or 5432), timeout=3).close()
        healthy, detail = True, "listening"
    except OSError as exc:
        healthy, detail = False, f"not reachable ({_exc_reason(exc)})"
    return ServiceStatus("postgresql", False, None, pg.get("port"), pg["uri"], healthy, healthy,
                         f"external server (never started or stopped by the stack); {detail}")


def _stop_postgres(pg: dict, timeout: float) -> None:
    data = pg["data"]
    try:
        _run([_pg_program("pg_ctl"), "-D", data, "-m", "fast", "-w", "-t",
              str(int(timeout)), "stop"], pg.get("user"), "pg_ctl stop",
             cwd=Path(data).parent, timeout=timeout + 10)
    except (StackError, ConfigError):
        if _alive(pg["pid"], pg.get("started")):
            _stop_process_group(pg["pid"], timeout, group=False)


def _stop_stale_postmaster(pg_ctl: str, data: Path, user: str | None) -> None:
    """A postmaster.pid left by a cluster `up` no longer knows of: stop it if it still runs."""
    pid = _postmaster_pid(data)
    if pid and _alive(pid, None):
        with contextlib.suppress(StackError):
            _run([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], user,
                 "pg_ctl stop (a PostgreSQL left running)", cwd=data.parent, timeout=60)


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _pg_program(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return str(versions[-1])
    raise ConfigError(
        f"no --backend-store-uri given and `{name}` is not installed, so the stack cannot run "
        "a PostgreSQL of its own: install the PostgreSQL server (e.g. apt-get install "
        "postgresql) or pass --backend-store-uri postgresql://USER@HOST:PORT/DATABASE")


def _run_as_user() -> str | None:
    """PostgreSQL refuses to run as root: then the cluster belongs to the user `postgres`."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(RUN_AS_ROOT_USER)
    except KeyError:
        raise StackError(
            f"running as root, and PostgreSQL refuses to run as root: the stack runs its "
            f"cluster as the user {RUN_AS_ROOT_USER!r}, which does not exist; create it "
            "(useradd --system postgres) or pass --backend-store-uri") from None
    return RUN_AS_ROOT_USER


def _give_to(path: Path, user: str) -> None:
    import pwd

    entry = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")] if path.stat().st_uid != entry.pw_uid else [path]:
        with contextlib.suppress(FileNotFoundError):
            os.chown(p, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    path.chmod(0o700)


def _check_reachable(path: Path, user: str) -> None:
    result = _as_user(["test", "-w", str(path), "-a", "-x", str(path)], user, cwd="/")
    if result.returncode != 0:
        raise StackError(
            f"the stack runs PostgreSQL as the user {user!r} (it refuses to run as root), and "
            f"{user!r} cannot reach {path}: a folder above it is closed to other users "
            "(e.g. /root); put the stack elsewhere (--folder /srv/trainpipe-stack) or open "
            "the folders above it (chmod o+x)")


def _as_user(cmd: list[str], user: str | None, cwd, timeout: float = 30,
             ) -> subprocess.CompletedProcess:
    kwargs = {}
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "MLFLOW_"))}
    if user is not None:
        env["HOME"] = str(cwd)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True, stdin=subprocess.DEVNULL,
                          **kwargs)


def _run(cmd: list[str], user: str | None, what: str, cwd, timeout: float,
         log: Path | None = None) -> None:
    try:
        result = _as_user(cmd, user, cwd, timeout)
    except subprocess.TimeoutExpired:
        raise StackError(f"{what}: no answer within {timeout:.0f} s"
                         f"{_log_tail(log)}") from None
    except OSError as exc:
        raise StackError(f"{what}: cannot run {cmd[0]} ({exc})") from None
    if result.returncode != 0:
        output = " ".join((result.stderr or result.stdout).split())[-600:]
        raise StackError(redact_text(f"{what} failed (exit {result.returncode}): {output}"
                                     f"{_log_tail(log)}"))


# -------------------------------------------------------------------------------- MLflow


def _start_mlflow(folder: Path, state: dict, backend_uri: str, port: int | None,
                  artifacts_destination: str | None, workers: int, timeout: float,
                  env: dict) -> None:
    previous = state.get("mlflow") or {}
    if port is None:
        port = previous.get("port") or DEFAULT_PORT
    if port == 0:
        port = _free_port()
    if not _port_free(port):
        raise StackError(f"port {port} on 127.0.0.1 is already in use by another program; "
                         "pass --port (0: any free port) or stop that program")
    artifacts = _artifacts_location(artifacts_destination, previous.get("artifacts")
                                    or str(folder / "artifacts"))
    if artifacts.startswith("s3://"):
        _check_bucket(artifacts, env)
    else:
        Path(artifacts.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    server_env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")
                  or k in ("MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS")}
    server_env |= {"MLFLOW_BACKEND_STORE_URI": backend_uri,
                   # The job runner (GenAI scorers) spawns four more processes; trainpipe
                   # needs none of it.
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                   "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
           str(port), "--workers", str(workers), "--serve-artifacts",
           "--artifacts-destination", artifacts]
    log = folder / "mlflow.log"
    with open(log, "ab") as out:
        out.write(f"--- trainpipe stack up: {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"mlflow server on 127.0.0.1:{port} ---\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, cwd=folder, env=server_env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    state["mlflow"] = {"pid": proc.pid, "started": _start_time(proc.pid), "port": port,
                       "backend": redact_uri(backend_uri), "artifacts": artifacts,
                       "workers": workers, "log": str(log)}
    _save_state(folder, state)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(port):
            code = proc.poll()
            if code is not None:
                raise StackError(f"the MLflow server exited (code {code}) before it was "
                                 f"healthy{_log_tail(log)}")
            if time.monotonic() > deadline:
                raise StackError(f"the MLflow server on 127.0.0.1:{port} was not healthy "
                                 f"within {timeout:.0f} s{_log_tail(log)}")
            time.sleep(0.2)
    except BaseException:
        _stop_process_group(proc.pid, 15)
        proc.wait()
        state["mlflow"]["pid"] = None
        _save_state(folder, state)
        raise
    proc.returncode = 0  # it runs on, detached: no "still running" warning when proc goes


def _mlflow_alive(ml: dict | None) -> bool:
    return bool(ml and ml.get("pid") and _alive(ml["pid"], ml.get("started"))
                and _healthy(ml["port"]))


def _mlflow_status(ml: dict) -> ServiceStatus:
    alive = bool(ml.get("pid")) and _alive(ml["pid"], ml.get("started"))
    healthy = alive and _healthy(ml["port"])
    detail = (f"healthy; backend {ml['backend']}; artifacts {ml['artifacts']}" if healthy
              else "running but not answering /health" if alive
              else "not running (`trainpipe stack up` starts it)")
    return ServiceStatus("mlflow", True, ml["pid"] if alive else None, ml["port"],
                         f"http://127.0.0.1:{ml['port']}", alive, healthy, detail)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _artifacts_location(destination: str | None, default: str | None) -> str:
    if destination is None:
        return default
    if destination.startswith("s3://"):
        return destination.rstrip("/")
    return str(Path(destination.removeprefix("file://")).expanduser().resolve())


def _check_bucket(destination: str, env: dict) -> None:
    """The artifacts bucket exists and these credentials may use it (10 s at most)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket = destination.removeprefix("s3://").split("/", 1)[0]
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    where = f"endpoint {redact_uri(endpoint)}" if endpoint else "AWS S3"
    try:
        session = boto3.session.Session(
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
            region_name=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
            profile_name=env.get("AWS_PROFILE") if not env.get("AWS_ACCESS_KEY_ID") else None)
        s3 = session.client("s3", endpoint_url=endpoint, config=Config(
            connect_timeout=3, read_timeout=5, retries={"total_max_attempts": 2}))
        s3.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise StackError(f"--artifacts-destination {destination}: no S3 credentials found; "
                         "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                         ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise StackError(f"--artifacts-destination {destination}: the bucket {bucket!r} "
                             f"does not exist ({where}); create it first") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StackError(f"--artifacts-destination {destination}: access denied ({where}): "
                             "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
                             ) from None
        raise StackError(f"--artifacts-destination {destination}: {where} answered "
                         f"{redact_text(str(exc))}") from None
    except BotoCoreError as exc:
        raise StackError(f"--artifacts-destination {destination}: {where} cannot be reached "
                         f"({redact_text(str(exc))})") from None


# ----------------------------------------------------------------------------- processes


def _alive(pid: int, started: int | None) -> bool:
    """The process runs, and is the one recorded (same start time: pids get reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's (e.g. the postmaster, as root it is ours to signal)
    if started is None:
        return True
    now = _start_time(pid)
    return now is None or now == started


def _start_time(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces: count fields after its closing ')'
    fields = stat.rsplit(")", 1)[1].split()
    state = fields[0]
    if state == "Z":  # a zombie is gone for all purposes
        return -1
    return int(fields[19])


def _stop_process_group(pid: int, timeout: float, group: bool = True) -> None:
    """SIGTERM (the whole group: the server and its workers), then SIGKILL after timeout."""
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = _group_alive(pid) if group else _alive(pid, None)
        if not running:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for killpg: look for a live member
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _stop_started(folder: Path, state: dict, started: list[str]) -> None:
    """Undo a failed `up`: stop what this call started (a server that failed its start
    has stopped itself already), keep the rest."""
    pg = state.get("postgresql")
    if "postgresql" in started and pg and pg.get("pid"):
        _stop_postgres(pg, 30)
        pg["pid"] = None
    if state:
        _save_state(folder, state)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- helpers


def _normalise_pg(uri: str) -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; trainpipe ships psycopg2."""
    scheme, rest = uri.split("://", 1)
    if scheme.lower() in ("postgresql", "postgres"):
        return "postgresql+psycopg2://" + rest
    return uri


def _libpq_uri(uri: str) -> str:
    return "postgresql://" + uri.split("://", 1)[1]


def _without_userinfo(uri: str) -> str:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _pg_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact_text(text.removeprefix("FATAL: ").strip())


def _exc_reason(reason: object) -> str:
    if isinstance(reason, BaseException):
        text = str(reason.strerror or reason) if isinstance(reason, OSError) else str(reason)
        return redact_text(text or type(reason).__name__)
    return redact_text(str(reason))


def _log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None:
        return ""
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    if not text:
        return ""
    return redact_text(f"\nlast lines of {log}:\n" + "\n".join(text))


def _load_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StackError(f"{folder / STATE_FILE}: unreadable ({exc}); remove it after "
                         "stopping the stack's processes by hand") from None


def _save_state(folder: Path, state: dict) -> None:
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(folder / STATE_FILE)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One `up` or `down` at a time per stack folder."""
    import fcntl

    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def as_dict(item: StackInfo | ServiceStatus) -> dict:
    """JSON-ready form (for `--json` output)."""
    return asdict(item)
