"""`trainpipe dataset init`: write a dataset file from a table, so nobody types thirty
column specs by hand.

The table is read as `trainpipe run` reads it (the same parser, on the first SAMPLE_ROWS
rows of a large file, never the whole of it). Every column gets its type, nullability,
a range (numbers) or the values seen (low-cardinality text); the target, the task and the
id column are guessed when not given. Each guess a person should check carries a
`# check:` comment. Before the file is written, the sample is validated against it and
a column trainpipe cannot read as its guessed type is written as text; after, the file is
composed through Hydra exactly as `trainpipe run --config-dir` will, and the sample is
validated once more: what is left (the data breaking trainpipe's own rules) is reported.

The first line holds the sha256 of the rest: a file init wrote and nobody touched may be
rewritten; an edited one only with --force.
"""

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from trainpipe import coerce, lake
from trainpipe.errors import ConfigError, DataValidationError, SourceError, TrainpipeError
from trainpipe.redaction import redact_uri

SAMPLE_ROWS = 100_000  # a larger file is sampled: its first rows
MARGIN = 0.1  # min/max: the range seen, widened by this fraction of its width on each side
MAX_VALUES = 20  # text columns with at most this many distinct values get a `values` list
TASKS = ("binary", "multiclass", "regression")
# Name words of a column of integer codes (room_type, market_segment, meal_plan) and of an id
CATEGORY_WORDS = {"type", "code", "category", "class", "segment", "plan", "kind", "group",
                  "status", "zone", "region", "channel", "brand", "sector", "mode"}
ID_WORDS = {"id", "key", "uuid", "guid", "identifier"}
TARGET_NAMES = ("target", "label", "class", "y", "outcome")
ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?"
                          r"(Z|[+-]\d{2}:?\d{2})?)?")
OTHER_DATE = re.compile(r"\d{1,2}[./-]\d{1,2}[./-]\d{2,4}([T ].*)?")
WHOLE_NUMBER = re.compile(r"[+-]?\d+")
LEADING_ZERO = re.compile(r"[+-]?0\d")
WORD_BOOLEANS = {"true", "false", "yes", "no"}  # text read as bool (0/1 stay numbers)
PLAIN_YAML = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}
DIGEST_LINE = re.compile(r"# trainpipe dataset init · sha256 of the lines below: ([0-9a-f]{64})\n")


@dataclass
class Sample:
    """The first rows of a table as `trainpipe run` reads them, and their text as written
    in the file (CSV only: leading zeros, whole numbers, dates)."""

    url: str
    df: pd.DataFrame
    text: pd.DataFrame | None
    more: bool  # the file holds more rows than the sample
    total: int | None  # all rows of the file, when known without reading it (Parquet)

    def described(self) -> str:
        if not self.more:
            return f"all {len(self.df):,} rows"
        of = f" (of {self.total:,})" if self.total else ""
        return f"the first {len(self.df):,} rows{of}"


@dataclass
class Inferred:
    """A dataset file's content, and a `check:` note for each guess (key -> note)."""

    name: str
    source: str
    task: str
    target: str
    columns: dict[str, dict[str, Any]]
    id_column: str | None = None
    positive_class: Any = None
    notes: dict[str, str] = field(default_factory=dict)  # "task", "target", "columns.x", ...

    def checks(self) -> list[tuple[str, str]]:
        """(key, note) of every guess to check, in file order."""
        keys = [*_document(self), *(f"columns.{col}" for col in self.columns)]
        return [(key, self.notes[key]) for key in keys if key in self.notes]


@dataclass
class Written:
    path: Path
    inferred: Inferred
    sample: Sample
    replaced: bool  # a file init had written before was rewritten
    problems: str | None  # the sample breaks the file (trainpipe's own rules): the report


def init(source: str, out: str = "conf", name: str | None = None, target: str | None = None,
         task: str | None = None, force: bool = False) -> Written:
    """Infer a dataset file from `source` and write it to OUT/dataset/NAME.yaml."""
    if redact_uri(source) != source:
        raise ConfigError(f"{redact_uri(source)}: the source URL holds a secret, which would be "
                          "written into the dataset file; give credentials through the "
                          "environment (AWS_PROFILE, AWS_ACCESS_KEY_ID, ...) instead")
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    name = name or _name_from(source)
    _check_name(name)
    path = Path(out) / "dataset" / f"{name}.yaml"
    replaced = _check_overwrite(path, force)  # before reading a large file for nothing
    sample = read_sample(source)
    inferred = infer(sample, name, target, task)
    body = _readable_body(inferred, sample, out)
    text = f"# trainpipe dataset init · sha256 of the lines below: {_sha(body)}\n{body}"
    lake.write_file(str(path), text.encode())
    return Written(path, inferred, sample, replaced, _validate(out, name, sample))


# --------------------------------------------------------------------------- reading


SPLIT_CHECKS = ("rows_for_split", "rows_per_class")  # see steps/split.feasibility


def read_sample(url: str, rows: int = SAMPLE_ROWS) -> Sample:
    """The first `rows` rows of a CSV or Parquet file at any fsspec URL, parsed as the
    ingest step parses the whole file; the rest of the file is never read."""
    from trainpipe.steps.ingest import to_table

    where = redact_uri(lake.absolute(url))
    try:
        with lake.storage_errors(url, "read it"), fsspec.open(
                url, "rb", **lake.storage_options(url)) as f:
            kind = lake._detect_format(url, f.read(4096))
            f.seek(0)
            data, more, total = (_parquet_head(f, rows, where) if kind == "parquet"
                                 else _csv_head(f, rows))
    except TrainpipeError:
        raise
    except FileNotFoundError:
        raise SourceError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{where}: is a folder, not a CSV or Parquet file") from None
    except Exception as exc:  # permissions, network, unknown protocol, ...
        raise SourceError(f"{redact_uri(url)}: cannot be read ({type(exc).__name__}: "
                          f"{redact_uri(str(exc))})") from None
    df = to_table(lake.Source(url, data, lake.digest(data), kind)).df
    text = None
    if kind == "csv":  # ingest keeps every cell as text: guess types from pandas' reading
        text = df
        df = pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""],
                         encoding="utf-8-sig", low_memory=False)
    return Sample(url, df, text, more, total)


def _csv_head(f, rows: int) -> tuple[bytes, bool, None]:
    """The header and the first `rows` records, and whether more follow. A record goes on
    over line ends inside quotes: the count of '"' so far is odd there."""
    lines: list[bytes] = []
    records, quoted = -1, False  # -1: the header is no data record
    while line := f.readline():
        if records == rows and not quoted:
            if line.strip():
                return b"".join(lines), True, None
            continue  # blank lines are no rows (pandas skips them)
        lines.append(line)
        quoted ^= line.count(b'"') % 2 == 1
        if not quoted and line.strip():
            records += 1
    return b"".join(lines), False, None


def _parquet_head(f, rows: int, where: str) -> tuple[bytes, bool, int]:
    """The first `rows` rows as Parquet bytes (only the row groups holding them are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(f)
        total = file.metadata.num_rows
        batches, count = [], 0
        for batch in file.iter_batches(batch_size=min(rows, 65_536), use_pandas_metadata=True):
            batches.append(batch.slice(0, rows - count))
            count += batches[-1].num_rows
            if count >= rows:
                break
        table = pa.Table.from_batches(batches, schema=file.schema_arrow)
    except (pa.ArrowException, OSError) as exc:  # a truncated or corrupt file
        raise SourceError(f"{where}: not a readable Parquet file ({exc})") from None
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue(), total > rows, total


# --------------------------------------------------------------------------- inferring


def infer(sample: Sample, name: str, target: str | None = None,
          task: str | None = None) -> Inferred:
    """Every column's spec, the id column, the target and the task, with a note on each guess."""
    df = sample.df
    if df.empty:
        raise DataValidationError(f"{redact_uri(lake.absolute(sample.url))}: the file has no "
                                  "data rows to infer the columns from")
    if df.shape[1] < 2:
        raise ConfigError(f"{redact_uri(lake.absolute(sample.url))}: the table has one column "
                          f"({df.columns[0]!r}); a dataset needs a target and a feature")
    notes: dict[str, str] = {}
    columns = {col: _column(df[col], _text(sample, col), notes, f"columns.{col}")
               for col in df.columns}
    id_column = _id_column(df, columns, target)
    target = _target(df, target, id_column, notes)
    for col, spec in columns.items():
        if col not in (target, id_column):
            _kind(df[col], spec, notes, f"columns.{col}")
    if id_column is not None:
        columns[id_column] = {k: v for k, v in columns[id_column].items()
                              if k in ("type", "nullable")} | {"unique": True}
        notes["id_column"] = "guessed: named like an id, every sampled value distinct"
    task = _task(df[target], columns[target], task, target, notes)
    _as_target(columns[target], df[target], task, target)
    positive = _positive_class(df[target], task, notes)
    return Inferred(name, lake.absolute(sample.url), task, target, columns, id_column,
                    positive, notes)


def _text(sample: Sample, col: str) -> pd.Series | None:
    return None if sample.text is None else sample.text[col]


def _column(s: pd.Series, text: pd.Series | None, notes: dict[str, str],
            key: str) -> dict[str, Any]:
    """One column's type, nullability and range or values, from its values as parsed and
    (CSV) as written."""
    present = s.dropna()
    written = None if text is None else text[s.notna()]
    booleans = pd.api.types.is_bool_dtype(s) or (
        pd.api.types.is_object_dtype(s) and present.map(
            lambda v: isinstance(v, bool | np.bool_)).all())
    spec: dict[str, Any] = {"type": "str"}
    if present.empty:
        notes[key] = "no value in the sample: its type is unknown"
    elif booleans and s.isna().any():
        # type bool would read a missing value as True
        notes[key] = "true/false with missing values: written as text, 'True'/'False'"
        spec["values"] = ["False", "True"]
    elif booleans:
        spec = {"type": "bool"}
    elif pd.api.types.is_numeric_dtype(s):
        zeros = None if written is None else written[written.str.match(LEADING_ZERO)]
        if zeros is not None and len(zeros):
            # no values: trainpipe reads a CSV's digits as numbers, and sees them without zeros
            notes[key] = (f"text, not numbers: leading zeros ({zeros.iloc[0]!r}); trainpipe "
                          "reads a CSV's digits as numbers, so the zeros are not kept")
        else:
            whole = (pd.api.types.is_integer_dtype(s) if written is None
                     else bool(written.str.fullmatch(WHOLE_NUMBER).all()))
            spec = {"type": "int" if whole else "float"} | _numbers(present, whole)
    elif pd.api.types.is_datetime64_any_dtype(s):
        spec = {"type": "datetime"}
    else:
        as_text = present.astype(str)
        spelled = set(as_text.str.strip().str.lower().unique())
        numeric = pd.to_numeric(as_text, errors="coerce").notna()
        if as_text.str.fullmatch(ISO_DATETIME).all():
            spec = {"type": "datetime"}
        elif len(spelled) == 2 and spelled <= WORD_BOOLEANS and any(
                spelled == {t, f} for t, f in zip(coerce.TRUE_VALUES, coerce.FALSE_VALUES,
                                                  strict=True)):
            # yes/no, true/false: trainpipe reads these spellings as booleans
            spec = {"type": "bool"}
        elif 0.9 <= numeric.mean() < 1:
            odd = as_text[~numeric]
            notes[key] = (f"numbers but for {len(odd)} value(s) such as {odd.iloc[0]!r}: "
                          "written as text (a category); if those are errors, make it int or "
                          "float and validation will name their rows")
            if as_text.nunique() <= MAX_VALUES:
                spec["values"] = sorted(as_text.unique())
        else:
            if as_text.str.fullmatch(OTHER_DATE).all():
                notes[key] = (f"dates not in ISO 8601 (e.g. {as_text.iloc[0]!r}): written as "
                              "text, so that no day is read as a month")
            if as_text.nunique() <= MAX_VALUES:
                spec["values"] = sorted(as_text.unique())
    if s.isna().any():
        spec["nullable"] = True
    return spec


def _numbers(present: pd.Series, whole: bool) -> dict[str, Any]:
    finite = present[np.isfinite(present.astype(float))]  # inf fails validation on its own
    if finite.empty:
        return {}
    if whole and set(finite.unique()) == {0, 1}:
        return {"values": [0, 1]}
    low, high = _widen(float(finite.min()), float(finite.max()), whole)
    return {"min": low, "max": high}


def _widen(low: float, high: float, whole: bool) -> tuple[float, float]:
    """[low, high] widened by MARGIN of its width on each side (of the value's size when
    there is one value), rounded outwards to the margin's first digit (whole numbers for int
    columns); never below 0 when no value is."""
    margin = MARGIN * ((high - low) or abs(high) or 1)
    step = 10.0 ** math.floor(math.log10(margin))
    if whole:
        step = max(step, 1.0)
    digits = max(0, -math.floor(math.log10(step)))
    wide_low = round(math.floor((low - margin) / step) * step, digits)
    wide_high = round(math.ceil((high + margin) / step) * step, digits)
    if low >= 0:
        wide_low = max(wide_low, 0.0)
    if whole:
        return int(wide_low), int(wide_high)
    return wide_low, wide_high


def _kind(s: pd.Series, spec: dict[str, Any], notes: dict[str, str], key: str) -> None:
    """A feature's `kind` where the type's default is a guess worth stating."""
    present = s.dropna()
    distinct = present.nunique()
    col = key.split(".", 1)[1]
    if present.empty:
        spec["kind"] = "drop"
    elif distinct == 1 and len(present) > 1:
        spec["kind"] = "drop"
        notes[key] = f"one value in the sample ({_example(present)!r}): no use as a feature"
    elif spec["type"] == "str" and "values" not in spec and distinct == len(present) >= 20:
        spec["kind"] = "drop"
        notes[key] = "every value distinct: a key or free text, not a feature"
    elif (spec["type"] == "int" and "values" not in spec and 3 <= distinct <= MAX_VALUES
          and present.min() >= 0 and CATEGORY_WORDS & set(_words(col))):
        spec["kind"] = "categorical"
        notes[key] = (f"integer codes of a category ({distinct} values, named like one)? "
                      "kind: numeric if their order means something")


def _words(name: str) -> list[str]:
    """room_type_reserved, roomTypeReserved, RoomType -> room, type(, reserved)"""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)]


def _id_column(df: pd.DataFrame, columns: dict[str, dict], target: str | None) -> str | None:
    """The first column named like an id (id, customer_id, userKey) whose sampled values
    are all there and all distinct."""
    for col, spec in columns.items():
        words = _words(str(col))
        s = df[col]
        if (col != target and words and words[-1] in ID_WORDS
                and spec["type"] in ("int", "str") and s.notna().all() and s.is_unique
                and len(s) > 1):
            return col
    return None


def _target(df: pd.DataFrame, target: str | None, id_column: str | None,
            notes: dict[str, str]) -> str:
    from trainpipe.config import did_you_mean

    columns = [str(c) for c in df.columns]
    if target is not None:
        if target not in columns:
            raise ConfigError(f"--target {target!r} is not a column of the table"
                              f"{did_you_mean(target, columns)}; its columns: "
                              f"{', '.join(columns)}")
        return target
    for col in columns:
        if col.lower() in TARGET_NAMES:
            notes["target"] = f"guessed: named {col!r}; --target chooses another"
            return col
    notes["target"] = "guessed: the last column; --target chooses another"
    return [c for c in columns if c != id_column][-1]


def _task(s: pd.Series, spec: dict, task: str | None, target: str,
          notes: dict[str, str]) -> str:
    distinct = s.dropna().nunique()
    labels = f"{distinct} value{'s' if distinct != 1 else ''}"
    if spec["type"] == "datetime":
        raise ConfigError(f"the target {target!r} holds dates (e.g. {_example(s)!r}); trainpipe "
                          "learns labels or numbers: --target names the column to predict")
    if task == "binary" and distinct > 2:
        raise ConfigError(f"--task binary: the target {target!r} has {labels} in the sampled "
                          f"rows ({_some(s)}); a binary target has 2")
    if task == "regression" and spec["type"] not in ("int", "float"):
        raise ConfigError(f"--task regression: the target {target!r} holds no numbers "
                          f"({_some(s)}); regression learns numbers")
    if task is not None:
        return task
    if spec["type"] == "str" and distinct > MAX_VALUES and distinct * 5 > len(s):
        raise ConfigError(f"the target {target!r} holds text with {labels} in {len(s):,} rows "
                          f"({_some(s)}): not labels to learn; --target names the column to "
                          "predict (and --task what to learn)")
    if distinct <= 2:
        guess = "binary"
    elif spec["type"] in ("str", "bool") or (spec["type"] == "int" and distinct <= MAX_VALUES):
        guess = "multiclass"
    else:
        guess = "regression"
    notes["task"] = f"guessed from the target's {labels}; --task chooses another"
    return guess


def _as_target(spec: dict[str, Any], s: pd.Series, task: str, target: str) -> None:
    """A target is never missing. A classification target lists its labels (the config
    checks positive_class against them); a regression target keeps its range."""
    spec.pop("nullable", None)  # every row needs a label: a missing one fails validation
    if task == "regression":
        return
    spec.pop("min", None)
    spec.pop("max", None)
    if spec["type"] == "bool" and not {str(v).lower() for v in s.dropna().unique()} <= {
            "true", "false"}:
        spec["type"] = "str"  # yes/no labels stay labels: the positive class names one
    if spec["type"] != "bool":
        labels = s.dropna().unique()
        if spec["type"] in ("int", "float"):
            spec["values"] = sorted(int(v) if float(v).is_integer() else float(v)
                                    for v in labels)
        else:
            spec["values"] = sorted(str(v) for v in labels)


def _positive_class(s: pd.Series, task: str, notes: dict[str, str]) -> Any:
    """The label binary metrics are about, where the config must name it (labels that are
    not 0/1 or false/true): one that reads like yes, else the rarer one."""
    if task != "binary":
        return None
    counts = s.dropna().value_counts()
    labels = [_plain(v) for v in counts.index]
    if {str(v).lower() for v in labels} <= {"0", "1", "0.0", "1.0", "true", "false"}:
        return None
    yes = [v for v in labels if str(v).lower() in ("yes", "y", "positive", "pos")]
    chosen = yes[0] if yes else _plain(counts.idxmin())
    why = "it reads like yes" if yes else "the rarer one"
    notes["positive_class"] = f"the label recall, precision and ROC are about; guessed: {why}"
    return chosen


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _example(s: pd.Series) -> Any:
    return _plain(s.dropna().iloc[0])


def _some(s: pd.Series) -> str:
    values = s.dropna().unique()
    shown = ", ".join(repr(_plain(v)) for v in values[:5])
    return shown + (", ..." if len(values) > 5 else "")


# --------------------------------------------------------------------------- checking


def _readable_body(inferred: Inferred, sample: Sample, out: str) -> str:
    """The file's body, once the sample is read through it: a column the sample cannot be
    read as its guessed type (dates in mixed formats, ...) is written as text."""
    body = render(inferred, sample, out)
    failed = {f["column"] for f in _failures(OmegaConf.create(body), sample)
              if f["check"] == coerce.TYPE}
    for col in [c for c in inferred.columns if c in failed]:
        spec = inferred.columns[col]
        inferred.notes[f"columns.{col}"] = (f"not readable as {spec['type']} throughout "
                                            "(mixed formats?): written as text")
        inferred.columns[col] = {k: v for k, v in spec.items() if k in ("nullable", "kind")
                                 } | {"type": "str"}
    return render(inferred, sample, out) if failed else body


def _failures(dataset, sample: Sample) -> list[dict]:
    """The validate step's failures of the sample against a dataset config (none: valid)."""
    from trainpipe import config
    from trainpipe.steps import validate
    from trainpipe.steps.ingest import RawTable

    cfg = config.compose([])  # the default checks (validate, split) ...
    cfg.dataset = dataset  # ... on this dataset
    table = RawTable(sample.df.copy(), redact_uri(lake.absolute(sample.url)), "", "")
    try:
        validate.run(cfg, table, None)
    except DataValidationError as exc:
        failures = json.loads(exc.report.artifacts["validation_report.json"])["failures"]
        # too few rows for the split is the data's size, not the file's fault
        return [f for f in failures if f["check"] not in SPLIT_CHECKS]
    return []


def _validate(out: str, name: str, sample: Sample) -> str | None:
    """The written file composed as `trainpipe run --config-dir OUT dataset=NAME` composes
    it, and the sample validated against it: the failures in validate's words, or None."""
    from trainpipe import config
    from trainpipe.steps.validate import to_terminal

    failures = _failures(config.compose([f"dataset={name}"], out).dataset, sample)
    return to_terminal(failures) if failures else None


# --------------------------------------------------------------------------- writing


def _document(inferred: Inferred) -> dict[str, Any]:
    """The dataset file's keys in file order."""
    doc: dict[str, Any] = {"name": inferred.name, "source": inferred.source,
                           "task": inferred.task, "target": inferred.target}
    if inferred.positive_class is not None:
        doc["positive_class"] = inferred.positive_class
    if inferred.id_column is not None:
        doc["id_column"] = inferred.id_column
    doc["strict"] = True
    doc["columns"] = inferred.columns
    return doc


def render(inferred: Inferred, sample: Sample, out: str) -> str:
    """The dataset file below its digest line: a header, the keys, one line per column."""
    run = f"trainpipe run --config-dir {out} dataset={inferred.name}"
    lines = [
        "# Written by `trainpipe dataset init`, which rewrites it only while the lines below",
        "# are as it wrote them (after an edit, only with --force). Edit it freely.",
        "#",
        f"# Inferred from {sample.described()} in",
        f"#   {inferred.source}",
        "# Check the guesses marked `check:`, then train with",
        f"#   {run}",
        f"# min/max: the range seen, widened by {MARGIN:.0%} of its width on each side "
        "(never below 0",
        "#   for a column without negative values); values: every value seen. A value outside",
        "#   them fails validation: widen them if the data may go further.",
    ]
    if sample.more:
        lines.append("# The sample is the file's first rows: if the file is sorted, later rows "
                     "may differ.")
    lines.append("# The format: README, \"Your own dataset\".")
    doc = _document(inferred)
    notes = inferred.notes
    top = [(f"{key}: {_yaml(doc[key])}", notes.get(key)) for key in doc if key != "columns"]
    lines += _aligned(top)
    lines.append("columns:")
    keys = {col: _yaml(str(col), key=True) + ":" for col in inferred.columns}
    width = max(len(k) for k in keys.values())
    specs = [(f"  {keys[col]:<{width}} {_flow(spec)}", notes.get(f"columns.{col}"))
             for col, spec in inferred.columns.items()]
    lines += _aligned(specs)
    return "\n".join(lines) + "\n"


def _aligned(rows: list[tuple[str, str | None]]) -> list[str]:
    """The `# check:` comments of the lines that have one, in one column."""
    width = min(max((len(text) for text, note in rows if note), default=0), 72)
    return [f"{text:<{width}}  # check: {note}" if note else text for text, note in rows]


def _flow(spec: dict[str, Any]) -> str:
    order = ("type", "nullable", "min", "max", "values", "unique", "kind")
    parts = [f"{key}: {_yaml(spec[key])}" for key in order if key in spec]
    return "{" + ", ".join(parts) + "}"


def _yaml(value: Any, key: bool = False) -> str:
    """A value (or a key) as YAML and OmegaConf read back the same: text that YAML would
    take for something else (yes, no, on, 007, 1e3, a date, ${...}) is quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    text = str(value)
    if PLAIN_YAML.fullmatch(text) and text.lower() not in YAML_WORDS:
        return text
    if not key:  # OmegaConf interpolates values (never keys) unless `${` is escaped
        text = text.replace("${", "\\${")
    return json.dumps(text, ensure_ascii=False)  # JSON's double-quoted strings are YAML's


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_overwrite(path: Path, force: bool) -> bool:
    """May init write `path`? True when it replaces a file it wrote that nobody edited."""
    if not path.exists():
        return False
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a dataset file")
    text = path.read_text(encoding="utf-8", errors="replace")
    found = DIGEST_LINE.match(text)
    untouched = found is not None and found[1] == _sha(text[found.end():])
    if untouched or force:
        return True
    why = ("edited since `trainpipe dataset init` wrote it" if found
           else "not written by `trainpipe dataset init`")
    raise ConfigError(f"{path}: exists and was {why}; not overwritten (--force replaces it, "
                      "and what it holds now is lost)")


def _check_name(name: str) -> None:
    from trainpipe.config import CONF_DIR, PLAIN_NAME, PLAIN_NAME_RULE

    if not PLAIN_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: must be {PLAIN_NAME_RULE}")
    if (CONF_DIR / "dataset" / f"{name}.yaml").exists():
        raise ConfigError(f"--name {name!r}: trainpipe ships a dataset of that name, and "
                          f"`dataset={name}` would pick trainpipe's; choose another --name")


def _name_from(source: str) -> str:
    stem = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0].split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "dataset"
