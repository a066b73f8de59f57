"""The local production-like stack: PostgreSQL as MLflow's backend store, and an MLflow
tracking server on 127.0.0.1 whose artifacts it proxies to S3 or to a folder.

    up(...)      start what is missing, health-check it, return where it is (StackInfo)
    status(...)  each part: pid, port, health (ServiceStatus)
    down(...)    stop what `up` started, and nothing else

PostgreSQL is either an existing server (`backend_store_uri`) or, when none is given, a
cluster of the stack's own under `<folder>/postgres` (made with `initdb`, started with
`pg_ctl` on a free port; owned by the user `postgres` when run as root, since PostgreSQL
refuses to run as root). Its data and the artifacts folder survive `down` and `up`.

The stack's own cluster lets no one in without its superuser's password (scram-sha-256,
TCP on 127.0.0.1 only, no Unix socket): a password `up` generates and keeps in
`<folder>/postgres/password` (mode 0600, readable by the user who runs `up` alone), and
gives the MLflow server in its environment (`PGPASSWORD`). It is never shown, logged or
written elsewhere. A cluster made by an older trainpipe, which trusted every local
connection, is stopped, given a password and restarted by the next `up`.

What `up` started is recorded in `<folder>/stack.json` (pids with their start times, so a
recycled pid is never mistaken for ours; ports; URIs with passwords masked). No secret is
written there: the server gets the backend store URI through its environment
(`MLFLOW_BACKEND_STORE_URI`), not its command line, and every message is redacted.
Starting, health-checking and stopping processes, the state file and ports are
`trainpipe.supervise`'s.
"""

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from trainpipe import supervise
from trainpipe.errors import ConfigError
from trainpipe.redaction import redact_text, redact_uri

DEFAULT_FOLDER = ".trainpipe/stack"
DEFAULT_PORT = 5000
STATE_FILE = "stack.json"
DATABASE = "mlflow"  # the database the stack's own cluster holds MLflow's tables in
SUPERUSER = "postgres"  # the stack's own cluster's superuser (password, 127.0.0.1 only)
RUN_AS_ROOT_USER = "postgres"  # who runs the stack's own cluster when `up` runs as root
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
PASSWORD_FILE = "password"  # in <folder>/postgres: the own cluster superuser's password
# The own cluster's pg_hba.conf: the password for every connection (there is no Unix
# socket; `local` covers one, should a later option make it).
HBA = """\
# Written by trainpipe stack up: every connection needs the password (scram-sha-256).
local  all  all                 scram-sha-256
host   all  all  127.0.0.1/32   scram-sha-256
host   all  all  ::1/128        scram-sha-256
"""

# A part of the stack cannot be started, reached or stopped: the message says which and
# why (a server refusing connections, a port in use, a missing program, ...).
StackError = supervise.ServiceError


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
class _Backend:
    """The backend store as the MLflow server gets it."""

    uri: str  # an external server's may hold its password: never stored
    env: dict[str, str] = field(repr=False)  # more for the server's environment (PGPASSWORD)
    new_credentials: bool  # its password changed in this call: a running server restarts


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
    with supervise.locked(folder / ".lock"):
        state = _load_state(folder)
        running = state.get("mlflow") if _mlflow_alive(state.get("mlflow")) else None
        try:
            if running:
                _check_matches(running, port, backend_store_uri, artifacts_destination)
            if running and not (state.get("postgresql") or {}).get("managed"):
                # on an external server: it is not ours to start; MLflow already uses it
                reused.append("mlflow")
            else:
                backend = _ensure_postgres(folder, state, backend_store_uri, env, started,
                                           reused)
                if (running and redact_uri(backend.uri) == running["backend"]
                        and not backend.new_credentials):
                    reused.append("mlflow")
                else:
                    if running:  # its cluster came back on another port or password
                        supervise.stop(_process(running), 15)
                    _start_mlflow(folder, state, backend, port, artifacts_destination,
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
    with supervise.locked(folder / ".lock"):
        state = _load_state(folder)
        ml = state.get("mlflow")
        if ml and ml.get("pid"):
            if supervise.stop(_process(ml), timeout):
                stopped.append(f"mlflow server (pid {ml['pid']}, port {ml['port']})")
            ml["pid"] = None
        pg = state.get("postgresql")
        if pg and pg.get("managed") and pg.get("pid"):
            if supervise.alive(_process(pg)):
                _stop_postgres(pg, timeout)
                stopped.append(f"postgresql (pid {pg['pid']}, port {pg['port']})")
            pg["pid"] = None
        _save_state(folder, state)
    return stopped


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
                     env: dict, started: list, reused: list) -> _Backend:
    """The backend store as the MLflow server is to get it (with its password, if any:
    never stored)."""
    pg = state.get("postgresql") or {}
    if backend_store_uri is None:
        if pg and not pg.get("managed"):
            if "***" not in pg["uri"]:  # no password in it (PGPASSWORD, ~/.pgpass): reuse
                _check_postgres(pg["uri"], create_database=True)
                return _Backend(pg["uri"], {}, new_credentials=False)
            raise StackError(
                f"the stack in {folder} runs on the PostgreSQL at {pg['uri']}, whose password "
                "is never stored: pass --backend-store-uri again (or keep the password in "
                "PGPASSWORD or ~/.pgpass, out of the URI)")
        return _ensure_own_cluster(folder, state, started, reused)
    if pg.get("managed") and pg.get("pid") and supervise.alive(_process(pg)):
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
    return _Backend(uri, {}, new_credentials=False)


def _ensure_own_cluster(folder: Path, state: dict, started: list, reused: list) -> _Backend:
    from trainpipe.tuning import study_database  # `trainpipe tune` keeps its studies there

    pg = state.get("postgresql") or {}
    pg_dir = folder / "postgres"
    data = pg_dir / "data"
    if pg.get("managed") and pg.get("pid") and supervise.alive(_process(pg)):
        if _secured(data):
            password = _read_password(data)
            try:
                _check_postgres(pg["uri"], create_database=True, password=password)
                _check_postgres(study_database(pg["uri"]), create_database=True,
                                password=password)
            except StackError:
                pass  # alive but not answering: restart it below
            else:
                reused.append("postgresql")
                return _Backend(pg["uri"], {"PGPASSWORD": password}, new_credentials=False)
        else:  # an older trainpipe's cluster, open to every local user: secure it first
            _stop_postgres(pg, 30)
    initdb, pg_ctl = _pg_program("initdb"), _pg_program("pg_ctl")
    user = _run_as_user()
    pg_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _give_to(pg_dir, user)
        _check_reachable(pg_dir, user)
    else:
        pg_dir.chmod(0o700)
    if not (data / "PG_VERSION").exists():
        # trust only until _secure below: the cluster never runs before it has a password
        _run([initdb, "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
              "--locale=C", "--no-sync"], user, "initdb (making the PostgreSQL cluster)",
             cwd=pg_dir, timeout=180)
    elif (data / "postmaster.pid").exists():
        _stop_stale_postmaster(pg_ctl, data, user)
    new_credentials = not _secured(data)
    if new_credentials:
        _secure(data, user)
    password = _read_password(data)
    port = (pg.get("port") if pg.get("port") and supervise.port_free(pg["port"])
            else supervise.free_port())
    log = pg_dir / "postgres.log"
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    _run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "90", "start"],
         user, f"pg_ctl start (PostgreSQL on 127.0.0.1:{port})", cwd=pg_dir, timeout=120,
         log=log)
    pid = _postmaster_pid(data)
    uri = f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
    state["postgresql"] = {"managed": True, "pid": pid, "started": supervise.start_time(pid),
                           "port": port, "data": str(data), "user": user, "uri": uri,
                           "log": str(log)}
    _save_state(folder, state)
    started.append("postgresql")
    _check_postgres(uri, create_database=True, password=password)
    _check_postgres(study_database(uri), create_database=True, password=password)
    return _Backend(uri, {"PGPASSWORD": password}, new_credentials)


def _secured(data: Path) -> bool:
    """The cluster has its password file, and wants that password from every connection."""
    try:
        return _password_file(data).is_file() and (data / "pg_hba.conf").read_text() == HBA
    except OSError:
        return False


def _secure(data: Path, user: str | None) -> None:
    """Give the superuser of a stopped cluster a password (a new one, unless the password
    file has one already) and require it from every connection. Each step may be redone:
    a failure half-way leaves a cluster that the next `up` secures again."""
    password_file = _password_file(data)
    if not password_file.is_file():
        _write_private(password_file, secrets.token_urlsafe(32))
    verifier = _scram_verifier(_read_password(data))
    # single-user mode: no connection is possible while the password changes; the server
    # receives the verifier only, and the statement never reaches a log
    pg_ctl = Path(_pg_program("pg_ctl"))
    postgres = pg_ctl.with_name("postgres")  # the server of the same version as pg_ctl
    _run([str(postgres) if postgres.exists() else _pg_program("postgres"), "--single",
          "-D", str(data), "-c", "log_min_error_statement=panic", "postgres"], user,
         "setting the password of the stack's PostgreSQL superuser", cwd=data.parent,
         timeout=120, input=f"ALTER ROLE {SUPERUSER} PASSWORD '{verifier}';\n",
         fail_on="ERROR:")
    hba = data / "pg_hba.conf"
    tmp = data / ".pg_hba.conf.tmp"
    tmp.write_text(HBA)
    tmp.chmod(0o600)
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(tmp, entry.pw_uid, entry.pw_gid)
    tmp.replace(hba)


def _password_file(data: Path) -> Path:
    return data.parent / PASSWORD_FILE


def _read_password(data: Path) -> str:
    path = _password_file(data)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise StackError(f"{path}: cannot read the stack's PostgreSQL password "
                         f"({exc.strerror}); run `trainpipe stack` as the user who ran "
                         "`trainpipe stack up`") from None


def _write_private(path: Path, text: str) -> None:
    """Write `path` readable and writable by this user alone (0600), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    tmp.replace(path)


def _scram_verifier(password: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for a scram-sha-256 password (RFC 5802, RFC 7677): the
    password itself never leaves this process. (`password` is ASCII: SASLprep keeps it.)"""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _check_postgres(uri: str, create_database: bool, password: str | None = None) -> None:
    """Connect (5 s at most); create the database when it is missing and allowed to.
    password: for the stack's own cluster (else libpq's: the URI, PGPASSWORD, ~/.pgpass)."""
    import psycopg2

    dsn = _libpq_uri(uri)
    secret = {"password": password} if password is not None else {}
    try:
        psycopg2.connect(dsn, connect_timeout=5, **secret).close()
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
        conn = psycopg2.connect(admin, connect_timeout=5, **secret)
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
        alive = bool(pg.get("pid")) and supervise.alive(_process(pg))
        healthy, detail = True, "accepting connections"
        try:
            if not _secured(Path(pg["data"])):
                raise StackError("it lets every local user in without a password (made by "
                                  "an older trainpipe): `trainpipe stack up` secures it")
            _check_postgres(pg["uri"], create_database=False,
                            password=_read_password(Path(pg["data"])))
        except StackError as exc:
            healthy, detail = False, str(exc)
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
        healthy, detail = False, f"not reachable ({supervise.exception_reason(exc)})"
    return ServiceStatus("postgresql", False, None, pg.get("port"), pg["uri"], healthy, healthy,
                         f"external server (never started or stopped by the stack); {detail}")


def _stop_postgres(pg: dict, timeout: float) -> None:
    data = pg["data"]
    try:
        _run([_pg_program("pg_ctl"), "-D", data, "-m", "fast", "-w", "-t",
              str(int(timeout)), "stop"], pg.get("user"), "pg_ctl stop",
             cwd=Path(data).parent, timeout=timeout + 10)
    except (StackError, ConfigError):
        supervise.stop(_process(pg), timeout, group=False)


def _stop_stale_postmaster(pg_ctl: str, data: Path, user: str | None) -> None:
    """A postmaster.pid left by a cluster `up` no longer knows of: stop it if it still runs."""
    pid = _postmaster_pid(data)
    if pid and supervise.alive(supervise.Process(pid)):
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
    """Hand the cluster's folder to `user`; the password file stays ours alone."""
    import pwd

    entry = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")] if path.stat().st_uid != entry.pw_uid else [path]:
        if p.name == PASSWORD_FILE and p.parent == path:
            continue
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
             input: str | None = None) -> subprocess.CompletedProcess:
    kwargs = {}
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    if input is None:
        kwargs["stdin"] = subprocess.DEVNULL
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "MLFLOW_"))}
    if user is not None:
        env["HOME"] = str(cwd)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True, input=input, **kwargs)


def _run(cmd: list[str], user: str | None, what: str, cwd, timeout: float,
         log: Path | None = None, input: str | None = None, fail_on: str | None = None,
         ) -> None:
    """Run a PostgreSQL program; StackError when it fails (exit code, or `fail_on` in its
    output: `postgres --single` exits 0 after a failed statement)."""
    try:
        result = _as_user(cmd, user, cwd, timeout, input=input)
    except subprocess.TimeoutExpired:
        raise StackError(f"{what}: no answer within {timeout:.0f} s"
                         f"{supervise.log_tail(log)}") from None
    except OSError as exc:
        raise StackError(f"{what}: cannot run {cmd[0]} ({exc})") from None
    output = result.stderr + result.stdout
    if result.returncode != 0 or (fail_on and fail_on in output):
        # the input may hold a secret: the output is shown, never the input
        shown = " ".join((result.stderr or result.stdout).split())[-600:]
        raise StackError(redact_text(f"{what} failed (exit {result.returncode}): {shown}"
                                     f"{supervise.log_tail(log)}"))


# -------------------------------------------------------------------------------- MLflow


def _start_mlflow(folder: Path, state: dict, backend: _Backend, port: int | None,
                  artifacts_destination: str | None, workers: int, timeout: float,
                  env: dict) -> None:
    previous = state.get("mlflow") or {}
    if port is None:
        port = previous.get("port") or DEFAULT_PORT
    if port == 0:
        port = supervise.free_port()
    if not supervise.port_free(port):
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
    server_env |= backend.env | {
        "MLFLOW_BACKEND_STORE_URI": backend.uri,
        # The job runner (GenAI scorers) spawns four more processes; trainpipe needs none.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
           str(port), "--workers", str(workers), "--serve-artifacts",
           "--artifacts-destination", artifacts]
    log = folder / "mlflow.log"
    server = supervise.start(cmd, env=server_env, cwd=folder, log=log,
                             banner=f"trainpipe stack up: mlflow server on 127.0.0.1:{port}")
    state["mlflow"] = {"pid": server.pid, "started": server.started, "port": port,
                       "backend": redact_uri(backend.uri), "artifacts": artifacts,
                       "workers": workers, "log": str(log)}
    _save_state(folder, state)
    try:
        supervise.wait_until_healthy(server, _health_url(port), timeout,
                                     f"the MLflow server on 127.0.0.1:{port}")
    except BaseException:
        supervise.stop(server, 15)
        state["mlflow"]["pid"] = None
        _save_state(folder, state)
        raise


def _health_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/health"


def _mlflow_alive(ml: dict | None) -> bool:
    return bool(ml and ml.get("pid") and supervise.alive(_process(ml))
                and supervise.answers(_health_url(ml["port"])))


def _mlflow_status(ml: dict) -> ServiceStatus:
    alive = bool(ml.get("pid")) and supervise.alive(_process(ml))
    healthy = alive and supervise.answers(_health_url(ml["port"]))
    detail = (f"healthy; backend {ml['backend']}; artifacts {ml['artifacts']}" if healthy
              else "running but not answering /health" if alive
              else "not running (`trainpipe stack up` starts it)")
    return ServiceStatus("mlflow", True, ml["pid"] if alive else None, ml["port"],
                         f"http://127.0.0.1:{ml['port']}", alive, healthy, detail)


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


# ------------------------------------------------------------------------------- helpers


def _stop_started(folder: Path, state: dict, started: list[str]) -> None:
    """Undo a failed `up`: stop what this call started (a server that failed its start
    has stopped itself already), keep the rest."""
    pg = state.get("postgresql")
    if "postgresql" in started and pg and pg.get("pid"):
        _stop_postgres(pg, 30)
        pg["pid"] = None
    if state:
        _save_state(folder, state)


def _process(recorded: dict) -> supervise.Process:
    """A service's process as `stack.json` records it."""
    return supervise.Process(recorded["pid"], recorded.get("started"))


def _normalise_pg(uri: str) -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; trainpipe ships psycopg2."""
    scheme, rest = uri.split("://", 1)
    if scheme.lower() in ("postgresql", "postgres"):
        return "postgresql+psycopg2://" + rest
    return uri


def _libpq_uri(uri: str) -> str:
    return "postgresql://" + uri.split("://", 1)[1]


def _pg_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact_text(text.removeprefix("FATAL: ").strip())


def _load_state(folder: Path) -> dict:
    return supervise.read_state(folder / STATE_FILE)


def _save_state(folder: Path, state: dict) -> None:
    supervise.write_state(folder / STATE_FILE, state)


def as_dict(item: StackInfo | ServiceStatus) -> dict:
    """JSON-ready form (for `--json` output)."""
    return asdict(item)
