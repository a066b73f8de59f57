"""The dataset config is the data's contract: check it, and build a pandera schema from it."""

import difflib
import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from trainpipe import coerce
from trainpipe.errors import ConfigError

TYPES = ("int", "float", "str", "bool", "datetime")
KINDS = ("numeric", "categorical", "drop")
COLUMN_KEYS = {"type", "nullable", "min", "max", "values", "unique", "kind", "format"}
DATASET_KEYS = {"name", "source", "scoring_source", "task", "target", "id_column", "strict",
                "derived", "columns", "na_values", "true_values", "false_values",
                "positive_class"}
SPELLINGS = ("na_values", "true_values", "false_values")  # dataset keys: lists of text
TASKS = ("binary", "multiclass", "regression")


def check_dataset_config(dataset: DictConfig) -> None:
    """Fail early, naming the key, on a dataset file that cannot describe a table or
    contradicts itself (data could never keep it: that is no fault of the data)."""
    name = dataset.get("name", "?")
    where = f"dataset '{name}'"
    _known_keys(where, "dataset", set(dataset), DATASET_KEYS)
    for key in ("source", "task", "target", "columns"):
        if dataset.get(key) in (None, ""):
            raise ConfigError(f"{where}: missing key dataset.{key}")
    if dataset.task not in TASKS:
        raise ConfigError(f"{where}: dataset.task {dataset.task!r} is not one of {TASKS}")
    if not isinstance(dataset.get("strict", True), bool):
        raise ConfigError(f"{where}: dataset.strict must be true or false, not "
                          f"{dataset.strict!r}")
    columns = dataset.columns
    if not isinstance(columns, DictConfig) or not columns:
        raise ConfigError(f"{where}: dataset.columns must map column names to specs")
    for col, spec in columns.items():
        _check_column(where, f"dataset.columns.{col}", spec)
    for key in ("target", "id_column"):
        col = dataset.get(key)
        if col is not None and col not in columns:
            raise ConfigError(f"{where}: dataset.{key} {col!r} is not among dataset.columns")
    if dataset.get("id_column") is not None and dataset.id_column == dataset.target:
        raise ConfigError(f"{where}: dataset.id_column {dataset.id_column!r} is the target; "
                          "the id is never learnt from and the target is what is learnt")
    from trainpipe.expressions import parse_derived  # imports this module: import it late

    parse_derived(dataset)  # the features and derived formulas: ConfigError naming the key
    spellings = {key: _spellings(where, dataset, key) for key in SPELLINGS}
    both = set(spellings["true_values"]) & set(spellings["false_values"])
    if both:
        raise ConfigError(f"{where}: {sorted(both)} are in both dataset.true_values and "
                          "dataset.false_values")


def _known_keys(where: str, prefix: str, keys: set, known: set[str]) -> None:
    unknown = sorted(str(k) for k in keys - known)
    if not unknown:
        return
    hints = [f"{k!r}: did you mean {close[0]!r}?" for k in unknown
             if (close := difflib.get_close_matches(k, known, n=1, cutoff=0.6))]
    raise ConfigError(f"{where}: {prefix} has unknown key(s) {unknown}"
                      + (f" ({'; '.join(hints)})" if hints else "")
                      + f"; allowed: {sorted(known)}")


def _check_column(where: str, key: str, spec) -> None:
    if not isinstance(spec, DictConfig):
        raise ConfigError(f"{where}: {key} must be a mapping like {{type: int}}")
    _known_keys(where, key, set(spec), COLUMN_KEYS)
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: {key}.type {kind!r} is not one of {TYPES}")
    for flag in ("nullable", "unique"):
        if not isinstance(spec.get(flag, False), bool):
            raise ConfigError(f"{where}: {key}.{flag} must be true or false, not "
                              f"{spec[flag]!r}")
    if spec.get("kind") is not None and spec.kind not in KINDS:
        raise ConfigError(f"{where}: {key}.kind {spec.kind!r} is not one of {KINDS}")
    if spec.get("kind") == "numeric" and kind == "str":
        raise ConfigError(f"{where}: {key}.kind numeric needs a number column; a str column "
                          "is categorical or drop")
    if spec.get("format") is not None and (kind != "datetime"
                                           or not isinstance(spec.format, str)):
        raise ConfigError(f"{where}: {key}.format is a date format such as '%d/%m/%Y', for "
                          "a datetime column")
    low, high = (_bound(where, f"{key}.{b}", spec, kind) for b in ("min", "max"))
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{where}: {key}: min {spec.min} is greater than max {spec.max}: "
                          "no value could pass")
    values = spec.get("values")
    if values is None:
        return
    if not isinstance(values, ListConfig):
        raise ConfigError(f"{where}: {key}.values must be a list of the allowed values")
    if not len(values):
        raise ConfigError(f"{where}: {key}.values is empty: no value could pass")
    if kind == "str" and any(isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {key}.values holds a boolean: YAML reads yes/no/"
                          "true/false/on/off as booleans; quote them, e.g. ['yes', 'no']")
    for value in values:
        if kind == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}: {key}.values holds the number {value!r}, not a text: "
                              "YAML reads unquoted numbers as numbers (01001 as the octal "
                              "513); quote each value as the file writes it, e.g. '01001'")
        if not _is_a(value, kind):
            raise ConfigError(f"{where}: {key}.values holds {value!r}, which is no {kind}")
        if kind in ("int", "float") and ((low is not None and value < low)
                                          or (high is not None and value > high)):
            raise ConfigError(f"{where}: {key}.values holds {value!r}, outside min..max "
                              f"({spec.get('min')}..{spec.get('max')})")


def _is_a(value, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "datetime":
        return _date(value) is not None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and (kind == "float" or float(value).is_integer())


def _bound(where: str, key: str, spec, kind: str):
    value = spec.get(key.rsplit(".", 1)[1])
    if value is None:
        return None
    if kind == "datetime":
        if _date(value) is None:
            raise ConfigError(f"{where}: {key} {value!r} is not a date (e.g. 2024-01-31)")
        return _date(value)
    if kind not in ("int", "float"):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{where}: {key} {value!r} is not a number")
    return value


def _date(value):
    import pandas as pd

    try:
        return pd.Timestamp(str(value))
    except (ValueError, TypeError):
        return None


def _spellings(where: str, dataset: DictConfig, key: str) -> list[str]:
    value = dataset.get(key)
    if value is None:
        return []
    if not isinstance(value, ListConfig) or not len(value):
        raise ConfigError(f"{where}: dataset.{key} must be a non-empty list of texts")
    if any(isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}: dataset.{key} holds a boolean: YAML reads yes/no/"
                          "true/false/on/off as booleans; quote them, e.g. ['yes', 'no']")
    if any(not isinstance(v, str | int | float) for v in value):
        raise ConfigError(f"{where}: dataset.{key} must be a list of texts")
    return [str(v).lower() for v in value]


def parse_options(dataset: DictConfig) -> dict[str, list[str]]:
    """How the source spells a missing value and the booleans (dataset-level keys)."""
    def texts(key: str, default) -> list[str]:
        value = dataset.get(key)
        return [str(v) for v in value] if value is not None else list(default)

    return {"na_values": texts("na_values", coerce.NA_VALUES),
            "true_values": texts("true_values", coerce.TRUE_VALUES),
            "false_values": texts("false_values", coerce.FALSE_VALUES)}


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


def build_schema(dataset: DictConfig, *, with_target: bool = True, strict: bool | None = None):
    """A pandera DataFrameSchema of the value checks (min, max, values, finite) and the
    columns, for the table already parsed to its contract types (coerce.py does the types,
    validate the nulls and uniqueness)."""
    import numpy as np
    import pandas as pd
    import pandera.pandas as pa

    columns: dict[str, Any] = {}
    for col, spec in dataset.columns.items():
        if col == dataset.target and not with_target:
            continue
        checks = []
        bound = pd.Timestamp if spec.type == "datetime" else (lambda v: v)
        if spec.get("min") is not None:
            checks.append(pa.Check.ge(bound(spec.min)))
        if spec.get("max") is not None:
            checks.append(pa.Check.le(bound(spec.max)))
        if spec.get("values") is not None:
            checks.append(pa.Check.isin(OmegaConf.to_container(spec["values"])))
        if spec.type == "float":
            checks.append(pa.Check(lambda s: ~np.isinf(s), name="finite", element_wise=False))
        columns[col] = pa.Column(None, checks=checks, nullable=True)
    strict = dataset.get("strict", True) if strict is None else strict
    return pa.DataFrameSchema(columns, strict=bool(strict), name=dataset.name)
