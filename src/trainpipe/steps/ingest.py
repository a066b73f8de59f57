"""ingest: read the raw training data (and scoring data) from any URL, with digests."""

import io
import re
from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig

from trainpipe.errors import DataValidationError, SourceError
from trainpipe.lake import Source, absolute, read_source
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


def read_sources(cfg: DictConfig) -> dict[str, Source]:
    """The raw bytes of the training data (and scoring data), read once per run: their
    digests identify the data before any of it is parsed."""
    sources = {"train": read_source(cfg.dataset.source)}
    if cfg.dataset.get("scoring_source"):
        sources["scoring"] = read_source(cfg.dataset.scoring_source)
    return sources


def run(cfg: DictConfig, sources: dict[str, Source]) -> tuple[dict, Report]:
    raw = to_table(sources["train"])
    scoring = to_table(sources["scoring"]) if "scoring" in sources else None
    summary = f"{len(raw.df):,} rows x {raw.df.shape[1]} columns ({raw.format})"
    params = {"source": raw.source, "source_digest": raw.digest, "rows": len(raw.df)}
    if scoring is not None:
        summary += f"; scoring {len(scoring.df):,} rows"
        params |= {"scoring_source": scoring.source, "scoring_digest": scoring.digest,
                   "scoring_rows": len(scoring.df)}
    return {"raw": raw, "raw_scoring": scoring}, Report(summary=summary, params=params)


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
    try:
        # utf-8-sig: a byte-order mark must not become part of the first column's name.
        df = pd.read_csv(io.BytesIO(source.data), encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{name}: the file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataValidationError(f"{name}: not a well-formed CSV file: {_ragged(exc)}") from None
    except UnicodeDecodeError as exc:
        line = source.data[: exc.start].count(b"\n") + 1
        raise DataValidationError(
            f"{name}: line {line}: bytes that are not UTF-8 ({exc.reason}); "
            "save the file as UTF-8"
        ) from None
    if df.shape[1] == 1:
        header = str(df.columns[0])
        for sep in (";", "\t", "|"):
            if sep in header:
                raise DataValidationError(
                    f"{name}: line 1 has no commas but {header.count(sep)} {sep!r}: the file "
                    f"seems to be {sep!r}-delimited; trainpipe reads comma-separated CSV")
    return df


def _ragged(exc: Exception) -> str:
    match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
    if not match:
        return str(exc).strip()
    expected, line, seen = match.groups()
    return f"line {line} has {seen} fields, the header has {expected}"
