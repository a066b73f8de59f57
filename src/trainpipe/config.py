"""Compose the Hydra config: package defaults + a user's --config-dir + overrides."""

import contextlib
import itertools
import json
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainpipe.errors import ConfigError
from trainpipe.schema import TASKS, check_dataset_config

CONF_DIR = Path(__file__).parent / "conf"


def _by_task(task: str, classification: str, regression: str) -> str:
    """`${by_task:${dataset.task},Classifier,Regressor}`: one model file serves every task."""
    if task not in TASKS:
        raise ConfigError(f"dataset.task: {task!r} is not one of {', '.join(TASKS)}")
    return regression if task == "regression" else classification


def _env_or(name: str, default: str) -> str:
    """`${env_or:NAME,default}`: the environment variable NAME, or `default` when it is
    unset or empty. An empty MLFLOW_TRACKING_URI means unset, as MLflow reads it (Hydra's
    `oc.env` would give the empty string). Not cached: read each time a config resolves."""
    return os.environ.get(name) or default


OmegaConf.register_new_resolver("by_task", _by_task, replace=True)
OmegaConf.register_new_resolver("env_or", _env_or, replace=True)


def split_overrides(args: list[str]) -> list[str]:
    """One argument may hold several overrides ("model=lightgbm seed=3"), as `mlflow run`
    passes its single `overrides` parameter."""
    return [token for arg in args for token in shlex.split(arg)]


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """`-m` semantics: `seed=1,2 model=a,b` becomes the four override lists to run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = _parse(OverridesParser.create().parse_overrides, overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(combo) for combo in itertools.product(*choices)]


def compose(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The resolved config for one run; every error is a ConfigError naming the key.

    Hydra takes half a second to import and compose; what it composes depends only on the
    overrides and the config files, so it is kept (unresolved: environment variables are
    read each time) in the user's cache folder under a digest of them (COMPOSED)."""
    if config_dir is not None:
        path = Path(config_dir).resolve()
        if not path.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: no such folder")
        overrides = [f"hydra.searchpath=[file://{path}]", *overrides]
    kept = COMPOSED / f"{_compose_digest(overrides, config_dir)}.json"
    try:
        cfg = OmegaConf.create(json.loads(kept.read_text()))
    except (OSError, ValueError, OmegaConfBaseException):
        cfg = _hydra_compose(overrides, config_dir)
        _keep(kept, json.dumps(OmegaConf.to_container(cfg, resolve=False)))
    else:  # used: the least recently used go first (a config used every run is kept)
        with contextlib.suppress(OSError):
            os.utime(kept)
    OmegaConf.set_struct(cfg, False)
    try:
        OmegaConf.resolve(cfg)
    except ConfigError:
        raise
    except Exception as exc:
        missing = re.search(r"Environment variable '(\w+)' not found", str(exc))
        if missing:
            raise ConfigError(_missing_env_message(cfg, missing[1])) from None
        raise ConfigError(f"config: {_hydra_message(exc)}") from None
    check_dataset_config(cfg.dataset)
    check(cfg)
    return cfg


def _hydra_compose(overrides: list[str], config_dir: str | None) -> DictConfig:
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = _parse(_compose_adding, overrides)
    OmegaConf.set_struct(cfg, False)
    _sources_beside_the_dataset_file(cfg, overrides, config_dir)
    return cfg


COMPOSED = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainpipe" / (
    "composed")
KEEP_COMPOSED = 500  # configs kept; the least recently used go beyond that


def _compose_digest(overrides: list[str], config_dir: str | None) -> str:
    """What Hydra's compose reads: the overrides, trainpipe's and the --config-dir's YAML
    files (names and contents), and the versions of the code that composes."""
    import hashlib
    from importlib.metadata import version

    import trainpipe

    digest = hashlib.sha256("\0".join([trainpipe.__version__, version("hydra-core"),
                                        version("omegaconf"), *overrides]).encode())
    for folder in [CONF_DIR, *([Path(config_dir).resolve()] if config_dir else [])]:
        for file in sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml")):
            digest.update(b"\0" + str(file).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:32]


def _keep(path: Path, text: str) -> None:
    """Written whole or not at all (runs side by side); a home that cannot be written to
    only means composing again next time."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
        kept = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in kept[:max(0, len(kept) - KEEP_COMPOSED)]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _sources_beside_the_dataset_file(cfg: DictConfig, overrides: list[str],
                                     config_dir: str | None) -> None:
    """A relative `source:` written in a dataset file is relative to that file's folder (so
    the file and its data travel together); given on the command line, to the working
    folder, like any path typed in a shell."""
    if config_dir is None or not isinstance(cfg.get("dataset"), DictConfig):
        return
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("dataset=")]
    file = Path(config_dir).resolve() / "dataset" / f"{chosen[-1] if chosen else ''}.yaml"
    if not chosen or not file.is_file():
        return
    for key in ("source", "scoring_source"):
        if any(o.lstrip("+").startswith(f"dataset.{key}=") for o in overrides):
            continue
        raw = cfg.dataset._get_node(key)._value() if key in cfg.dataset else None
        if isinstance(raw, str) and raw and "${" not in raw and "://" not in raw and not (
                Path(raw).expanduser().is_absolute()):
            cfg.dataset[key] = str(file.parent / raw)


def _missing_env_message(cfg: DictConfig, name: str) -> str:
    """`lake.root: the environment variable TRAINPIPE_LAKE_ROOT is not set ...`"""
    keys = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, str) and f"oc.env:{name}" in value:
            keys.append(prefix)

    walk("", OmegaConf.to_container(cfg, resolve=False))
    key = keys[0] if keys else "config"
    return (f"{key}: the environment variable {name} is not set; export it, or pass "
            f"{key}=... on the command line")


# Names that become folders (lake prefixes) and run/model names: nothing that can climb out.
PLAIN_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]{1,100}")
PLAIN_NAME_RULE = "a plain name: letters, digits, '_', '-', '.' (and not '.' or '..')"
# The declared schema of trainpipe's own keys (the dataset file has its own: schema.py;
# model.params are checked by the estimator itself): key -> (type, rule, what it must be).
SCHEMA: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "seed": (int, lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295"),
    "force": (bool, lambda v: True, "true or false"),
    "split.val_size": (float, lambda v: 0 < v < 1, "a fraction of all rows, in (0, 1)"),
    "split.test_size": (float, lambda v: 0 < v < 1, "a fraction of all rows, in (0, 1)"),
    "validate.min_rows": (int, lambda v: v >= 1, "a whole number, 1 or more"),
    "validate.target_classes": (bool, lambda v: True, "true or false"),
    "validate.unique_id": (bool, lambda v: True, "true or false"),
    "validate.all_null_columns": (bool, lambda v: True, "true or false"),
    "evaluate.plots": (bool, lambda v: True, "true or false"),
    "lake.root": (str, bool, "a folder or an fsspec URL (s3://bucket/lake)"),
    "tracking.uri": (str, bool, "an MLflow tracking URI (sqlite:///mlflow.db, http://host:5000)"),
    "tracking.experiment": (str, lambda v: bool(v.strip()), "an experiment name, not empty"),
    "model.name": (str, lambda v: PLAIN_NAME.fullmatch(v) is not None, PLAIN_NAME_RULE),
    "model._target_": (str, bool, "an estimator class (module.Class)"),
    "model.preprocessing.scale_numeric": (bool, lambda v: True, "true or false"),
    "model.preprocessing.categorical_encoding": (str, lambda v: v in ("onehot", "ordinal"),
                                                 "onehot or ordinal"),
    "registry.name": (str, lambda v: PLAIN_NAME.fullmatch(v) is not None, PLAIN_NAME_RULE),
    "registry.require_promotion": (bool, lambda v: True, "true or false"),
    "registry.gate.beat_champion": (bool, lambda v: True, "true or false"),
    "registry.gate.min_delta": (float, lambda v: v >= 0, "a number, 0 or more"),
    "tune.trials": (int, lambda v: v >= 1, "a whole number, 1 or more"),
    "tune.study": (str, lambda v: PLAIN_NAME.fullmatch(v) is not None, PLAIN_NAME_RULE),
    "tune.storage": (str, lambda v: "://" in v, "an SQLAlchemy URL (sqlite:///optuna.db, "
                                                "postgresql://host/db)"),
    "tune.metric": (str, lambda v: PLAIN_NAME.fullmatch(v) is not None,
                    "a validation metric's name without val_ (roc_auc, log_loss, ...)"),
    "tune.direction": (str, lambda v: v in ("maximize", "minimize"), "maximize or minimize"),
    "tune.timeout": (float, lambda v: v > 0, "seconds, more than 0"),
    "tune.pruner": (bool, lambda v: True, "true or false"),
    "tune.heartbeat": (int, lambda v: v >= 1, "whole seconds, 1 or more"),
    "compute.engine": (str, lambda v: v in ("local", "dask"), "local or dask"),
    "compute.address": (str, lambda v: bool(SCHEDULER.fullmatch(v)),
                        "a Dask scheduler's address (tcp://host:8786), or null"),
    "compute.workers": (int, lambda v: v >= 1, "a whole number, 1 or more"),
    "compute.threads_per_worker": (int, lambda v: v >= 1, "a whole number, 1 or more"),
    "compute.memory_limit": (str, lambda v: bool(BYTES.fullmatch(v)), "a size (3GB, 512MiB)"),
    "compute.blocksize": (str, lambda v: bool(BYTES.fullmatch(v)), "a size (64MB)"),
    "compute.collect_limit": (str, lambda v: bool(BYTES.fullmatch(v)), "a size (2GB)"),
}
BYTES = re.compile(r"(?i)\d+(\.\d+)?\s*([kmgtp]i?b|b)?")
SCHEDULER = re.compile(r"(tcp|tls|inproc|ucx|ws|wss)://\S+|[\w.-]+:\d+")
# Keys that may be null: null means "the default, worked out from the rest of the config".
NULLABLE = {"tune.study", "tune.storage", "tune.metric", "tune.direction", "tune.timeout",
            "compute.address"}
GROUPS = {"dataset", "model", "lake", "tracking", "split", "validate", "evaluate", "registry",
          "tune", "compute"}
SECTIONS = {"model": {"name", "_target_", "preprocessing", "params", "search_space"},
            "model.preprocessing": {"scale_numeric", "categorical_encoding"},
            "registry": {"name", "require_promotion", "gate"},
            "registry.gate": {"metrics", "beat_champion", "min_delta"}}


def check(cfg: DictConfig) -> None:
    """Check the whole resolved config once, before any run starts: every known key against
    its type and rule, and no unknown key (with a "did you mean" hint)."""
    name = cfg.dataset.get("name")
    if not (isinstance(name, str) and PLAIN_NAME.fullmatch(name)):
        raise ConfigError(f"dataset.name: {name!r} is not {PLAIN_NAME_RULE}")
    known_top = {k.split(".")[0] for k in SCHEMA} | GROUPS
    _check_known("", set(cfg), known_top)
    for section, known in SECTIONS.items():
        value = OmegaConf.select(cfg, section)
        if isinstance(value, DictConfig):
            _check_known(section + ".", set(value), known)
    for section in ("split", "validate", "evaluate", "tune", "compute"):
        known = {k.split(".", 1)[1] for k in SCHEMA if k.startswith(section + ".")}
        _check_known(section + ".", set(cfg.get(section) or {}), known)
    for key, (kind, rule, meaning) in SCHEMA.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and (key in NULLABLE or key.startswith("compute.")
                              and key != "compute.engine"):
            continue  # compute=local has no cluster keys
        typed = _typed(value, kind)
        if typed is None or not rule(typed):
            raise ConfigError(f"{key}={value!r}: must be {meaning}")
    _check_positive_class(cfg.dataset)
    _check_gate_bounds(cfg)
    check_search_space(cfg)
    val, test = float(cfg.split.val_size), float(cfg.split.test_size)
    if val + test >= 1:
        raise ConfigError(f"split.val_size={val}, split.test_size={test}: together they must "
                          "be less than 1 (the training split gets the rest)")


def _check_positive_class(dataset: DictConfig) -> None:
    """A binary target whose allowed values are not 0/1 or false/true needs
    `dataset.positive_class` (the label recall and precision are about), one of them."""
    values = (dataset.columns.get(dataset.target) or {}).get("values")
    if dataset.task != "binary" or values is None:
        return
    from trainpipe.steps.evaluate import positive_class

    positive_class(dataset, list(values))  # ConfigError naming the key and the labels


def _check_gate_bounds(cfg: DictConfig) -> None:
    """`registry.gate.metrics`: test metric -> {min: x, max: y} (which metrics a task has
    is checked by the register step before it runs)."""
    key = "registry.gate.metrics"
    bounds = OmegaConf.select(cfg, key, default=None)
    if bounds is None:
        return
    example = "e.g. {test_roc_auc: {min: 0.85}}"
    if not isinstance(bounds, DictConfig):
        raise ConfigError(f"{key}={bounds!r}: must be test metrics with bounds, {example}")
    for metric, bound in bounds.items():
        where = f"{key}.{metric}"
        if not str(metric).startswith("test_"):
            raise ConfigError(f"{where}: the gate reads test metrics (test_...), {example}")
        if not isinstance(bound, DictConfig) or not bound:
            raise ConfigError(f"{where}={bound!r}: must be {{min: x}}, {{max: y}} or both")
        _check_known(where + ".", set(bound), {"min", "max"})
        for side, value in bound.items():
            if _typed(value, float) is None:
                raise ConfigError(f"{where}.{side}={value!r}: must be a number")
        if "min" in bound and "max" in bound and bound["min"] > bound["max"]:
            raise ConfigError(f"{where}: min {bound['min']} is above max {bound['max']}")


SEARCH_KEYS = {"int": {"type", "low", "high", "log", "step"},
               "float": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}


def check_search_space(cfg: DictConfig) -> None:
    """`model.search_space`: parameter -> {type: int|float, low, high, log?, step?} or
    {type: categorical, choices: [...]}. Whether the estimator takes the parameters is
    checked by `trainpipe tune` (tuning.check), which imports it."""
    space = OmegaConf.select(cfg, "model.search_space", default=None)
    if space is None:
        return
    if not isinstance(space, DictConfig):
        raise ConfigError(f"model.search_space={space!r}: must be parameter -> "
                          "{type: int|float|categorical, ...}")
    for name, spec in space.items():
        _check_search_parameter(f"model.search_space.{name}", spec)


def _check_search_parameter(key: str, spec: Any) -> None:
    example = "e.g. {type: float, low: 0.01, high: 0.3, log: true}"
    if not isinstance(spec, DictConfig) or "type" not in spec:
        raise ConfigError(f"{key}={spec!r}: must be a mapping with a type, {example}")
    kind = spec.type
    if kind not in SEARCH_KEYS:
        raise ConfigError(f"{key}.type={kind!r}: unknown type; must be one of "
                          f"{', '.join(SEARCH_KEYS)}{did_you_mean(str(kind), set(SEARCH_KEYS))}")
    _check_known(key + ".", set(spec), SEARCH_KEYS[kind])
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, ListConfig) or not choices:
            raise ConfigError(f"{key}.choices={choices!r}: must be a list of one or more values")
        return
    number, meaning = (int, "a whole number") if kind == "int" else (float, "a number")
    for side in ("low", "high"):
        if side not in spec or _typed(spec[side], number) is None:
            raise ConfigError(f"{key}.{side}={spec.get(side)!r}: must be {meaning}")
    low, high = spec.low, spec.high
    if low > high:
        raise ConfigError(f"{key}: low {low} is above high {high}")
    log, step = spec.get("log", False), spec.get("step")
    if _typed(log, bool) is None:
        raise ConfigError(f"{key}.log={log!r}: must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{key}: log: true needs low above 0 (low is {low})")
    if step is not None and (_typed(step, number) is None or step <= 0):
        raise ConfigError(f"{key}.step={step!r}: must be {meaning} above 0")
    if step is not None and log:
        raise ConfigError(f"{key}: step and log: true do not go together (Optuna refuses it)")


def _typed(value: Any, kind: type) -> Any:
    """`value` as `kind`, or None when it is not one (no silent casts: '3' is no int)."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else None
    return value if isinstance(value, str) else None


def _check_known(prefix: str, keys: set[str], known: set[str]) -> None:
    for key in sorted(keys - known):
        raise ConfigError(f"{prefix}{key}: unknown key{did_you_mean(key, known)}; known keys: "
                          f"{', '.join(sorted(known))}")


def did_you_mean(word: str, choices: set[str] | list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def tracking_uri(cfg: DictConfig) -> str:
    """`tracking.uri` as MLflow must be given it: SQLAlchemy 2.1 maps a bare postgresql://
    to psycopg 3, and trainpipe ships psycopg2."""
    return psycopg2_url(str(cfg.tracking.uri))


def psycopg2_url(url: str) -> str:
    """A database URL for SQLAlchemy: a bare postgresql:// names psycopg2's driver."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML, long values (paths, URIs) on one line each."""
    import yaml

    return yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), sort_keys=False,
                          width=2**31 - 1, allow_unicode=True)


def _compose_adding(overrides: list[str]) -> DictConfig:
    """Hydra's compose, where `key=value` for a key the composed config does not hold is
    what a user means by Hydra's `+key=value` (a dataset file without `scoring_source`, say):
    it is added, and `check` names a key that is not trainpipe's, with a "did you mean",
    instead of Hydra's advice to type `+`."""
    from hydra import compose as hydra_compose
    from hydra.errors import ConfigCompositionException

    overrides = list(overrides)
    while True:
        try:
            return hydra_compose("config", overrides=overrides)
        except ConfigCompositionException as exc:
            absent = re.match(r"Could not override '([^']+)'", str(exc))
            at = [i for i, o in enumerate(overrides) if absent and o.startswith(
                f"{absent[1]}=")]
            if not at:
                raise
            overrides[at[0]] = "+" + overrides[at[0]]


def _parse(fn, overrides):
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return fn(overrides)
    except yaml.YAMLError as exc:  # names the file, line and column
        raise ConfigError(f"invalid YAML: {' '.join(str(exc).split())}") from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_hydra_message(exc)) from None


def _hydra_message(exc: Exception) -> str:
    # Hydra appends its whole search path to "missing config" errors: keep the first lines.
    text = str(exc).split("\nConfig search path")[0].strip()
    for cause in (exc.__cause__, exc.__context__):
        if isinstance(cause, ConfigError):  # ours, raised inside a resolver
            return str(cause)
    return text.replace("\n", " ") if text.count("\n") < 3 else text
