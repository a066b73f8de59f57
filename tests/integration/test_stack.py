"""trainpipe.stack: up / status / down, with a PostgreSQL cluster of the stack's own and on
an existing server. (The `trainpipe stack ...` commands call these functions.)"""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import mlflow
import psycopg2
import pytest
from integration_support import (
    ARTIFACTS_BUCKET,
    as_user,
    clean_env,
    free_port,
    make_reachable_folder,
    make_trust_cluster,
    psql_as,
    remove_folder,
    unavailable,
)

from trainpipe import stack, supervise
from trainpipe.errors import ConfigError

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def by_name(services) -> dict[str, stack.ServiceStatus]:
    return {s.name: s for s in services}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def own_folder():
    """A stack folder the user `postgres` can reach when the tests run as root."""
    if not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        unavailable("initdb is not installed: the stack cannot run a PostgreSQL of its own")
    folder = make_reachable_folder("trainpipe-stack-test-")
    yield folder / "stack"
    stack.down(folder / "stack")
    remove_folder(folder)


@pytest.mark.slow
def test_own_cluster_up_status_down_up(own_folder, database):
    info = stack.up(own_folder, port=0, env=clean_env())
    assert info.started == ["postgresql", "mlflow"] and info.reused == []
    assert info.tracking_uri.startswith("http://127.0.0.1:")
    assert info.env == {"MLFLOW_TRACKING_URI": info.tracking_uri}
    assert info.artifacts_destination == str(own_folder / "artifacts")
    services = by_name(info.services)
    pg, ml = services["postgresql"], services["mlflow"]
    assert pg.managed and pg.running and pg.healthy and pg.pid
    assert ml.managed and ml.running and ml.healthy and ml.pid
    assert info.backend_store_uri == f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/mlflow"
    if os.geteuid() == 0:  # PostgreSQL never runs as root
        assert (own_folder / "postgres" / "data").stat().st_uid != 0
    print(f"stack up from nothing to healthy: {info.seconds:.1f} s")

    # idempotent: a second `up` reuses both, same processes
    again = stack.up(own_folder, env=clean_env())
    assert again.started == [] and again.reused == ["postgresql", "mlflow"]
    assert by_name(again.services)["mlflow"].pid == ml.pid

    # it works: a run with a param and an artifact
    mlflow.set_tracking_uri(info.tracking_uri)
    experiment = mlflow.create_experiment("survives")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_param("answer", 42)
        mlflow.log_text("kept", "note.txt")

    # down stops exactly what up started
    stopped = stack.down(own_folder)
    assert stopped == [f"mlflow server (pid {ml.pid}, port {ml.port})",
                       f"postgresql (pid {pg.pid}, port {pg.port})"]
    assert gone(ml.pid) and gone(pg.pid)
    after = by_name(stack.status(own_folder))
    assert not after["mlflow"].running and not after["postgresql"].running
    assert stack.down(own_folder) == []  # nothing left to stop

    # data survives down/up: same URI, same run, same artifact
    back = stack.up(own_folder, env=clean_env())
    assert back.started == ["postgresql", "mlflow"] and back.tracking_uri == info.tracking_uri
    mlflow.set_tracking_uri(back.tracking_uri)
    assert mlflow.get_run(run.info.run_id).data.params == {"answer": "42"}
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/note.txt") == "kept"

    # another backend while this one runs: `down` first
    with pytest.raises(stack.StackError, match=r"already runs \(pid \d+\) with backend "
                       r"postgresql\+psycopg2://postgres@.*, not postgresql\+psycopg2://"
                       r"trainpipe_test_\w+:\*\*\*@.*: run `trainpipe stack down` first"):
        stack.up(own_folder, backend_store_uri=database.uri, env=clean_env())
    # the server died, its own PostgreSQL runs on: switching backend still needs `down`
    server_pid = by_name(stack.status(own_folder))["mlflow"].pid
    os.killpg(server_pid, signal.SIGTERM)
    os.waitpid(server_pid, 0)
    with pytest.raises(stack.StackError, match="runs a PostgreSQL of its own .* run `trainpipe "
                       "stack down` before switching to --backend-store-uri"):
        stack.up(own_folder, backend_store_uri=database.uri, env=clean_env())
    assert by_name(stack.status(own_folder))["postgresql"].healthy


def test_stack_on_an_external_postgres_never_stops_it(server, database, aws_env, tmp_path):
    """A second stack on the session's database (another port): `down` stops its MLflow
    server only; PostgreSQL and the session's server go on."""
    folder = tmp_path / "second"
    info = stack.up(folder, port=0, backend_store_uri=database.uri,
                    artifacts_destination=f"s3://{ARTIFACTS_BUCKET}/second",
                    env=clean_env() | aws_env)
    try:
        pg = by_name(info.services)["postgresql"]
        assert not pg.managed and pg.pid is None and pg.healthy
        assert pg.address == database.uri.replace(database.uri.split(":")[2].split("@")[0],
                                                  "***").replace("postgresql://",
                                                                 "postgresql+psycopg2://")
        # `up` again without the URI: the running server is reused (no password needed)
        assert stack.up(folder, env=clean_env() | aws_env).reused == ["mlflow"]
    finally:
        stopped = stack.down(folder)
    assert len(stopped) == 1 and stopped[0].startswith("mlflow server")
    psycopg2.connect(database.admin_uri, connect_timeout=5).close()
    assert by_name(stack.status(server.folder))["mlflow"].healthy


def test_up_refuses_what_contradicts_the_running_stack(server):
    running = by_name(stack.status(server.folder))["mlflow"]
    other = free_port()
    with pytest.raises(stack.StackError, match=rf"already runs .* with port {running.port}, "
                       rf"not {other}: run `trainpipe stack down` first"):
        stack.up(server.folder, port=other)
    with pytest.raises(stack.StackError, match="with artifacts s3://"):
        stack.up(server.folder, artifacts_destination="/tmp/elsewhere")


def test_port_in_use_is_named(tmp_path, database, aws_env):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(stack.StackError, match=f"port {port} on 127.0.0.1 is already in "
                           "use by another program; pass --port"):
            stack.up(tmp_path / "s", port=port, backend_store_uri=database.uri,
                     env=clean_env() | aws_env)


def test_missing_artifacts_bucket_is_named(tmp_path, database, aws_env):
    with pytest.raises(stack.StackError, match="the bucket 'nope-bucket' does not exist"):
        stack.up(tmp_path / "s", port=0, backend_store_uri=database.uri,
                 artifacts_destination="s3://nope-bucket/x", env=clean_env() | aws_env)
    assert not any(s.running for s in stack.status(tmp_path / "s") if s.managed)
    assert stack.status(tmp_path / "s") == []  # checked before anything was started
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"port": 70000}, "--port 70000: must be between 1 and 65535"),
    ({"backend_store_uri": "mysql://u:secret@h/db"},
     r"--backend-store-uri mysql://u:\*\*\*@h/db: not a PostgreSQL URI"),
    ({"artifacts_destination": "gs://b/x"}, "--artifacts-destination gs://b/x: expected s3://"),
    ({"workers": 0}, "--workers 0: must be 1 or more"),
])
def test_argument_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message) as caught:
        stack.up(tmp_path / "s", **kwargs)
    assert caught.value.exit_code == 2 and "secret" not in str(caught.value)


def test_no_stack_no_status(tmp_path):
    assert stack.status(tmp_path / "nothing") == []
    assert stack.down(tmp_path / "nothing") == []


# ------------------------------------------------------- the own cluster's password (auth)

OTHER_USERS = ("nobody", "postgres")  # any local user; `postgres` runs the stack's cluster


def refused_without_the_password(port: int) -> None:
    """Nobody gets in without the password: not this user, not another local user, not the
    OS user the cluster runs as (with no password, or a wrong one)."""
    users = [None, *OTHER_USERS] if os.geteuid() == 0 else [None]
    for user in users:
        for password in (None, "postgres"):
            tried = psql_as(user, port, "COPY (SELECT 1) TO PROGRAM 'id'", password=password)
            assert tried.returncode != 0, (user, tried.stdout)
            assert ("no password supplied" in tried.stderr if password is None
                    else "password authentication failed" in tried.stderr), (user, tried.stderr)


def password_of(folder: Path) -> str:
    path = folder / "postgres" / "password"
    assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == os.geteuid()
    return path.read_text().strip()


@pytest.mark.slow
def test_own_cluster_lets_no_one_in_without_its_password(own_folder):
    info = stack.up(own_folder, port=0, env=clean_env())
    pg = by_name(info.services)["postgresql"]
    password = password_of(own_folder)
    assert len(password) >= 32
    refused_without_the_password(pg.port)
    if os.geteuid() == 0:  # another local user cannot read the password either
        for user in OTHER_USERS:
            read = subprocess.run(["cat", str(own_folder / "postgres" / "password")],
                                  capture_output=True, text=True, **as_user(user))
            assert read.returncode != 0 and "Permission denied" in read.stderr
    # with the password: in (what the MLflow server does, given it in its environment)
    assert psql_as(None, pg.port, "select current_user", password).stdout.strip() == "postgres"
    # beside MLflow's database, the one `trainpipe tune` keeps its studies in
    databases = psql_as(None, pg.port, "select datname from pg_database", password).stdout
    assert {"mlflow", "mlflow_optuna"} <= set(databases.split())
    mlflow.set_tracking_uri(info.tracking_uri)
    mlflow.create_experiment("with a password")

    # the password is never shown nor written elsewhere: state, logs, command lines, status
    ml = by_name(info.services)["mlflow"]
    places = {str(p): p.read_bytes() for p in own_folder.rglob("*")
              if p.is_file() and p.name != "password" and "data" not in p.parts}
    places |= {f"cmdline of {pid}": Path(f"/proc/{pid}/cmdline").read_bytes()
               for pid in (ml.pid, pg.pid)}
    places["what up returns"] = repr(info).encode()
    places["status"] = repr(stack.status(own_folder)).encode()
    assert {"stack.json", "mlflow.log", "postgres.log"} <= {Path(p).name for p in places}
    assert [where for where, text in places.items() if password.encode() in text] == []


@pytest.mark.slow
@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_an_older_trust_cluster_is_secured_by_up(running):
    """A cluster an older trainpipe made trusts every local connection: `up` stops it (when
    it runs), gives it a password, restarts it with its data and port, and says so in
    `status` until then."""
    if not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        unavailable("initdb is not installed: the stack cannot run a PostgreSQL of its own")
    root = make_reachable_folder("trainpipe-stack-trust-")
    folder = root / "stack"
    old: dict = {}
    try:
        old = make_trust_cluster(folder, running=running)
        if running:
            assert psql_as(None, old["port"]).returncode == 0  # anyone gets in
            (before,) = stack.status(folder)
            assert not before.healthy and "lets every local user in without a password" in (
                before.detail)
        info = stack.up(folder, port=0, env=clean_env())
        assert info.started == ["postgresql", "mlflow"]
        pg = by_name(info.services)["postgresql"]
        assert pg.healthy and pg.port == old["port"] and pg.pid != old["pid"]
        refused_without_the_password(pg.port)
        kept = psql_as(None, pg.port, "select note from kept", password_of(folder))
        assert kept.stdout.strip() == "made before", kept.stderr
        assert "trust" not in (Path(old["data"]) / "pg_hba.conf").read_text()
        mlflow.set_tracking_uri(info.tracking_uri)
        mlflow.create_experiment("after the upgrade")
        # the next `up` finds it secured: nothing restarts
        assert stack.up(folder, env=clean_env()).reused == ["postgresql", "mlflow"]
    finally:
        stack.down(folder)
        if old.get("pid"):
            supervise.stop(supervise.Process(old["pid"], old["started"]), 30, group=False)
        remove_folder(root)
