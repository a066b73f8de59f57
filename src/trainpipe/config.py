"""Compose the Hydra config: package defaults + a user's --config-dir + overrides."""

import itertools
import re
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainpipe.errors import ConfigError
from trainpipe.schema import TASKS, check_dataset_config

CONF_DIR = Path(__file__).parent / "conf"


def _by_task(task: str, classification: str, regression: str) -> str:
    """`${by_task:${dataset.task},Classifier,Regressor}`: one model file serves every task."""
    if task not in TASKS:
        raise ConfigError(f"dataset.task: {task!r} is not one of {', '.join(TASKS)}")
    return regression if task == "regression" else classification


OmegaConf.register_new_resolver("by_task", _by_task, replace=True)


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
    """The resolved config for one run; every error is a ConfigError naming the key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if config_dir is not None:
        path = Path(config_dir).resolve()
        if not path.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: no such folder")
        overrides = [f"hydra.searchpath=[file://{path}]", *overrides]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = _parse(lambda o: hydra_compose("config", overrides=o), overrides)
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
    _check_split(cfg.split)
    return cfg


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


def _check_split(split: DictConfig) -> None:
    val, test = float(split.val_size), float(split.test_size)
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise ConfigError(f"split.val_size={val}, split.test_size={test}: each must be in "
                          "(0, 1) and together less than 1")


def tracking_uri(cfg: DictConfig) -> str:
    """`tracking.uri` as MLflow must be given it: SQLAlchemy 2.1 maps a bare postgresql://
    to psycopg 3, and trainpipe ships psycopg2."""
    uri = str(cfg.tracking.uri)
    if uri.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg2://" + uri.split("://", 1)[1]
    return uri


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


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
