"""validate: hold the raw data to its dataset's contract; publish only data that keeps it.

Every row and column is checked (lazily, so all failures are reported at once). The
report (JSON and Markdown, with per-column statistics) is recorded on success too.
"""

import json

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from trainpipe.catalog import Table
from trainpipe.errors import DataValidationError
from trainpipe.schema import build_schema
from trainpipe.steps import Report
from trainpipe.steps.ingest import RawTable

ZONE = "landing"
OUTPUTS = {"validated": Table("train.parquet"), "scoring": Table("scoring.parquet", optional=True)}
EXAMPLES = 5  # example failing values shown per column and check


def run(cfg: DictConfig, raw: RawTable, raw_scoring: RawTable | None) -> tuple[dict, Report]:
    dataset = cfg.dataset
    tables = {"train": raw} | ({"scoring": raw_scoring} if raw_scoring is not None else {})
    validated, failures, stats = {}, [], {}
    for role, table in tables.items():
        df, table_failures = _check(dataset, cfg.validate, table, with_target=role == "train")
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


def _check(dataset: DictConfig, checks: DictConfig, table: RawTable, with_target: bool):
    """The validated frame (or None) and the list of failures, one per column and check."""
    import pandera.errors as pe

    df = table.df
    source = table.source
    if len(df) < max(int(checks.min_rows), 1):
        message = ("the file has no data rows" if len(df) == 0
                   else f"{len(df)} data rows, fewer than validate.min_rows={checks.min_rows}")
        return None, [_failure(source, None, "min_rows", len(df), [], message)]
    schema = build_schema(dataset, with_target=with_target)
    if checks.unique_id and dataset.get("id_column") in schema.columns:
        schema.columns[dataset.id_column].unique = True
    failures = _whole_numbers(dataset, df, source)
    try:
        # inplace: coerce the raw frame rather than copy it (nothing reads it afterwards;
        # a copy is as big as the data)
        out = schema.validate(df, lazy=True, inplace=True)
    except pe.SchemaErrors as exc:
        out = None
        int_columns = {c for c, spec in dataset.columns.items() if spec.type == "int"}
        failures += _failures_from(source, exc.failure_cases, int_columns)
    if not with_target and dataset.target in df.columns:
        failures = [f for f in failures if f["column"] != dataset.target] + [_failure(
            source, dataset.target, "target_absent_in_scoring", len(df), [],
            "scoring data must not contain the target column")]
    beyond = _beyond_schema(dataset, checks, df, source, with_target)
    # One cause, one line: an all-null column needs no "missing values" line as well.
    all_null = {f["column"] for f in beyond if f["check"] == "not_all_null"}
    failures = [f for f in failures
                if not (f["check"] == "not_nullable" and f["column"] in all_null)] + beyond
    return (out if not failures else None), failures


def _whole_numbers(dataset: DictConfig, df: pd.DataFrame, source: str) -> list[dict]:
    """int columns read as float (1.5): pandas would truncate them silently when coercing."""
    failures = []
    for col, spec in dataset.columns.items():
        if spec.type != "int" or col not in df or not pd.api.types.is_float_dtype(df[col]):
            continue
        s = df[col]
        bad = s[s.notna() & np.isfinite(s) & (s % 1 != 0)]
        if len(bad):
            failures.append(_failure(source, col, "whole_number", len(bad), _examples(bad),
                                     "values are not whole numbers (type: int)"))
    return failures


def _examples(bad: pd.Series) -> list[dict]:
    return [{"row": int(i), "value": _plain(v)} for i, v in bad.head(EXAMPLES).items()]


def _beyond_schema(dataset: DictConfig, checks: DictConfig, df: pd.DataFrame, source: str,
                   with_target: bool) -> list[dict]:
    failures = []
    if checks.all_null_columns:
        for col in df.columns.intersection(list(dataset.columns)):
            if df[col].isna().all():
                failures.append(_failure(source, col, "not_all_null", len(df), [],
                                         "every value is missing"))
    target = dataset.target
    if (checks.target_classes and with_target and target in df.columns
            and df[target].notna().any()):
        distinct = df[target].nunique()
        if dataset.task != "regression" and distinct < 2:
            only = _plain(df[target].dropna().iloc[0])
            failures.append(_failure(source, target, "at_least_two_classes", len(df), [],
                                     f"the target has a single class ({only!r})"))
        elif dataset.task == "regression" and distinct < 2:
            failures.append(_failure(source, target, "not_constant", len(df), [],
                                     "the target is constant"))
    return failures


def _failures_from(source: str, cases: pd.DataFrame, int_columns: set[str]) -> list[dict]:
    failures = []
    cases = cases.copy()
    table_level = cases["schema_context"] == "DataFrameSchema"
    # For table-level checks (missing / unexpected columns) the culprit is the value.
    cases.loc[table_level, "column"] = cases.loc[table_level, "failure_case"].astype(str)
    # One cause, one line: where a column's values failed to convert, its other checks ran
    # on unconverted values (noise), and a null that cannot become an int is already
    # reported by not_nullable.
    check = cases["check"].astype(str)
    # (a null that cannot become an int is no conversion failure: the values are fine)
    coerce_failed = set(cases.loc[check.str.startswith("coerce_dtype")
                                  & cases["failure_case"].notna(), "column"])
    redundant = (cases["column"].isin(coerce_failed) & ~check.str.startswith("coerce_dtype")
                 & (check != "not_nullable")) | (
        check.str.startswith("coerce_dtype") & cases["failure_case"].isna())
    # inf is reported by the `finite` check; it need not fail the range checks again
    infinite = pd.to_numeric(cases["failure_case"], errors="coerce").abs() == np.inf
    redundant |= infinite & check.str.contains("than")
    cases = cases[~redundant]
    for (column, check), group in cases.groupby(["column", "check"], sort=False, dropna=False):
        as_int = column in int_columns  # a nullable int column is read as float: 13.0
        examples = [
            {"row": None if pd.isna(i) else int(i), "value": _plain(v, as_int)}
            for i, v in zip(group["index"].head(EXAMPLES), group["failure_case"].head(EXAMPLES),
                            strict=True)
        ]
        failures.append(_failure(source, column, str(check), len(group), examples))
    return failures


COLUMN_CHECKS = ("column_in_dataframe", "column_in_schema")  # about a column, not rows


def _failure(source, column, check, count, examples, message=None) -> dict:
    return {"source": source, "column": column, "check": check, "rows": int(count),
            "examples": examples, "message": message or _describe(check)}


def _describe(check: str) -> str:
    if check == "column_in_dataframe":
        return "column is missing from the data"
    if check == "column_in_schema":
        return "column is not in the dataset config (strict: true)"
    if check.startswith("coerce_dtype") or check.startswith("dtype"):
        return f"values of the wrong type ({check})"
    if check == "field_uniqueness":
        return "duplicate values (must be unique)"
    if check == "not_nullable":
        return "missing values (not nullable)"
    return check


def _plain(value, as_int: bool = False):
    if isinstance(value, float) and pd.isna(value):
        return None
    value = value.item() if hasattr(value, "item") else value
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
