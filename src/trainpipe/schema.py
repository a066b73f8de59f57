"""The dataset config is the data's contract: check it, and build a pandera schema from it."""

from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainpipe.errors import ConfigError

TYPES = ("int", "float", "str", "bool", "datetime")
KINDS = ("numeric", "categorical", "drop")
COLUMN_KEYS = {"type", "nullable", "min", "max", "values", "unique", "kind"}
TASKS = ("binary", "multiclass", "regression")


def check_dataset_config(dataset: DictConfig) -> None:
    """Fail early, naming the key, on a dataset file that cannot describe a table."""
    name = dataset.get("name", "?")
    where = f"dataset '{name}'"
    for key in ("source", "task", "target", "columns"):
        if dataset.get(key) in (None, ""):
            raise ConfigError(f"{where}: missing key dataset.{key}")
    if dataset.task not in TASKS:
        raise ConfigError(f"{where}: dataset.task {dataset.task!r} is not one of {TASKS}")
    columns = dataset.columns
    if not isinstance(columns, DictConfig) or not columns:
        raise ConfigError(f"{where}: dataset.columns must map column names to specs")
    for col, spec in columns.items():
        key = f"dataset.columns.{col}"
        if not isinstance(spec, DictConfig):
            raise ConfigError(f"{where}: {key} must be a mapping like {{type: int}}")
        unknown = set(spec) - COLUMN_KEYS
        if unknown:
            raise ConfigError(f"{where}: {key} has unknown key(s) {sorted(unknown)}; "
                              f"allowed: {sorted(COLUMN_KEYS)}")
        if spec.get("type") not in TYPES:
            raise ConfigError(f"{where}: {key}.type {spec.get('type')!r} is not one of {TYPES}")
        values = spec.get("values")
        if spec.type == "str" and values is not None and any(isinstance(v, bool)
                                                             for v in values):
            raise ConfigError(f"{where}: {key}.values holds a boolean: YAML reads yes/no/"
                              "true/false/on/off as booleans; quote them, e.g. ['yes', 'no']")
        if spec.get("kind") is not None and spec.kind not in KINDS:
            raise ConfigError(f"{where}: {key}.kind {spec.kind!r} is not one of {KINDS}")
    for key in ("target", "id_column"):
        col = dataset.get(key)
        if col is not None and col not in columns:
            raise ConfigError(f"{where}: dataset.{key} {col!r} is not among dataset.columns")
    from trainpipe.expressions import parse_derived  # imports this module: import it late

    parse_derived(dataset)  # the features and derived formulas: ConfigError naming the key


def column_kind(spec: DictConfig) -> str:
    """numeric, categorical or drop; inferred from the type when the spec does not say."""
    if spec.get("kind"):
        return spec.kind
    return "categorical" if spec.type in ("str", "bool") else "numeric"


def feature_columns(dataset: DictConfig) -> dict[str, str]:
    """Feature name -> kind, in file order: every column but target, id and dropped ones."""
    skip = {dataset.target, dataset.get("id_column")}
    kinds = {col: column_kind(spec) for col, spec in dataset.columns.items() if col not in skip}
    return {col: kind for col, kind in kinds.items() if kind != "drop"}


def pandas_dtype(spec: DictConfig) -> str:
    if spec.type == "int":
        # pandas has no NaN in int64: a nullable int column is read (and kept) as float.
        return "float64" if spec.get("nullable") else "int64"
    return {"float": "float64", "str": "str", "bool": "bool", "datetime": "datetime64[ns]"}[
        spec.type
    ]


def build_schema(dataset: DictConfig, *, with_target: bool = True, strict: bool | None = None):
    """A pandera DataFrameSchema for the raw table (or for scoring data, without target)."""
    import numpy as np
    import pandera.pandas as pa

    columns: dict[str, Any] = {}
    for col, spec in dataset.columns.items():
        if col == dataset.target and not with_target:
            continue
        checks = []
        if spec.get("min") is not None:
            checks.append(pa.Check.ge(spec.min))
        if spec.get("max") is not None:
            checks.append(pa.Check.le(spec.max))
        if spec.get("values") is not None:
            checks.append(pa.Check.isin(OmegaConf.to_container(spec["values"])))
        if spec.type == "float":
            checks.append(pa.Check(lambda s: ~np.isinf(s), name="finite", element_wise=False))
        columns[col] = pa.Column(
            pandas_dtype(spec),
            checks=checks,
            nullable=bool(spec.get("nullable", False)),
            unique=bool(spec.get("unique", False)),
            coerce=True,
        )
    strict = dataset.get("strict", True) if strict is None else strict
    return pa.DataFrameSchema(columns, strict=bool(strict), name=dataset.name)
