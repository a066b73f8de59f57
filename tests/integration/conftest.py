"""Integration tests against real services, all on 127.0.0.1: PostgreSQL, a `moto` S3
server process and a real `mlflow server` process started by trainpipe.stack.

Per session: one moto server (buckets for the lake and for MLflow's artifacts), one
database and role of their own on the machine's PostgreSQL (made here, dropped at the
end; the role has a password, so redaction is tested against a real one), and one MLflow
server started with `stack.up` on that database and the artifacts bucket.

A missing service fails the run in CI (CI=true) and skips these tests elsewhere. Point
the tests at another PostgreSQL with TRAINPIPE_TEST_POSTGRES (an admin URI; default
postgresql://postgres@127.0.0.1:5432/postgres).
"""

import uuid

import pytest
from integration_support import (
    ADMIN_URI,
    ARTIFACTS_BUCKET,
    AWS_KEY_ID,
    AWS_SECRET,
    LAKE_BUCKET,
    PG_PASSWORD,
    Database,
    Moto,
    admin_connect,
    clean_env,
    start_moto,
    stop,
    unavailable,
)

from trainpipe import stack


@pytest.fixture(scope="session")
def moto(tmp_path_factory) -> Moto:
    server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    s3 = server.client()
    for bucket in (LAKE_BUCKET, ARTIFACTS_BUCKET):
        s3.create_bucket(Bucket=bucket)
    yield server
    stop(server.proc)



@pytest.fixture(scope="session")
def aws_env(moto) -> dict[str, str]:
    """What a user exports to use the S3 endpoint (here: moto)."""
    return {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

@pytest.fixture(scope="session")
def database() -> Database:
    suffix = uuid.uuid4().hex[:10]
    name = role = f"trainpipe_test_{suffix}"
    conn = admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (PG_PASSWORD,))
        cur.execute(f"CREATE DATABASE {name} OWNER {role}")
    conn.close()
    base = ADMIN_URI.rsplit("/", 1)[0]
    host = base.split("@", 1)[-1]
    db = Database(name, role, f"postgresql://{role}:{PG_PASSWORD}@{host}/{name}",
                  f"{base}/{name}")
    yield db
    conn = admin_connect()
    with conn.cursor() as cur:
        cur.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                    "where datname = %s and pid <> pg_backend_pid()", (name,))
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"DROP ROLE IF EXISTS {role}")
    conn.close()

@pytest.fixture(scope="session")
def server(tmp_path_factory, database, aws_env) -> stack.StackInfo:
    """`stack up` on the test database, artifacts proxied to the moto bucket."""
    folder = tmp_path_factory.mktemp("stack")
    env = clean_env() | aws_env
    try:
        info = stack.up(folder, port=0, backend_store_uri=database.uri,
                        artifacts_destination=f"s3://{ARTIFACTS_BUCKET}/mlartifacts", env=env)
    except stack.StackError as exc:
        unavailable(f"the MLflow server did not start: {exc}")
    yield info
    stack.down(folder)
