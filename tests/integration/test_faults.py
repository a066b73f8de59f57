"""Faults against the real services, each with the message the user sees."""

import json
import signal
import time

import pytest
from integration_support import (
    FAST,
    LAKE_BUCKET,
    PG_PASSWORD,
    TcpProxy,
    check_manifests,
    free_port,
    run_env,
    runs_of,
    s3_keys,
    start_moto,
    start_trainpipe,
    stop,
    trainpipe,
    upload_demo,
)

from trainpipe import stack, supervise

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_tracking_server_unreachable_fails_fast(server, moto, aws_env, tmp_path):
    """No data in the lake's raw zone yet: the run fails on the server before any work,
    the demo data included."""
    uri = f"http://alice:{PG_PASSWORD}@127.0.0.1:{free_port()}"
    # bounded: the check gives up after about 10 s (the test waits generously, and asserts
    # what matters: it stopped before any work)
    result = trainpipe("run", "tracking=server", f"tracking.uri={uri}", "lake=s3",
                       f"lake.root=s3://{LAKE_BUCKET}/unreachable", *FAST, cwd=tmp_path,
                       env=run_env(server, aws_env), timeout=120)
    err = one_line(result.stderr)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"http://alice:***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in err
    assert "cannot be reached" in err
    assert PG_PASSWORD not in result.stdout + result.stderr
    assert s3_keys(moto, LAKE_BUCKET, "unreachable/") == []  # before any work


def test_check_tracking_server(server):
    supervise.check_tracking_server(server.tracking_uri)  # answers: no error
    port = free_port()
    with pytest.raises(supervise.TrackingUnreachable) as caught:
        supervise.check_tracking_server(f"http://bob:{PG_PASSWORD}@127.0.0.1:{port}", timeout=5)
    message = str(caught.value)
    assert f"http://bob:***@127.0.0.1:{port}" in message and PG_PASSWORD not in message
    assert "Connection refused" in message and caught.value.exit_code == 2
    supervise.check_tracking_server("sqlite:///mlflow.db")  # not a server: nothing to check


@pytest.mark.slow
def test_s3_endpoint_going_away_fails_the_run_cleanly(server, database, moto, aws_env,
                                                       tmp_path):
    """The lake's endpoint vanishes mid-run (a relay in front of moto closes): bounded
    retries, then a clear failure; every run ends FAILED; no manifest names a file that is
    not whole."""
    upload_demo(moto, "vanish")
    proxy = TcpProxy(int(moto.endpoint.rsplit(":", 1)[1]))
    proxied = f"http://127.0.0.1:{proxy.port}"
    proc = start_trainpipe("run", "tracking=server", "lake=s3",
                           f"lake.root=s3://{LAKE_BUCKET}/vanish", "tracking.experiment=vanish",
                           *FAST, cwd=tmp_path,
                           env=run_env(server, aws_env, AWS_ENDPOINT_URL=proxied))
    try:
        deadline = time.monotonic() + 120
        while not any(k.endswith("manifest.json")
                      for k in s3_keys(moto, LAKE_BUCKET, "vanish/landing/")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the validate step never published"
            time.sleep(0.05)
        proxy.close()
        out, err = proc.communicate(timeout=300)  # bounded retries end it; wait generously
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
    err = one_line(err)
    assert proc.returncode == 1, out + err
    assert f"the S3 endpoint {proxied} cannot be reached; gave up after 4 attempts" in err
    assert "Traceback" not in err

    runs = runs_of(database, "vanish")
    assert runs and "RUNNING" not in {r["status"] for r in runs}
    (parent,) = [r for r in runs if r["tags"].get("trainpipe.kind") == "pipeline"]
    assert parent["status"] == "FAILED"
    # The step whose publish failed and the steps computed after it (they could publish
    # nothing) end FAILED; none of them has a manifest, and every manifest is whole.
    failed = [r for r in runs if r["status"] == "FAILED" and r is not parent]
    assert failed
    manifests = check_manifests(moto, "vanish")
    for run in failed:
        assert not [m for m in manifests if run["tags"]["trainpipe.fingerprint"] in m]
    assert any("/validate/" in m for m in manifests)


@pytest.fixture(scope="module")
def moto_with_auth(tmp_path_factory):
    """A moto server that checks credentials: one IAM user with full rights (the first
    three requests, which create it, go unchecked), and a bucket made with its key."""
    server = start_moto(tmp_path_factory.mktemp("moto-auth") / "moto.log",
                        {"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    iam.create_user(UserName="trainpipe")
    key = iam.create_access_key(UserName="trainpipe")["AccessKey"]
    iam.put_user_policy(UserName="trainpipe", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    s3 = server.client(key["AccessKeyId"], key["SecretAccessKey"])
    s3.create_bucket(Bucket="locked")
    yield server, key["AccessKeyId"]
    stop(server.proc)


@pytest.mark.parametrize("wrong", ["unknown key", "wrong secret"])
def test_wrong_s3_credentials(wrong, moto_with_auth, server, aws_env, tmp_path):
    auth_moto, key_id = moto_with_auth
    env = run_env(server, aws_env, AWS_ENDPOINT_URL=auth_moto.endpoint)
    if wrong == "wrong secret":
        env["AWS_ACCESS_KEY_ID"] = key_id  # a real key, with someone else's secret
    result = trainpipe("run", "tracking=server", "lake=s3", "lake.root=s3://locked/lake",
                       *FAST, cwd=tmp_path, env=env)
    err = one_line(result.stderr)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "s3://locked/lake/raw/hotel_bookings/train.csv" in err
    assert f"access denied (endpoint {auth_moto.endpoint})" in err
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE" in err
    assert "Traceback" not in err and aws_env["AWS_SECRET_ACCESS_KEY"] not in err


def test_missing_bucket(server, aws_env, tmp_path):
    result = trainpipe("run", "tracking=server", "lake=s3", "lake.root=s3://no-such-bucket/lake",
                       *FAST, cwd=tmp_path, env=run_env(server, aws_env))
    err = one_line(result.stderr)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (f"the bucket 'no-such-bucket' does not exist (endpoint "
            f"{aws_env['AWS_ENDPOINT_URL']}); create it or fix the URL") in err
    assert "Traceback" not in err


def test_missing_source_bucket_is_named(server, aws_env, tmp_path):
    result = trainpipe("run", "tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/x",
                       "dataset.source=s3://no-such-bucket/raw/train.csv", *FAST,
                       cwd=tmp_path, env=run_env(server, aws_env))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "s3://no-such-bucket/raw/train.csv: cannot read it: the bucket 'no-such-bucket' " \
           "does not exist" in one_line(result.stderr)


def test_stack_up_when_postgres_refuses(tmp_path, aws_env):
    port = free_port()  # nothing listens there
    uri = f"postgresql://trainpipe:{PG_PASSWORD}@127.0.0.1:{port}/mlflow"
    with pytest.raises(stack.StackError) as caught:
        stack.up(tmp_path / "stack", port=0, backend_store_uri=uri)
    message = str(caught.value)
    assert message.startswith(f"PostgreSQL at postgresql+psycopg2://trainpipe:***@127.0.0.1:"
                              f"{port}/mlflow refuses connections")
    assert "Connection refused" in message and PG_PASSWORD not in message
    assert caught.value.exit_code == 2
    # nothing was started, nothing is left running
    assert not any(s.running for s in stack.status(tmp_path / "stack"))
    state = tmp_path / "stack" / "stack.json"
    assert not state.exists() or PG_PASSWORD not in state.read_text()


# An endpoint that accepts connections and never answers (a hung server, a black-holed
# network): every call has a bounded total time, and SIGTERM ends the process in bounded
# time even then. The subprocess waits below are generous bounds, not measurements.

def frozen_mid_run(moto, server, aws_env, tmp_path, root: str, *, s3: bool, **env: str):
    """A run whose S3 endpoint (s3=True) or tracking server freezes once validate has
    published: (process, proxy)."""
    upload_demo(moto, root)
    target = moto.endpoint if s3 else server.tracking_uri
    proxy = TcpProxy(int(target.rsplit(":", 1)[1]))
    proxied = f"http://127.0.0.1:{proxy.port}"
    extra = {"AWS_ENDPOINT_URL": proxied} if s3 else {"MLFLOW_TRACKING_URI": proxied}
    proc = start_trainpipe("run", "tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/"
                           f"{root}", f"tracking.experiment={root}", *FAST, cwd=tmp_path,
                           env=run_env(server, aws_env, **extra, **env))
    deadline = time.monotonic() + 180
    while not any(k.endswith("manifest.json")
                  for k in s3_keys(moto, LAKE_BUCKET, f"{root}/landing/")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the validate step never published"
        time.sleep(0.05)
    proxy.freeze()
    return proc, proxy


@pytest.mark.slow
def test_a_frozen_s3_endpoint_fails_the_run_within_its_time_limit(server, database, moto,
                                                                  aws_env, tmp_path):
    proc, proxy = frozen_mid_run(moto, server, aws_env, tmp_path, "frozen-s3", s3=True,
                                 TRAINPIPE_S3_TIMEOUT="5")
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proxy.close()
    err = one_line(err)
    assert proc.returncode == 1, out + err
    assert "did not finish within 5 s" in err and "accepts connections but does not answer" in err
    assert "Traceback" not in err
    runs = runs_of(database, "frozen-s3")
    assert runs and "RUNNING" not in {r["status"] for r in runs}
    check_manifests(moto, "frozen-s3")  # what was published is whole


@pytest.mark.slow
@pytest.mark.parametrize("frozen", ["s3", "tracking"])
def test_sigterm_ends_the_process_even_when_a_server_hangs(server, database, moto, aws_env,
                                                           tmp_path, frozen):
    root = f"sigterm-{frozen}"
    # a frozen tracking server never answers: the run waits for it 4 s (of its
    # TRAINPIPE_INTERRUPT_WAIT), not the default 20
    wait = {"TRAINPIPE_INTERRUPT_WAIT": "4"} if frozen == "tracking" else {}
    proc, proxy = frozen_mid_run(moto, server, aws_env, tmp_path, root, s3=frozen == "s3",
                                 **wait)
    try:
        time.sleep(1)  # calls are now hanging on the frozen server
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)  # bounded: it winds down, then exits
    finally:
        proxy.close()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err
    if frozen == "s3":  # the tracking server answers: every run ended KILLED or FINISHED
        statuses = {r["status"] for r in runs_of(database, root)}
        assert "RUNNING" not in statuses and "KILLED" in statuses
    else:  # it could not be told; the next run marks what was left RUNNING as KILLED
        result = trainpipe("run", "tracking=server", "lake=s3",
                           f"lake.root=s3://{LAKE_BUCKET}/{root}", f"tracking.experiment={root}",
                           *FAST, cwd=tmp_path, env=run_env(server, aws_env))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "RUNNING" not in {r["status"] for r in runs_of(database, root)}


def test_a_frozen_tracking_server_is_named_before_any_work(server, moto, aws_env, tmp_path):
    proxy = TcpProxy(int(server.tracking_uri.rsplit(":", 1)[1]))
    proxy.freeze()
    try:
        result = trainpipe("run", "tracking=server",
                           f"tracking.uri=http://127.0.0.1:{proxy.port}", "lake=s3",
                           f"lake.root=s3://{LAKE_BUCKET}/frozen-server", *FAST, cwd=tmp_path,
                           env=run_env(server, aws_env), timeout=120)
    finally:
        proxy.close()
    err = one_line(result.stderr)
    assert result.returncode == 2, result.stdout + err
    assert f"http://127.0.0.1:{proxy.port} cannot be reached (timed out)" in err
    assert s3_keys(moto, LAKE_BUCKET, "frozen-server/") == []  # before any work
