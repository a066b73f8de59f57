"""validate: hold the raw data to its dataset's contract; publish only data that keeps it.

Every row and column is checked (lazily, so all failures are reported at once). The
report (JSON and Markdown, with per-column statistics) is recorded on success too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from trainpipe import cluster, coerce
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
# How example rows are numbered, for a user to find them in the file: the checks see a
# frame's 0-based row numbers, the report shows (and records) them from 1, the header line
# not counted. The number of a row of a source of several files runs on across them (in
# name order). FIRST_ROW is recorded in the report (report.py reads older ones, from 0).
FIRST_ROW = 1
ROWS = "rows numbered from 1, the header line not counted"


def run(cfg: DictConfig, raw: RawTable, raw_scoring: RawTable | None) -> tuple[dict, Report]:
    dataset = cfg.dataset
    tables = {"train": raw} | ({"scoring": raw_scoring} if raw_scoring is not None else {})
    validated, failures, stats, rows = {}, [], {}, {}
    for role, table in tables.items():
        check = _check_dask if cluster.is_dask(table.df) else _check
        df, table_failures, stats[role], rows[role] = check(cfg, table, role == "train")
        failures += table_failures
        validated[role] = df
    report = {"dataset": dataset.name, "valid": not failures, "failures": failures,
              "first_row": FIRST_ROW,
              "sources": {r: {"source": t.source, "digest": t.digest, "rows": rows[r]}
                          for r, t in tables.items()},
              "statistics": {r: s for r, s in stats.items() if s is not None}}
    artifacts = {"validation_report.json": json.dumps(report, indent=2, default=str).encode(),
                 "validation_report.md": to_markdown(report).encode()}
    if failures:
        raise DataValidationError(to_terminal(failures), report=Report(artifacts=artifacts))
    rows = rows["train"]
    return (
        {"validated": validated["train"], "scoring": validated.get("scoring")},
        Report(summary=f"{rows:,} rows passed {len(dataset.columns)} column contracts",
               metrics={"rows_valid": rows}, artifacts=artifacts),
    )


def _check(cfg: DictConfig, table: RawTable, with_target: bool):
    """The validated frame (or None), the list of failures (one per column and check), the
    column statistics and the number of rows."""
    df, source = table.df, table.source
    if not df.index.equals(pd.RangeIndex(len(df))):  # a Parquet file may keep an index
        df.index = pd.RangeIndex(len(df))  # rows are numbered by their place in the file
    too_few = _min_rows(cfg, source, len(df))
    if too_few:
        return None, too_few, None, len(df)
    typed, failures = _check_rows(cfg, df, source, with_target, whole_table=True)
    if with_target:
        failures += _target_checks(cfg, typed, source)
    typed = typed if not failures else None
    return typed, failures, column_stats(typed, cfg.dataset) if typed is not None else None, len(df)


def _min_rows(cfg: DictConfig, source: str, rows: int) -> list[dict]:
    if rows >= max(int(cfg.validate.min_rows), 1):
        return []
    message = ("the file has no data rows" if rows == 0
               else f"{rows} data rows, fewer than validate.min_rows={cfg.validate.min_rows}")
    return [_failure(source, None, "min_rows", rows, [], message)]


def _check_rows(cfg: DictConfig, df: pd.DataFrame, source: str, with_target: bool,
                whole_table: bool):
    """The checks of each row: types, values, missing cells (and, for a whole table, the
    all-null columns and repeated values); the typed frame and the failures."""
    import pandera.errors as pe

    dataset = cfg.dataset
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
    failures += _nulls_and_duplicates(cfg, typed, missing, source, with_target, whole_table)
    return typed, failures


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
                          with_target: bool, whole_table: bool = True) -> list[dict]:
    """Missing values where the contract allows none, all-null columns and repeated values
    of unique columns; from what the file says (a cell that failed to parse is no null).
    Not `whole_table` (a Dask partition): the missing values only."""
    dataset, checks = cfg.dataset, cfg.validate
    failures = []
    for col, gaps in missing.items():
        spec = dataset.columns[col]
        is_target = with_target and col == dataset.target
        if whole_table and checks.all_null_columns and gaps.all():
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
        if whole_table and unique_column(cfg, col):
            values = typed[col]
            repeated = values[values.duplicated(keep=False) & values.notna()]
            if len(repeated):
                failures.append(_failure(source, col, "field_uniqueness", len(repeated),
                                         _examples(repeated, spec.type == "int")))
    return failures


def unique_column(cfg: DictConfig, col: str) -> bool:
    spec = cfg.dataset.columns[col]
    return bool(spec.get("unique", False)
                or (cfg.validate.unique_id and col == cfg.dataset.get("id_column")))


def _examples(bad: pd.Series, as_int: bool = False) -> list[dict]:
    return [{"row": int(i), "value": _plain(v, as_int)} for i, v in bad.head(EXAMPLES).items()]


def _target_checks(cfg: DictConfig, typed: pd.DataFrame, source: str) -> list[dict]:
    """The target has two classes (or varies) and enough rows of each class for the split."""
    target = cfg.dataset.target
    if target not in typed.columns:
        return []
    return _target_checks_of_counts(cfg, typed[target].value_counts(), source, len(typed),
                                    int(typed[target].notna().sum()))


def _target_checks_of_counts(cfg: DictConfig, counts: pd.Series, source: str, rows: int,
                             with_target: int) -> list[dict]:
    """`_target_checks` from the target's value counts (for regression, any two of its
    values are enough) and the number of rows with a target."""
    dataset = cfg.dataset
    target = dataset.target
    counts = counts[counts > 0]
    if not cfg.validate.target_classes or counts.empty:
        return []
    if len(counts) < 2:
        if dataset.task == "regression":
            return [_failure(source, target, "not_constant", rows, [],
                             "the target is constant")]
        only = _plain(counts.index[0])
        return [_failure(source, target, "at_least_two_classes", rows, [],
                         f"the target has a single class ({only!r})")]
    problem = split.feasibility(cfg, counts, with_target)
    if problem is None:
        return []
    check, message = problem
    return [_failure(source, target, check, with_target, [], message)]


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
    """One failure; `examples` with the frame's 0-based row numbers, numbered from
    FIRST_ROW here (every example passes here once)."""
    # An example is shown, never a whole cell: a 1 MB value is cut (and redacted) first.
    examples = [e | {"value": shorten(e["value"])} if isinstance(e.get("value"), str)
                and len(e["value"]) > EXAMPLE_CHARS else e for e in examples]
    examples = [e | {"row": e["row"] + FIRST_ROW} if e.get("row") is not None else e
                for e in examples]
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
    lines = [f"data validation failed ({ROWS}):"]
    for f in failures:
        where = f"{f['column']}" if f["column"] is not None else "(table)"
        examples = ", ".join(map(example_text, f["examples"]))
        if f["check"] in COLUMN_CHECKS:  # the column is the culprit: no rows to count
            lines.append(f"  {f['source']} · {where} · {f['message']}")
            continue
        rows = f"{f['rows']:,} row" + ("" if f["rows"] == 1 else "s")
        lines.append(f"  {f['source']} · {where} · {f['message']} · {rows}"
                     + (f" · e.g. {examples}" if examples else ""))
    return "\n".join(lines)


def example_text(example: dict) -> str:
    """`row 3: 13`, or the value alone when it is about no row (a missing column)."""
    value = repr(example.get("value"))
    return value if example.get("row") is None else f"row {example['row']}: {value}"


def column_stats(df: pd.DataFrame, dataset: DictConfig, partial: bool = False) -> dict:
    """Per column: count, nulls, min/max/mean of numbers, the most frequent values of
    categories and the target. `partial`: of one part of a table, to merge (merge_stats):
    sums instead of means, every distinct value."""
    from trainpipe.schema import column_kind

    stats = {}
    for col in df.columns:
        s = df[col]
        entry = {"count": int(s.notna().sum()), "nulls": int(s.isna().sum())}
        spec = dataset.columns.get(col)
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            entry |= {"min": _plain(s.min()), "max": _plain(s.max())}
            entry |= {"sum": _plain(s.sum())} if partial else {"mean": _plain(s.mean())}
        if spec is not None and (column_kind(spec) == "categorical" or col == dataset.target):
            counts = s.value_counts() if partial else s.value_counts().head(50)
            entry["distinct"] = {str(k): int(v) for k, v in counts.items()}
        stats[col] = entry
    return stats


def merge_stats(parts: list[dict]) -> dict:
    """The column statistics of a whole table from those of its parts (partial)."""
    merged: dict[str, dict] = {}
    for stats in parts:
        for col, entry in stats.items():
            into = merged.setdefault(col, {"count": 0, "nulls": 0})
            into["count"] += entry["count"]
            into["nulls"] += entry["nulls"]
            for key, pick in (("min", min), ("max", max)):
                if entry.get(key) is not None:
                    into[key] = entry[key] if into.get(key) is None else pick(into[key],
                                                                             entry[key])
            if "sum" in entry:
                into["sum"] = into.get("sum", 0) + (entry["sum"] or 0)
            for value, n in entry.get("distinct", {}).items():
                into.setdefault("distinct", {})
                into["distinct"][value] = into["distinct"].get(value, 0) + n
    for entry in merged.values():
        if "sum" in entry:
            total = entry.pop("sum")
            entry["mean"] = total / entry["count"] if entry["count"] else None
        if "distinct" in entry:
            top = sorted(entry["distinct"].items(), key=lambda kv: -kv[1])[:50]
            entry["distinct"] = dict(top)
    return merged


def to_markdown(report: dict) -> str:
    lines = [f"# Validation report: {report['dataset']}", "",
             "**Result: " + ("passed" if report["valid"] else "FAILED") + "**", ""]
    for role, src in report["sources"].items():
        lines.append(f"- {role}: `{src['source']}` ({src['rows']:,} rows, sha256 "
                     f"`{src['digest'][:12]}`)")
    if report["failures"]:
        lines += ["", "## Failures", "", f"Example {ROWS}.", "",
                  "| source | column | check | rows | examples |", "|---|---|---|---|---|"]
        for f in report["failures"]:
            ex = "; ".join(map(example_text, f["examples"]))
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


# --- A table checked part by part: chunks of a file to score, partitions of a Dask table ---


class ChunkedValidation:
    """The validate step's checks over a table read in parts (chunks of a file to score, the
    partitions of a Dask table), reported as for a whole table. `check_part` runs the checks
    of single rows on one part (anywhere: a Dask worker) and returns what the whole-table
    checks need; `add` gathers that here, and `finish` answers what only the whole table can
    (the number of rows, unique columns, columns without a single value, the target's
    classes). Failures of one column and check in several parts are one line, with the rows
    of all of them; example rows are numbered in the whole table.

    A unique column is the one thing held for the whole table: a 64-bit hash of each value
    (8 bytes a row, 16 while they are sorted). When some repeat, `column_values` reads the
    table again for the values of the example rows."""

    def __init__(self, cfg: DictConfig, source: str,
                 column_values: Callable[[str], Iterator[pd.Series]],
                 with_target: bool = False):
        self.cfg, self.with_target = cfg, with_target
        self.dataset, self.checks, self.source = cfg.dataset, cfg.validate, source
        self.column_values = column_values
        self.unique = [c for c in self.dataset.columns
                       if (with_target or c != self.dataset.target) and unique_column(cfg, c)]
        self.spellings = parse_options(self.dataset)  # missing values, booleans
        self.rows = 0
        self.failures: dict[tuple, dict] = {}
        self.present: set[str] = set()  # columns of the table
        self.with_values: set[str] = set()  # columns with at least one value so far
        self.hashes: dict[str, list[np.ndarray]] = {c: [] for c in self.unique}
        self.target_counts = pd.Series(dtype="int64")  # classes (regression: 2 values a part)
        self.target_rows = 0  # rows with a target
        self.stats: list[dict] = []

    def check_part(self, part: pd.DataFrame, stats: bool = False) -> tuple[pd.DataFrame | None,
                                                                            dict]:
        """The validated part (None when it fails) and what `add` needs of it."""
        typed, failures = _check_rows(self.cfg, part, self.source, self.with_target,
                                         whole_table=False)
        target = self.dataset.target
        summary = {
            "rows": len(part), "present": set(map(str, part.columns)), "failures": failures,
            "with_values": {str(c) for c in part.columns if self._has_value(part[c])},
            # as the check left a unique column: coerced to its type if it could be
            "hashes": {c: pd.util.hash_pandas_object(typed[c], index=False).to_numpy()
                       for c in self.unique if c in typed},
            "target_counts": _target_counts(typed, target, self.dataset.task)
                             if self.with_target and target in typed else pd.Series(dtype="int64"),
            "target_rows": int(typed[target].notna().sum()) if self.with_target
                           and target in typed else 0,
            "stats": column_stats(typed, self.dataset, partial=True) if stats else None}
        return (typed if not failures else None), summary

    def add(self, summary: dict, first_row: int = 0) -> None:
        """Gather a part's summary; `first_row`: the number of its first row in the table
        (a chunk of a file is numbered already)."""
        self.rows += summary["rows"]
        self.present |= summary["present"]
        self.with_values |= summary["with_values"]
        for column, hashes in summary["hashes"].items():
            self.hashes[column].append(hashes)
        self.target_counts = self.target_counts.add(summary["target_counts"], fill_value=0)
        self.target_rows += summary["target_rows"]
        if summary["stats"] is not None:
            self.stats.append(summary["stats"])
        for failure in summary["failures"]:
            if first_row:
                failure["examples"] = [e | {"row": e["row"] + first_row}
                                       if e.get("row") is not None else e
                                       for e in failure["examples"]]
            key = (failure["column"], failure["check"], failure["message"])
            if key not in self.failures:
                self.failures[key] = failure
            elif failure["check"] not in COLUMN_CHECKS:
                merged = self.failures[key]
                merged["rows"] += failure["rows"]
                merged["examples"] = (merged["examples"] + failure["examples"])[:EXAMPLES]

    def check(self, chunk: pd.DataFrame) -> pd.DataFrame | None:
        """A chunk (its index: the file's row numbers): the validated chunk, or None."""
        validated, summary = self.check_part(chunk)
        self.add(summary)
        return validated

    def _has_value(self, values: pd.Series) -> bool:
        """A cell that is neither null nor text the dataset calls missing (a CSV's empty
        cell is read as '')."""
        present = values.notna()
        if values.dtype == object or isinstance(values.dtype, pd.StringDtype):
            present &= ~values.isin(self.spellings["na_values"])
        return bool(present.any())

    def finish(self) -> list[dict]:
        """Every failure, the whole-table checks included."""
        source = self.source
        too_few = _min_rows(self.cfg, source, self.rows)
        if too_few:  # as for a whole table: nothing else is checked then
            return too_few
        failures = [f for column in self.unique if (f := self._duplicates(column))]
        all_null = []
        if self.checks.all_null_columns:
            all_null = [_failure(source, c, "not_all_null", self.rows, [],
                                 "every value is missing")
                        for c in self.dataset.columns
                        if c in self.present and c not in self.with_values]
        missing = {f["column"] for f in all_null}  # one cause, one line
        order = {c: i for i, c in enumerate(self.dataset.columns)}  # as for a whole table
        failures += sorted((f for f in self.failures.values()
                            if not (f["check"] == "not_nullable" and f["column"] in missing)),
                           key=lambda f: order.get(f["column"], -1))
        failures += all_null
        if self.with_target and not failures:
            failures += _target_checks_of_counts(self.cfg, self.target_counts, source,
                                                 self.rows, self.target_rows)
        return failures

    def _duplicates(self, column: str) -> dict | None:
        parts = self.hashes.pop(column)
        if not parts:
            return None
        hashes = np.concatenate(parts)
        del parts
        ordered = np.sort(hashes)
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        del ordered
        if not len(repeated):
            return None
        rows = np.flatnonzero(np.isin(hashes, repeated))  # every row of a repeated value
        wanted = set(rows[:EXAMPLES].tolist())
        spec = self.dataset.columns[column]
        examples = []
        for values in self.column_values(column):  # shown as validate shows them: typed
            picked = values[values.index.isin(wanted)]
            typed, _, _ = coerce.parse(picked, spec.type, nullable=True,
                                       date_format=spec.get("format"), **self.spellings)
            examples += [{"row": int(i), "value": _plain(x, spec.type == "int")}
                         for i, x in typed.items()]
        return _failure(self.source, column, "field_uniqueness", len(rows), examples)


def _check_dask(cfg: DictConfig, table: RawTable, with_target: bool):
    """A Dask table: each partition checked on a worker, the report gathered here. The
    validated table is the partitions parsed again as they are written (no table is held)."""
    cfg_plain, frame = cluster.plain(cfg), table.df
    validation = ChunkedValidation(cfg_plain, table.source, lambda column: _numbered(
        frame[column]), with_target=with_target)
    summaries = cluster.per_partition(_summary, frame, validation)
    for summary in summaries:
        validation.add(summary, validation.rows)
    failures = validation.finish()
    if failures:
        return None, failures, None, validation.rows
    typed = frame.map_partitions(_typed, validation, meta=_typed(frame._meta, validation))
    return typed, [], merge_stats(validation.stats), validation.rows


def _target_counts(typed: pd.DataFrame, target: str, task: str) -> pd.Series:
    """The target's classes and their rows; for regression two of its values (enough to
    tell a constant target)."""
    counts = typed[target].value_counts()
    return counts.head(2) if task == "regression" else counts


def _summary(part: pd.DataFrame, validation: ChunkedValidation) -> dict:
    return validation.check_part(part, stats=True)[1]


def _typed(part: pd.DataFrame, validation: ChunkedValidation) -> pd.DataFrame:
    typed, _, _ = _parse(validation.dataset, part, validation.source, validation.with_target)
    return typed


def _numbered(column) -> Iterator[pd.Series]:
    """A Dask column's partitions in order, indexed by their row numbers in the table."""
    first = 0
    for part in column.to_delayed():
        values = part.compute()
        values.index = pd.RangeIndex(first, first + len(values))
        first += len(values)
        yield values
