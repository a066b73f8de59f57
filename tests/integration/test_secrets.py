"""No secret reaches a param, tag, log line, artifact or error message.

The session's backend store URI carries the database role's password, and the AWS keys
are in the environment of the server and of every run. After runs through the server,
a run straight on the database (tracking.uri = the PostgreSQL URI with its password) and
failures, every place the tests can reach is searched for both secrets: all rows of all
tables in PostgreSQL, every object in every bucket, the server's log and state files, the
runs' output, the server's command line, the local folders."""

import os
import uuid
from pathlib import Path

import pytest
from integration_support import (
    AWS_SECRET,
    FAST,
    LAKE_BUCKET,
    PG_PASSWORD,
    admin_connect,
    free_port,
    run_env,
    s3_keys,
    s3_read,
    trainpipe,
    upload_demo,
)

from trainpipe import stack
from trainpipe.redaction import MASK

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

SECRETS = {"PostgreSQL password": PG_PASSWORD, "AWS secret key": AWS_SECRET}


def leaks(where: str, text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [f"{name} in {where}" for name, secret in SECRETS.items() if secret in text]


def test_no_secret_reaches_anything(server, database, moto, aws_env, tmp_path):
    upload_demo(moto, "secrets")
    outputs = []
    common = ("lake=s3", f"lake.root=s3://{LAKE_BUCKET}/secrets", *FAST)
    # 1. through the server (whose backend store URI holds the password)
    via_server = trainpipe("run", "tracking=server", "tracking.experiment=secrets", *common,
                           "--verbose", cwd=tmp_path, env=run_env(server, aws_env))
    assert via_server.returncode == 0, via_server.stdout + via_server.stderr
    outputs.append(via_server)
    # 2. straight on the database, the password in tracking.uri (params, tags, summary)
    # (a registry of its own: the first run's champion keeps its files behind the server)
    direct = trainpipe("run", f"tracking.uri={database.uri}", "tracking.experiment=direct",
                       "registry.name=direct", *common, "--force", cwd=tmp_path,
                       env=run_env(server, aws_env))
    assert direct.returncode == 0, direct.stdout + direct.stderr
    outputs.append(direct)
    # 3. failures, with the secrets in reach of the error messages
    bad_bucket = trainpipe("run", "tracking=server", "lake=s3",
                           "lake.root=s3://no-such-bucket/lake", *FAST, "--verbose",
                           cwd=tmp_path, env=run_env(server, aws_env))
    assert bad_bucket.returncode == 2
    outputs.append(bad_bucket)
    inspect = trainpipe("inspect", f"tracking.uri={database.uri}", *common, cwd=tmp_path,
                        env=run_env(server, aws_env))
    outputs.append(inspect)
    with pytest.raises(stack.StackError) as refused:
        stack.up(tmp_path / "other-stack", port=0, backend_store_uri=database.uri.replace(
            database.uri.split("@", 1)[1].split("/")[0], f"127.0.0.1:{free_port()}"))

    found = []
    for i, result in enumerate(outputs):
        found += leaks(f"output of run {i + 1}", result.stdout + result.stderr)
    found += leaks("stack.up's error", str(refused.value))

    # PostgreSQL: every row of every table (params, tags, metrics, runs, inputs, models...)
    dump = database.dump()
    assert "trainpipe.kind" in dump and "lake.root" in dump  # the dump holds the runs
    found += leaks("the tracking database", dump)
    (tracking_param,) = database.query(
        "select distinct p.value from params p join runs r on p.run_uuid = r.run_uuid "
        "join experiments e on r.experiment_id = e.experiment_id "
        "where e.name = 'direct' and p.key = 'tracking.uri'")
    assert MASK in tracking_param[0]  # redacted, not merely absent

    # S3: every object of every bucket (artifacts: models, plots, config.yaml, reports;
    # the lake: data, manifests)
    s3 = moto.client()
    objects = 0
    for bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        for key in s3_keys(moto, bucket):
            objects += 1
            found += leaks(f"s3://{bucket}/{key}", key + "\n")
            found += leaks(f"s3://{bucket}/{key}", s3_read(moto, bucket, key))
    assert objects > 20

    # The stack's files (state, server log) and the server's command line
    for path in Path(server.folder).rglob("*"):
        if path.is_file():
            found += leaks(str(path), path.read_bytes())
    (mlflow,) = [s for s in stack.status(server.folder) if s.name == "mlflow"]
    found += leaks("the server's command line", Path(f"/proc/{mlflow.pid}/cmdline").read_bytes())

    # Local files the runs left (the direct run's artifacts live in the working folder)
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            found += leaks(str(path), path.read_bytes())
    assert any(tmp_path.rglob("MLmodel"))  # the direct run's artifacts were searched

    assert not found, found


def test_password_in_a_tracking_server_uri_is_never_shown(server, moto, aws_env, tmp_path):
    """http://user:password@host: MLflow sends it as basic auth; trainpipe never shows it."""
    upload_demo(moto, "userinfo")
    host = server.tracking_uri.split("://", 1)[1]
    uri = f"http://alice:{PG_PASSWORD}@{host}"
    result = trainpipe("run", "tracking=server", f"tracking.uri={uri}", "lake=s3",
                       f"lake.root=s3://{LAKE_BUCKET}/userinfo", *FAST, cwd=tmp_path,
                       env=run_env(server, aws_env))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"http://alice:{MASK}@{host}" in result.stdout
    assert leaks("the output", result.stdout + result.stderr) == [], result.stdout + result.stderr


def test_env_secrets_are_masked_in_free_text(monkeypatch):
    from trainpipe.redaction import redact_text, redact_uri

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)
    text = f"botocore said {AWS_SECRET}; libpq said password={PG_PASSWORD} host=db"
    assert leaks("text", redact_text(text)) == []
    assert redact_text("dsn: host=db password=hunter2 user=x") == (
        f"dsn: host=db password={MASK} user=x")
    assert redact_text("export AWS_SECRET_ACCESS_KEY='abc/def'") == (
        f"export AWS_SECRET_ACCESS_KEY='{MASK}'")
    assert redact_uri(f"s3://bucket/{AWS_SECRET}/x") == f"s3://bucket/{MASK}/x"
    assert redact_text("https://h/x?X-Amz-Signature=abc&part=1 ok") == (
        f"https://h/x?X-Amz-Signature={MASK}&part=1 ok")
    # ordinary words survive
    assert redact_text("max_tokens: 5, password_file=/etc/x") == (
        "max_tokens: 5, password_file=/etc/x")
    assert os.environ["PGPASSWORD"] == PG_PASSWORD


def test_passwords_with_a_raw_at_or_slash_are_never_shown(server, database, moto, aws_env,
                                                          tmp_path):
    """A password with a raw '@' (tracking server: requests takes it whole) or a raw '/'
    (PostgreSQL: SQLAlchemy takes it whole) works, so the runs succeed: no part of it
    reaches the output, a param, a tag or the database."""
    upload_demo(moto, "rawchars")
    at_mark, slash_mark = f"at{uuid.uuid4().hex}", f"slash{uuid.uuid4().hex}"
    at_password = f"pa@ss{at_mark}SECRET"  # masked before as far as its '@' only
    slash_password = f"ab/cd{slash_mark}SECRET9"  # not masked at all before
    role = f"{database.role}_raw"
    conn = admin_connect()
    with conn.cursor() as cur:  # a member of the database's owner: it may use its tables
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s IN ROLE {database.role}",
                    (slash_password,))
    conn.close()
    host = server.tracking_uri.split("://", 1)[1]
    pg_host = database.uri.split("@", 1)[1].split("/", 1)[0]
    common = ("lake=s3", f"lake.root=s3://{LAKE_BUCKET}/rawchars", *FAST)
    try:
        via_server = trainpipe("run", "tracking=server", f"tracking.uri=http://bob:{at_password}"
                               f"@{host}", "tracking.experiment=raw-at", *common, cwd=tmp_path,
                               env=run_env(server, aws_env))
        assert via_server.returncode == 0, via_server.stdout + via_server.stderr
        assert f"http://bob:{MASK}@{host}" in via_server.stdout
        direct = trainpipe("run", f"tracking.uri=postgresql://{role}:{slash_password}@{pg_host}"
                           f"/{database.name}", "tracking.experiment=raw-slash",
                           "registry.name=raw-slash", *common, cwd=tmp_path,
                           env=run_env(server, aws_env))
        assert direct.returncode == 0, direct.stdout + direct.stderr
        assert f"postgresql://{role}:{MASK}@{pg_host}/{database.name}" in direct.stdout
    finally:
        conn = admin_connect()
        with conn.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        conn.close()

    places = {"output of the run through the server": via_server.stdout + via_server.stderr,
              "output of the run on the database": direct.stdout + direct.stderr,
              "the tracking database": database.dump()}
    places |= {str(p): p.read_bytes().decode(errors="replace") for p in tmp_path.rglob("*")
               if p.is_file() and p.stat().st_size < 50_000_000}
    found = [f"{mark} in {where}" for where, text in places.items()
             for mark in (at_mark, slash_mark) if mark in text]
    assert not found, found
    for experiment in ("raw-at", "raw-slash"):
        recorded = database.query(
            "select p.value, t.value from params p join tags t on p.run_uuid = t.run_uuid "
            "join runs r on p.run_uuid = r.run_uuid join experiments e "
            "on r.experiment_id = e.experiment_id where e.name = %s "
            "and p.key = 'tracking.uri' and t.key = 'trainpipe.overrides'", (experiment,))
        assert recorded, experiment
        for param, tag in recorded:  # masked, not merely absent
            assert f":{MASK}@" in param and f":{MASK}@" in tag, (param, tag)
