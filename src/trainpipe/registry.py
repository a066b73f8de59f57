"""The MLflow Model Registry: the one module that talks to it.

A registered model (a name) holds numbered versions; two aliases name the ones that matter:

- `challenger`: the version the latest pipeline run registered;
- `champion`: the version in use (what `models:/NAME@champion` loads).

Every alias move is recorded on the version that gets the alias, as version tags:
`trainpipe.<alias>.set_by` (who), `.set_at` (when, UTC) and `.why`; the version that loses
the champion alias gets `trainpipe.champion.unset_by`, `.unset_at`, `.unset_why`. A version
that becomes champion also keeps `trainpipe.champion.previous`, the version that held the
alias before it: `rollback` follows it back (and again, one step each time).

The registry lives in the tracking store (SQLite or the tracking server). MLflow is
imported when a Registry is made, never when this module is.
"""

import getpass
from dataclasses import dataclass, field
from datetime import UTC, datetime

from omegaconf import DictConfig

from trainpipe.errors import ConfigError
from trainpipe.redaction import redact_text, redact_uri, shorten

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS = "trainpipe.champion.previous"
NONE = "none"  # PREVIOUS of the first champion


@dataclass(frozen=True)
class Version:
    """One registered model version, as trainpipe reads it."""

    name: str
    version: int
    source: str  # the model's URI (models:/m-...)
    run_id: str | None  # the run that logged the model (train)
    created: datetime
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Move:
    """An alias move: who, when, why."""

    why: str
    who: str = field(default_factory=lambda: _user())
    when: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class Registry:
    """The registry of the config's tracking store (`tracking.uri`)."""

    def __init__(self, cfg: DictConfig):
        from trainpipe.tracking import Tracking

        tracking = Tracking(cfg)  # fails fast on a dead server; bounds MLflow's retries
        self.client, self.uri = tracking.client, tracking.uri

    @property
    def _writer(self):
        """Tags and aliases are written through the registry client under MlflowClient: it
        writes the same, without MlflowClient's check before every write that the name is no
        prompt, which loads the registered model with all its versions (a gate's dozen
        writes cost O(versions) each). The names written here are registered models."""
        return self.client._get_registry_client()

    # ------------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return sorted(m.name for m in self.client.search_registered_models(max_results=1000))

    def versions(self, name: str) -> list[Version]:
        """Every version of `name`, newest first; a ConfigError naming the registered
        models when `name` is not one."""
        aliases: dict[int, list[str]] = {}
        for alias, number in self._require(name).aliases.items():
            aliases.setdefault(int(number), []).append(alias)
        found = self.client.search_model_versions(f"name = '{_quoted(name)}'",
                                                  max_results=10_000)
        # (searches leave the aliases out: they come from the registered model)
        return sorted((_version(v, aliases.get(int(v.version), ())) for v in found),
                      key=lambda v: -v.version)

    def version(self, name: str, version: int | str) -> Version:
        self._require(name)
        from mlflow.exceptions import MlflowException

        try:
            return _version(self.client.get_model_version(name, str(version)))
        except MlflowException:
            numbers = ", ".join(str(v.version) for v in self.versions(name)) or "none"
            raise ConfigError(f"{name} has no version {version!r} (versions: {numbers})"
                              ) from None

    def holder(self, name: str, alias: str) -> Version | None:
        """The version holding `alias`, or None (also when `name` is not registered)."""
        from mlflow.exceptions import MlflowException

        try:
            return _version(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as exc:
            if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise

    def test_metrics(self, version: Version) -> dict[str, float]:
        """The test metrics recorded on the version's logged model (by the pipeline run that
        evaluated it); {} when there are none."""
        from mlflow.exceptions import MlflowException

        if not version.source.startswith("models:/m-"):
            return {}
        try:
            model = self.client.get_logged_model(version.source.removeprefix("models:/"))
        except MlflowException:
            return {}
        return {m.key: m.value for m in model.metrics or [] if m.key.startswith("test_")}

    def load(self, version: Version):
        """The version's scikit-learn pipeline (raw rows in, predictions out); a ValueError
        when the version is no scikit-learn model, a ConfigError when its files are behind
        a tracking server this store is not."""
        import mlflow.sklearn
        from mlflow.exceptions import MlflowException

        if version.source.startswith("models:/m-") and not self.uri.startswith(
                ("http://", "https://")):
            model = self.client.get_logged_model(version.source.removeprefix("models:/"))
            if str(model.artifact_location).startswith("mlflow-artifacts:"):
                raise ConfigError(
                    f"version {version.version} of {version.name} keeps its files behind an "
                    f"MLflow tracking server ({model.artifact_location}), and this run's "
                    f"tracking.uri {redact_uri(self.uri)} is not that server: run with the "
                    "server's URI (tracking=server) to compare with it, or register under "
                    "another registry.name")
        try:
            return mlflow.sklearn.load_model(version.uri)
        except MlflowException as exc:
            if "flavor" not in str(exc):
                raise
            raise ValueError(f"it is not a scikit-learn model ({shorten(exc.message, 200)})"
                             ) from None

    # ------------------------------------------------------------------------ writing

    def register(self, name: str, model_uri: str, tags: dict[str, str]) -> tuple[Version, bool]:
        """`model_uri` as a version of `name` (made when missing): (version, made now). A
        model that already is a version of `name` is that version: registering it again
        (a re-run, another gate config) never makes a second one."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, description="Registered by trainpipe: see the versions' trainpipe.* tags")
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        existing = self.client.search_model_versions(
            f"name = '{_quoted(name)}' and source_path = '{_quoted(model_uri)}'")
        if existing:
            return _version(min(existing, key=lambda v: int(v.version))), False
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith(
            "models:/m-") else None
        made = self.client.create_model_version(
            name, model_uri, tags={k: redact_text(str(v)) for k, v in tags.items()},
            model_id=model_id, await_creation_for=0)
        if model_id:
            self._link(model_id, name, int(made.version))
        return _version(made), True

    def set_tags(self, version: Version, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException

        for key, value in tags.items():
            for attempt in range(3):
                try:
                    self._writer.set_model_version_tag(version.name, str(version.version), key,
                                                      redact_text(str(value)))
                    break
                except MlflowException as exc:
                    # The store sets a tag by select-then-insert: two runs setting the same
                    # tag at once (both crowning over one champion) collide on its key. The
                    # tag exists now, so a second try updates it.
                    if "unique" not in str(exc).lower() or attempt == 2:
                        raise

    def move(self, version: Version, alias: str, move: Move,
             tags: dict[str, str] | None = None) -> Version | None:
        """Give `alias` to `version`, recording who, when and why (and `tags`) on it; return
        the version that held it before (None if none, or `version` itself: nothing moves)."""
        before = self.holder(version.name, alias)
        if before is not None and before.version == version.version:
            return None
        self._writer.set_registered_model_alias(version.name, alias, str(version.version))
        self.set_tags(version, {f"trainpipe.{alias}.set_by": move.who,
                                f"trainpipe.{alias}.set_at": move.when,
                                f"trainpipe.{alias}.why": move.why, **(tags or {})})
        if alias == CHAMPION and before is not None:
            self.set_tags(before, {"trainpipe.champion.unset_by": move.who,
                                   "trainpipe.champion.unset_at": move.when,
                                   "trainpipe.champion.unset_why": f"version {version.version} "
                                                                   f"became champion: {move.why}"})
        return before

    def crown(self, version: Version, champion: Version | None, why: str) -> None:
        """`version` becomes the champion, after `champion` (the current one, or None); it
        keeps which one that was, for `rollback`."""
        self.move(version, CHAMPION, Move(why),
                  {PREVIOUS: str(champion.version) if champion else NONE})

    def promote(self, name: str, version: int | str, why: str) -> tuple[Version, Version | None]:
        """`version` becomes the champion: (the new champion, the one before it)."""
        target = self.version(name, version)
        before = self.holder(name, CHAMPION)
        if before is not None and before.version == target.version:
            raise ConfigError(f"version {target.version} of {name} is the champion already")
        self.crown(target, before, why)
        return target, before

    def rollback(self, name: str, why: str) -> tuple[Version, Version]:
        """The champion goes back to the version that held it before the current one:
        (the new champion, the one it replaced). The restored version keeps its own record
        of what came before it, so a second rollback goes one step further back."""
        current = self.holder(name, CHAMPION)
        if current is None:
            self._require(name)
            raise ConfigError(f"{name} has no champion to roll back")
        previous = current.tags.get(PREVIOUS, NONE)
        if previous == NONE:
            raise ConfigError(f"nothing to roll back to: version {current.version} of {name} "
                              "is the first champion trainpipe knows of (no "
                              f"{PREVIOUS} tag); choose one: trainpipe registry promote {name} "
                              "VERSION")
        target = self.version(name, previous)
        self.move(target, CHAMPION, Move(f"rollback from version {current.version}: {why}"))
        return target, current

    # ------------------------------------------------------------------------ helpers

    def _require(self, name: str):
        """The registered model `name`; a ConfigError naming the registered ones if none."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            names = self.names()
            known = f"registered models: {', '.join(names)}" if names else "none is registered"
            raise ConfigError(f"no registered model {name!r} in {redact_uri(self.uri)} "
                              f"({known})") from None

    def _link(self, model_id: str, name: str, version: int) -> None:
        """List the version on the logged model (MLflow's Models page shows it), as
        mlflow.register_model does."""
        import json

        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        model = self.client.get_logged_model(model_id)
        listed = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        listed.append({"name": name, "version": version})
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


def _version(mv, aliases=None) -> Version:
    return Version(mv.name, int(mv.version), str(mv.source), mv.run_id,
                   datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
                   tuple(sorted(mv.aliases or aliases or ())), dict(mv.tags or {}))


def _quoted(value: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
