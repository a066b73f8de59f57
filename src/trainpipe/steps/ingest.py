"""ingest: read the raw training data (and scoring data) from any URL, with digests."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from trainpipe import cluster
from trainpipe.errors import DataValidationError, SourceError
from trainpipe.lake import PartedSource, Source, absolute, list_source, read_source, storage_options
from trainpipe.redaction import redact_uri
from trainpipe.steps import Report

ZONE = None  # the raw zone is read-only: ingest stores nothing, it is re-read when needed
OUTPUTS = {"raw": None, "raw_scoring": None}


@dataclass(frozen=True)
class RawTable:
    """A raw table and where it came from: the identity MLflow records as a dataset."""

    df: pd.DataFrame
    source: str  # redacted URL
    digest: str  # sha256 of the file's bytes
    format: str


def read_sources(cfg: DictConfig) -> dict[str, Source | PartedSource]:
    """The raw bytes of the training data (and scoring data), read once per run: their
    digests identify the data before any of it is parsed. compute=dask: the training data's
    files, which the workers read (their digests: see lake.PartedSource)."""
    if cluster.enabled(cfg):
        sources = {"train": list_source(cfg.dataset.source, cfg.lake.root)}
    else:
        sources = {"train": read_source(cfg.dataset.source)}
    if cfg.dataset.get("scoring_source"):
        sources["scoring"] = read_source(cfg.dataset.scoring_source)
    return sources


def run(cfg: DictConfig, sources: dict[str, Source]) -> tuple[dict, Report]:
    if isinstance(sources["train"], PartedSource):
        raw = to_dask_table(cfg, sources["train"])
        summary = (f"{len(sources['train'].files)} {raw.format} file(s), "
                   f"{sources['train'].size / 2**20:,.1f} MiB in {raw.df.npartitions} "
                   f"partitions x {raw.df.shape[1]} columns")
        params = {"source": raw.source, "source_digest": raw.digest,
                  "source_files": len(sources["train"].files)}
    else:
        raw = to_table(sources["train"])
        summary = f"{len(raw.df):,} rows x {raw.df.shape[1]} columns ({raw.format})"
        params = {"source": raw.source, "source_digest": raw.digest, "rows": len(raw.df)}
    scoring = to_table(sources["scoring"]) if "scoring" in sources else None
    if scoring is not None:
        summary += f"; scoring {len(scoring.df):,} rows"
        params |= {"scoring_source": scoring.source, "scoring_digest": scoring.digest,
                   "scoring_rows": len(scoring.df)}
    return {"raw": raw, "raw_scoring": scoring}, Report(summary=summary, params=params)


def to_dask_table(cfg: DictConfig, source: PartedSource) -> RawTable:
    """A Dask DataFrame over the source's files (read by the workers): CSV cells as text, as
    a whole file is read here; a partition per `compute.blocksize` of CSV, per row group of
    Parquet."""
    import dask.dataframe as dd

    urls = [f["url"] for f in source.files]
    options = storage_options(source.url)
    if source.format == "parquet":
        _same_columns(urls, options)
        df = dd.read_parquet(urls, split_row_groups=True, storage_options=options)
    else:
        df = dd.read_csv(urls, blocksize=cfg.compute.blocksize, encoding="utf-8-sig",
                         storage_options=options, **TEXT_CSV)
    return RawTable(df, redact_uri(absolute(source.url)), source.digest, source.format)


def _same_columns(urls: list[str], options: dict) -> None:
    """Every Parquet part has the first one's columns: Dask reads them all with the first
    part's, and a part without one fails deep in a worker. (A CSV part's header is read
    with its rows and checked by validate.)"""
    import fsspec
    import pyarrow.parquet as pq

    first = None
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **options)
        try:
            with fs.open(path, "rb") as file:
                columns = pq.read_schema(file).names
        except Exception as exc:  # a truncated or corrupt file, a lost connection
            raise SourceError(f"{redact_uri(absolute(url))}: not a readable Parquet file "
                              f"({redact_uri(str(exc))})") from None
        if first is None:
            first = (url, columns)
            continue
        missing = [c for c in first[1] if c not in columns]
        extra = [c for c in columns if c not in first[1]]
        if missing or extra:
            raise DataValidationError(
                f"{redact_uri(absolute(url))}: its columns differ from those of "
                f"{redact_uri(absolute(first[0]))}, the source's first part: "
                + "; ".join(f"{what} {', '.join(cols)}" for what, cols in
                            (("missing", missing), ("extra", extra)) if cols)
                + ". Every part of a source must have the same columns")


def to_table(source: Source) -> RawTable:
    return RawTable(_parse(source), redact_uri(absolute(source.url)), source.digest,
                    source.format)


def _parse(source: Source) -> pd.DataFrame:
    name = redact_uri(absolute(source.url))
    if source.format == "parquet":
        try:
            return pd.read_parquet(io.BytesIO(source.data))
        except Exception as exc:  # a truncated or corrupt file
            raise SourceError(f"{name}: not a readable Parquet file ({exc})") from None
    df = _read_text_fast(source.data)
    if df is None:
        df = _read_text(source.data, name)
    if df.shape[1] == 1:
        header = str(df.columns[0])
        for sep in (";", "\t", "|"):
            if sep in header:
                raise DataValidationError(
                    f"{name}: line 1 has no commas but {header.count(sep)} {sep!r}: the file "
                    f"seems to be {sep!r}-delimited; trainpipe reads comma-separated CSV")
    return df


# Every cell is read as the text the file holds; validate parses it to its column's type.
# (pandas' inference would read the code 01001 as 1001, `NA` as missing, and 1e30 as an
# int; its low-memory chunks warn about mixed types.)
TEXT_CSV = {"dtype": str, "keep_default_na": False, "na_filter": False}


def _read_text(data: bytes, name: str) -> pd.DataFrame:
    """pandas' parser: slower than pyarrow's, but its errors name the line."""
    try:
        # utf-8-sig: a byte-order mark must not become part of the first column's name.
        return pd.read_csv(io.BytesIO(data), encoding="utf-8-sig", **TEXT_CSV)
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{name}: the file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataValidationError(f"{name}: not a well-formed CSV file: {_ragged(exc)}") from None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataValidationError(
            f"{name}: line {line}: bytes that are not UTF-8 ({exc.reason}); "
            "save the file as UTF-8"
        ) from None


def _read_text_fast(data: bytes) -> pd.DataFrame | None:
    """The same table as `_read_text`, read by pyarrow (several times faster on big files),
    or None for anything unusual (a bad row or encoding, duplicate or blank header names):
    pandas' parser then reads it, or says what is wrong."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        names = list(pd.read_csv(io.BytesIO(data[:1 << 16]), nrows=0, encoding="utf-8-sig",
                                 **TEXT_CSV).columns)
    except Exception:  # noqa: BLE001 - the slow path reports it
        return None
    if len(set(names)) != len(names) or any(str(n).startswith("Unnamed: ") for n in names):
        return None  # pandas renames these (a.1, Unnamed: 0): keep its names
    text = pd.StringDtype("pyarrow", na_value=np.nan)
    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            # a quoted value may hold a line break: then blocks cannot start at any newline
            parse_options=pcsv.ParseOptions(newlines_in_values=b'"' in data),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), null_values=[],
                strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, ValueError):
        return None
    if table.column_names != names or any(t != pa.string() for t in table.schema.types):
        return None
    return table.to_pandas(types_mapper={pa.string(): text}.get)


def _ragged(exc: Exception) -> str:
    match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
    if not match:
        return str(exc).strip()
    expected, line, seen = match.groups()
    return f"line {line} has {seen} fields, the header has {expected}"
