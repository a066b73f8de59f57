"""`trainpipe clean`: remove published outputs from the lake, safely.

Only step outputs are touched, never the raw zone. Never removed: the outputs the current
config needs (the fingerprints it computes, as `trainpipe run` would) and those of each
`--keep-config`; of the rest, the newest `keep` per step stay. An output is retracted
manifest first, so no reader trusts files that are about to go. Attempt folders no
manifest names (a crashed or out-raced writer) are removed once they are an hour old, so
a writer still at work is never disturbed. With `models`, the MLflow logged models of
removed train outputs go too, artifacts included (they are most of `mlruns/`).
"""

import json
import posixpath
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

from trainpipe.catalog import output_base
from trainpipe.errors import ConfigError, SourceError
from trainpipe.lake import Lake
from trainpipe.pipeline import STEP_NAMES, ZONES, catalog_for
from trainpipe.redaction import redact_uri
from trainpipe.steps import ingest

ABANDONED_AFTER = 3600  # seconds


@dataclass
class Cleaning:
    """What `clean` removed (or, in a dry run, would remove)."""

    removed: list[str] = field(default_factory=list)  # output and attempt folder URLs
    models: list[str] = field(default_factory=list)  # "models:/m-... (artifacts at ...)"
    models_left: list[str] = field(default_factory=list)  # a model not deleted, and why
    needed: int = 0  # outputs kept because a protected config needs them


def needed_outputs(cfg: DictConfig) -> set[str]:
    """The output prefixes a run of `cfg` reads or reuses: its fingerprints, per step."""
    catalog = catalog_for(cfg, ingest.read_sources(cfg))
    return {catalog.prefix(step) for step in ZONES}


def clean(cfg: DictConfig, step: str | None, keep: int, keep_configs: tuple = (),
          dry_run: bool = False, models: bool = False) -> Cleaning:
    """Remove the outputs of `cfg`'s dataset that neither `cfg` nor any of `keep_configs`
    needs, keeping the newest `keep` per step as well."""
    if step is not None and step not in ZONES:
        what = "publishes nothing" if step in STEP_NAMES else "is not a step"
        raise ConfigError(f"--step {step}: {what}; steps with published outputs: "
                          f"{', '.join(ZONES)}")
    if keep < 0:
        raise ConfigError(f"--keep {keep}: must be 0 or more")
    needed = set()
    for protected in (cfg, *keep_configs):
        try:
            needed |= needed_outputs(protected)
        except SourceError as exc:
            raise SourceError(f"cannot tell which outputs {_which(protected, cfg)} needs, so "
                              f"nothing was removed: {exc}") from None
    tracking = None
    if models:  # an unreachable tracking server stops clean before anything is removed
        from trainpipe.tracking import Tracking

        tracking = Tracking(cfg)
    lake = Lake(cfg.lake.root)
    result = Cleaning()
    model_uris = []
    for name in [step] if step else list(ZONES):
        outputs = lake.outputs(output_base(cfg.dataset.name, name, ZONES[name]))
        manifests = {prefix: manifest for prefix, manifest in outputs if manifest}
        newest = sorted(manifests, key=lambda p: manifests[p]["created"], reverse=True)
        kept = set(newest[:keep]) | (needed & set(manifests))
        result.needed += len(needed & set(manifests))
        for prefix in newest:
            if prefix in kept:
                continue
            if name == "train" and models:
                model_uris.append(_model_uri(lake, prefix, manifests[prefix]))
            if not dry_run:
                lake.remove(prefix)
            result.removed.append(lake.url(prefix))
        for prefix, manifest in outputs:
            if manifest is None or prefix in kept:
                result.removed += _abandoned_attempts(lake, prefix, manifest, dry_run)
    if tracking is not None:
        _delete_models(tracking, [u for u in model_uris if u], dry_run, result)
    return result


def _which(protected: DictConfig, current: DictConfig) -> str:
    return "the current config" if protected is current else "a --keep-config"


def _model_uri(lake: Lake, prefix: str, manifest: dict) -> str | None:
    try:
        return json.loads(lake.read(prefix, "model.json", manifest))["model_uri"]
    except (FileNotFoundError, SourceError, KeyError, ValueError):
        return None  # an output without its pointer: no model to name


def _delete_models(tracking, model_uris: list[str], dry_run: bool, result: Cleaning) -> None:
    """Delete each logged model from the store (MLflow's soft delete, which `mlflow gc`
    completes) and its artifacts (the space). Left alone, and said so: a model the store
    does not hold (made with another tracking URI) and one the model registry serves."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from trainpipe.tracking import sqlite_path

    path = sqlite_path(tracking.uri)
    if path is not None and not path.exists():
        result.models_left += [f"{uri}: no MLflow store at {path}" for uri in model_uris]
        return
    for uri in model_uris:
        model_id = uri.removeprefix("models:/")
        try:
            model = tracking.client.get_logged_model(model_id)
        except MlflowException:
            result.models_left.append(f"{uri}: not in the store {redact_uri(tracking.uri)}")
            continue
        versions = tracking.client.search_model_versions(f"source_path = '{uri}'")
        if versions:  # the registry serves it: deleting it would break those versions
            names = ", ".join(f"{v.name} version {v.version}" for v in versions)
            result.models_left.append(f"{uri}: registered as {names}")
            continue
        result.models.append(f"{uri} (artifacts at {redact_uri(model.artifact_location)})")
        if not dry_run:
            tracking.client.delete_logged_model(model_id)
            get_artifact_repository(model.artifact_location).delete_artifacts()


def _abandoned_attempts(lake: Lake, prefix: str, manifest: dict | None,
                        dry_run: bool) -> list[str]:
    in_use = {f["path"].split("/")[0] for f in (manifest or {}).get("files", {}).values()}
    removed = []
    for attempt, _ in lake.outputs(prefix):
        name = posixpath.basename(attempt)
        if name in in_use:
            continue
        try:
            started = time.mktime(time.strptime(name.split("-")[0], "%Y%m%dT%H%M%S"))
        except ValueError:
            continue  # not an attempt folder
        if time.mktime(time.gmtime()) - started > ABANDONED_AFTER:
            if not dry_run:
                lake.remove(attempt)
            removed.append(lake.url(attempt))
    return removed
