"""The register step and `trainpipe registry` on the stack: the registered model, its
versions, aliases and tags are rows in PostgreSQL (through the MLflow server), and the
champion loads through the server from the artifacts bucket."""

import mlflow
import pytest
from integration_support import FAST, LAKE_BUCKET, run_env, trainpipe, upload_demo

from trainpipe import demo

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

NAME = "stack_hotels"
WORSE = ("model.params.n_estimators=1", "model.params.max_depth=1")


def aliases(database) -> dict[str, int]:
    return dict(database.query(
        "select alias, version from registered_model_aliases where name = %s", (NAME,)))


def version_tags(database, version: int) -> dict[str, str]:
    return dict(database.query(
        "select key, value from model_version_tags where name = %s and version = %s",
        (NAME, version)))


def test_register_and_the_champion_on_the_stack(server, database, moto, aws_env, tmp_path):
    upload_demo(moto, "registry")
    env = run_env(server, aws_env)
    run = ("run", "tracking=server", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/registry",
           "tracking.experiment=registry", f"registry.name={NAME}")

    first = trainpipe(*run, *FAST, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "promoted version 1 to champion: no champion before" in first.stdout
    assert aliases(database) == {"champion": 1, "challenger": 1}
    (source,) = database.query("select source from model_versions where name = %s", (NAME,))
    assert source[0].startswith("models:/m-")

    # A worse model: scored against the champion, which loads from S3 through the server.
    worse = trainpipe(*run, *WORSE, cwd=tmp_path, env=env)
    assert worse.returncode == 0, worse.stdout + worse.stderr
    assert "kept champion version 1: test_roc_auc" in worse.stdout
    assert aliases(database) == {"champion": 1, "challenger": 2}
    tags = version_tags(database, 2)
    assert tags["trainpipe.gate"] == "failed"
    assert tags["trainpipe.gate.decision"].startswith("kept champion version 1: test_roc_auc")

    # CI/CD: the same config with require_promotion exits 4 and registers nothing new.
    again = trainpipe(*run, *WORSE, "registry.require_promotion=true", cwd=tmp_path, env=env)
    assert again.returncode == 4, again.stdout + again.stderr
    assert f"not promoted: version 2 of {NAME} (registry.require_promotion=true)" in (
        " ".join(again.stderr.split()))
    assert database.query("select count(*) from model_versions where name = %s",
                          (NAME,)) == [(2,)]

    # People move the champion by hand; the tags say who, when and why.
    listing = trainpipe("registry", NAME, "tracking=server", cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    assert f"{NAME} · tracking {server.tracking_uri}" in listing.stdout
    assert "challenger: version 2" in listing.stdout and "champion: version 1" in listing.stdout
    promote = trainpipe("registry", "promote", NAME, "2", "tracking=server", "--reason",
                        "shadow traffic", cwd=tmp_path, env=env)
    assert promote.returncode == 0, promote.stderr
    assert aliases(database)["champion"] == 2
    assert version_tags(database, 2)["trainpipe.champion.why"] == "shadow traffic"
    rollback = trainpipe("registry", "rollback", NAME, "tracking=server", cwd=tmp_path, env=env)
    assert rollback.returncode == 0, rollback.stderr
    assert aliases(database)["champion"] == 1
    assert version_tags(database, 1)["trainpipe.champion.why"].startswith(
        "rollback from version 2")

    # Straight on the database, the champion's files (behind the server) are out of reach:
    # said before anything is registered, and no champion moves. (Another seed: on the
    # champion's own test rows its recorded metrics would do, and its files are not read.)
    direct = trainpipe("run", "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/registry",
                       f"tracking.uri={database.uri}", "tracking.experiment=registry-direct",
                       f"registry.name={NAME}", "model.params.n_estimators=5", "seed=7",
                       cwd=tmp_path, env=env)
    assert direct.returncode == 2, direct.stdout + direct.stderr
    assert (f"error: version 1 of {NAME} keeps its files behind an MLflow tracking server "
            "(mlflow-artifacts:/") in " ".join(direct.stderr.split())
    assert "is not that server: run with the server's URI (tracking=server)" in " ".join(
        direct.stderr.split())
    assert database.uri.split("@")[0].split(":")[-1] not in direct.stdout + direct.stderr
    assert aliases(database)["champion"] == 1
    assert database.query("select count(*) from model_versions where name = %s",
                          (NAME,)) == [(2,)]

    # The champion is what `models:/NAME@champion` loads, through the server.
    mlflow.set_tracking_uri(server.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    rows = demo.hotel_bookings(rows=20, seed=4).drop(columns=["booking_status"])
    assert len(model.predict(rows)) == 20


def test_runs_setting_one_tag_at_once_all_succeed(server, database, aws_env, monkeypatch):
    """Two runs crowning over one champion set the same tags on it at once. The store sets a
    tag by select-then-insert, so one of them failed on the tag's key (seen in CI with two
    configs at once); now every writer's call succeeds and the tag holds one of the values."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import compose
    from trainpipe.registry import Registry, _version

    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    registry = Registry(compose(f"tracking.uri={server.tracking_uri}"))
    registry.client.create_registered_model("racing")
    made = registry.client.create_model_version("racing", "s3://nowhere/model")
    target = _version(made)

    def crown(writer: int) -> None:
        for round_ in range(10):
            registry.set_tags(target, {f"trainpipe.race.{round_}": f"writer {writer}"})

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(crown, range(6)))  # raises what any writer raised
    tags = version_tags_of(database, "racing", int(made.version))
    assert {k: v.startswith("writer ") for k, v in tags.items() if "race" in k} == {
        f"trainpipe.race.{r}": True for r in range(10)}


def version_tags_of(database, name: str, version: int) -> dict[str, str]:
    return dict(database.query(
        "select key, value from model_version_tags where name = %s and version = %s",
        (name, version)))
