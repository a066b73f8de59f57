"""validate: hold the raw data to its dataset's contract; publish only data that keeps it.

Every row and column is checked (lazily, so all failures are reported at once). The
report (JSON and Markdown, with per-column statistics) is recorded on success too.
"""

import json
import math
import os

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from trainpipe import coerce
from trainpipe.catalog import Table
from trainpipe.errors import DataValidationError
from trainpipe.redaction import shorten
from trainpipe.schema import build_schema, parse_options
from trainpipe.steps import Report, split
from trainpipe.steps.ingest import RawTable

ZONE = "landing"
OUTPUTS = {"validated": Table("train.parquet"), "scoring": Table("scoring.parquet", optional=True)}
EXAMPLES = 5  # example failing values shown per column and check
EXAMPLE_CHARS = 80  # characters of an example value shown


def run(cfg: DictConfig, raw: RawTable, raw_scoring: RawTable | None) -> tuple[dict, Report]:
    dataset = cfg.dataset
    tables = {"train": raw} | ({"scoring": raw_scoring} if raw_scoring is not None else {})
    validated, failures, stats = {}, [], {}
    for role, table in tables.items():
        df, table_failures = _check(cfg, table, with_target=role == "train")
        failures += table_failures
        validated[role] = df
        if df is not None:
            stats[role] = column_stats(df, dataset)
    report = {"dataset": dataset.name, "valid": not failures, "failures": failures,
              "sources": {r: {"source": t.source, "digest": t.digest, "rows": len(t.df)}
                          for r, t in tables.items()},
              "statistics": stats}
    artifacts = {"validation_report.json": json.dumps(report, indent=2, default=str).encode(),
                 "validation_report.md": to_markdown(report).encode()}
    if failures:
        raise DataValidationError(to_terminal(failures), report=Report(artifacts=artifacts))
    rows = len(validated["train"])
    return (
        {"validated": validated["train"], "scoring": validated.get("scoring")},
        Report(summary=f"{rows:,} rows passed {len(dataset.columns)} column contracts",
               metrics={"rows_valid": rows}, artifacts=artifacts),
    )


def _check(cfg: DictConfig, table: RawTable, with_target: bool):
    """The validated frame (or None) and the list of failures, one per column and check."""
    import pandera.errors as pe

    dataset, checks = cfg.dataset, cfg.validate
    df, source = table.df, table.source
    if len(df) < max(int(checks.min_rows), 1):
        message = ("the file has no data rows" if len(df) == 0
                   else f"{len(df)} data rows, fewer than validate.min_rows={checks.min_rows}")
        return None, [_failure(source, None, "min_rows", len(df), [], message)]
    typed, missing, failures = _parse(dataset, df, source, with_target)
    schema = build_schema(dataset, with_target=with_target)
    try:
        # inplace: the frame is typed already (a copy is as big as the data)
        schema.validate(typed, lazy=True, inplace=True)
    except pe.SchemaErrors as exc:
        int_columns = {c for c, spec in dataset.columns.items() if spec.type == "int"}
        failures += _failures_from(source, exc.failure_cases, int_columns)
    if not with_target and dataset.target in df.columns:
        failures = [f for f in failures if f["column"] != dataset.target] + [_failure(
            source, dataset.target, "target_absent_in_scoring", len(df), [],
            "scoring data must not contain the target column")]
    failures += _nulls_and_duplicates(cfg, typed, missing, source, with_target)
    if with_target:
        failures += _target_checks(cfg, typed, source)
    return (typed if not failures else None), failures


def _parse(dataset: DictConfig, df: pd.DataFrame, source: str, with_target: bool):
    """Each contract column read as its type (coerce.py), the cells the file leaves missing,
    and the rows that cannot be read, shown with the file's own values."""
    from concurrent.futures import ThreadPoolExecutor

    options = parse_options(dataset)
    contract = {col: df[col] for col in df.columns if col in dataset.columns
                and (with_target or col != dataset.target)}
    specs = {col: (dataset.columns[col].type, bool(dataset.columns[col].get("nullable", False)),
                   dataset.columns[col].get("format")) for col in contract}

    def parse(col: str):
        kind, nullable, date_format = specs[col]
        return coerce.parse(contract[col], kind, nullable=nullable, date_format=date_format,
                            **options)

    # Columns parse independently, in arrow and numpy code that releases the GIL. Each
    # typed column replaces its text in the raw frame as it comes (nothing reads the text
    # afterwards; a typed copy of the whole table is as big as the data).
    missing, failures = {}, []
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        columns = list(contract)
        for col, (typed, missing[col], failed) in zip(columns, pool.map(parse, columns),
                                                      strict=True):
            for cause, mask in failed.items():
                bad = contract[col][mask]
                examples = [{"row": int(i), "value": _as_written(v)}
                            for i, v in bad.head(EXAMPLES).items()]
                failures.append(_failure(source, col, cause, len(bad), examples,
                                         _parse_message(cause, dataset.columns[col], options,
                                                        bad)))
            df[col] = typed
            del contract[col]  # its text can go
    return df, missing, failures


def _as_written(value):
    """The file's value as the report shows it: text that is a number as Python writes it
    (2.5, 13) is shown as that number, any other text (1e30, 2.50, soon) as the text."""
    value = _plain(value)
    if isinstance(value, str):
        for number in (int, float):
            try:
                parsed = number(value)
            except ValueError:
                continue
            if repr(parsed) == value and math.isfinite(parsed):
                return parsed
    return value


def _parse_message(cause: str, spec: DictConfig, options: dict, bad: pd.Series) -> str:
    if cause == coerce.WHOLE:
        return "values are not whole numbers (type: int)"
    if cause == coerce.INT64:
        return "whole numbers outside the int64 range (type: int)"
    if spec.type == "bool":
        return (f"values of the wrong type (bool): not one of true_values "
                f"{options['true_values']} or false_values {options['false_values']}")
    if spec.type == "datetime":
        fmt = spec.get("format")
        return ("values of the wrong type (datetime): not dates in the format "
                + (f"{fmt!r}" if fmt else "ISO 8601 (2024-01-31); set the column's format, "
                   "e.g. format: '%d/%m/%Y'"))
    hint = ""
    spelled = sorted({v.strip() for v in bad if isinstance(v, str)} & NA_SPELLINGS)
    if spelled:
        hint = (f"; if {', '.join(map(repr, spelled))} means missing, list it in "
                "dataset.na_values")
    return f"values of the wrong type ({spec.type}){hint}"


# Spellings of "missing" other tools write; pandas reads them as missing, trainpipe does
# only when dataset.na_values says so (NA may be Namibia).
NA_SPELLINGS = {"NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "-", "?", "#N/A"}


def _nulls_and_duplicates(cfg: DictConfig, typed: pd.DataFrame, missing: dict, source: str,
                          with_target: bool) -> list[dict]:
    """Missing values where the contract allows none, all-null columns and repeated values
    of unique columns; from what the file says (a cell that failed to parse is no null)."""
    dataset, checks = cfg.dataset, cfg.validate
    failures = []
    for col, gaps in missing.items():
        spec = dataset.columns[col]
        is_target = with_target and col == dataset.target
        if checks.all_null_columns and gaps.all():
            # One cause, one line: no "missing values" line as well.
            failures.append(_failure(source, col, "not_all_null", len(gaps), [],
                                     "every value is missing"))
        elif gaps.any() and (is_target or not spec.get("nullable", False)):
            rows = typed.index[gaps]
            failures.append(_failure(
                source, col, "not_nullable", len(rows),
                [{"row": int(i), "value": None} for i in rows[:EXAMPLES]],
                "missing values (the target needs a value in every row)" if is_target
                else "missing values (not nullable)"))
        unique = spec.get("unique", False) or (checks.unique_id and col == dataset.get("id_column"))
        if unique:
            values = typed[col]
            repeated = values[values.duplicated(keep=False) & values.notna()]
            if len(repeated):
                failures.append(_failure(source, col, "field_uniqueness", len(repeated),
                                         _examples(repeated, spec.type == "int")))
    return failures


def _examples(bad: pd.Series, as_int: bool = False) -> list[dict]:
    return [{"row": int(i), "value": _plain(v, as_int)} for i, v in bad.head(EXAMPLES).items()]


def _target_checks(cfg: DictConfig, typed: pd.DataFrame, source: str) -> list[dict]:
    """The target has two classes (or varies) and enough rows of each class for the split."""
    dataset = cfg.dataset
    target = dataset.target
    if not cfg.validate.target_classes or target not in typed.columns:
        return []
    values = typed[target].dropna()
    if values.empty:
        return []
    if values.nunique() < 2:
        if dataset.task == "regression":
            return [_failure(source, target, "not_constant", len(typed), [],
                             "the target is constant")]
        only = _plain(values.iloc[0])
        return [_failure(source, target, "at_least_two_classes", len(typed), [],
                         f"the target has a single class ({only!r})")]
    problem = split.feasibility(cfg, values)
    if problem is None:
        return []
    check, message = problem
    return [_failure(source, target, check, len(values), [], message)]


def _failures_from(source: str, cases: pd.DataFrame, int_columns: set[str]) -> list[dict]:
    failures = []
    cases = cases.copy()
    table_level = cases["schema_context"] == "DataFrameSchema"
    # For table-level checks (missing / unexpected columns) the culprit is the value.
    cases.loc[table_level, "column"] = cases.loc[table_level, "failure_case"].astype(str)
    # inf is reported by the `finite` check; it need not fail the range checks again
    check = cases["check"].astype(str)
    infinite = pd.to_numeric(cases["failure_case"], errors="coerce").abs() == np.inf
    cases = cases[~(infinite & check.str.contains("than"))]
    for (column, check), group in cases.groupby(["column", "check"], sort=False, dropna=False):
        as_int = column in int_columns  # a nullable int column is read as float: 13.0
        examples = [
            {"row": None if pd.isna(i) else int(i), "value": _plain(v, as_int)}
            for i, v in zip(group["index"].head(EXAMPLES), group["failure_case"].head(EXAMPLES),
                            strict=True)
        ]
        failures.append(_failure(source, column, str(check), len(group), examples))
    return failures


# about a column or the table, not rows: no row count shown
COLUMN_CHECKS = ("column_in_dataframe", "column_in_schema", "rows_per_class", "rows_for_split")


def _failure(source, column, check, count, examples, message=None) -> dict:
    # An example is shown, never a whole cell: a 1 MB value is cut (and redacted) first.
    examples = [e | {"value": shorten(e["value"])} if isinstance(e.get("value"), str)
                and len(e["value"]) > EXAMPLE_CHARS else e for e in examples]
    return {"source": source, "column": column, "check": check, "rows": int(count),
            "examples": examples, "message": message or _describe(check)}


def _describe(check: str) -> str:
    if check == "column_in_dataframe":
        return "column is missing from the data"
    if check == "column_in_schema":
        return "column is not in the dataset config (strict: true)"
    if check == "field_uniqueness":
        return "duplicate values (must be unique)"
    if check == "not_nullable":
        return "missing values (not nullable)"
    return check


def _plain(value, as_int: bool = False):
    """A value as the report shows it: a Python scalar, a list, a date as text."""
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return None
    if isinstance(value, np.ndarray):  # a Parquet list cell
        return value.tolist()
    if isinstance(value, pd.Timestamp):
        return str(value)
    value = value.item() if isinstance(value, np.generic) else value
    if as_int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def to_terminal(failures: list[dict]) -> str:
    lines = ["data validation failed:"]
    for f in failures:
        where = f"{f['column']}" if f["column"] is not None else "(table)"
        examples = ", ".join(
            f"row {e['row']}: {e['value']!r}" if e["row"] is not None else repr(e["value"])
            for e in f["examples"]
        )
        if f["check"] in COLUMN_CHECKS:  # the column is the culprit: no rows to count
            lines.append(f"  {f['source']} · {where} · {f['message']}")
            continue
        rows = f"{f['rows']:,} row" + ("" if f["rows"] == 1 else "s")
        lines.append(f"  {f['source']} · {where} · {f['message']} · {rows}"
                     + (f" · e.g. {examples}" if examples else ""))
    return "\n".join(lines)


def column_stats(df: pd.DataFrame, dataset: DictConfig) -> dict:
    from trainpipe.schema import column_kind

    stats = {}
    for col in df.columns:
        s = df[col]
        entry = {"count": int(s.notna().sum()), "nulls": int(s.isna().sum())}
        spec = dataset.columns.get(col)
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            entry |= {"min": _plain(s.min()), "max": _plain(s.max()), "mean": _plain(s.mean())}
        if spec is not None and (column_kind(spec) == "categorical" or col == dataset.target):
            entry["distinct"] = {str(k): int(v) for k, v in s.value_counts().head(50).items()}
        stats[col] = entry
    return stats


def to_markdown(report: dict) -> str:
    lines = [f"# Validation report: {report['dataset']}", "",
             "**Result: " + ("passed" if report["valid"] else "FAILED") + "**", ""]
    for role, src in report["sources"].items():
        lines.append(f"- {role}: `{src['source']}` ({src['rows']:,} rows, sha256 "
                     f"`{src['digest'][:12]}`)")
    if report["failures"]:
        lines += ["", "## Failures", "", "| source | column | check | rows | examples |",
                  "|---|---|---|---|---|"]
        for f in report["failures"]:
            ex = "; ".join(f"row {e['row']}: {e['value']!r}" for e in f["examples"])
            lines.append(f"| {f['source']} | {f['column']} | {f['message']} | {f['rows']} | "
                         f"{ex} |")
    for role, stats in report["statistics"].items():
        lines += ["", f"## Column statistics ({role})", "",
                  "| column | count | nulls | min | max | mean | distinct values (count) |",
                  "|---|---|---|---|---|---|---|"]
        for col, s in stats.items():
            low, high, mean = (_short(s.get(k)) for k in ("min", "max", "mean"))
            top = list(s.get("distinct", {}).items())[:10]
            distinct = ", ".join(f"{k} ({v:,})" for k, v in top)
            lines.append(f"| {col} | {s['count']:,} | {s['nulls']:,} | {low} | {high} | {mean} | "
                         f"{distinct} |")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    """A number as a reader wants it in a table: 31.46, not 31.45544968775453."""
    if value is None:
        return ""
    if not isinstance(value, float):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.5g}"
