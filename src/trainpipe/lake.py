"""The data lake over fsspec: a local folder or any S3 endpoint, same code.

Zones under the root: raw/ (read-only to trainpipe, except demo data), landing/
(validated data and its splits), features/ (transformed splits and the fitted
transformer), models/ (pointers to logged models). All data IO lives here.

A step's outputs are published as a set: each file is written under a temporary
name and moved into place, then `manifest.json` (digests, rows, producing run) is
written last. Readers trust only files named in a manifest.
"""

import hashlib
import io
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd

from trainpipe.errors import SourceError
from trainpipe.redaction import redact_uri

MANIFEST = "manifest.json"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


@dataclass(frozen=True)
class Source:
    """Raw bytes read once from a URL, with their digest and detected format."""

    url: str
    data: bytes
    digest: str
    format: str  # "csv" or "parquet"


def read_source(url: str) -> Source:
    """Read a CSV or Parquet file from any fsspec URL; a clear SourceError otherwise."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SourceError(f"{redact_uri(url)}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{redact_uri(url)}: is a folder, not a CSV or Parquet file") from None
    except Exception as exc:  # permissions, network, unknown protocol, ...
        raise SourceError(f"{redact_uri(url)}: cannot be read ({type(exc).__name__}: "
                          f"{redact_uri(str(exc))})") from None
    return Source(url, data, digest(data), _detect_format(url, data))


def _detect_format(url: str, data: bytes) -> str:
    if data[:4] == b"PAR1":
        return "parquet"
    name = url.lower().rsplit("?", 1)[0]
    if name.endswith((".parquet", ".pq")):
        raise SourceError(f"{redact_uri(url)}: named like Parquet but is not a Parquet file")
    if name.endswith((".csv", ".txt", ".tsv")) or b"\0" not in data[:4096]:
        return "csv"
    raise SourceError(f"{redact_uri(url)}: neither CSV nor Parquet")


def absolute(url: str) -> str:
    """Local paths made absolute (so records say where the data really was); URLs as is."""
    if "://" in url:
        return url
    return os.path.abspath(url)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def write_file(url: str, data: bytes) -> None:
    """Write one file whole or not at all (temporary name, then move)."""
    fs, path = fsspec.core.url_to_fs(url)
    _write_atomic(fs, path, data)


def _write_atomic(fs, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


class Lake:
    """A lake root (`./lake`, `s3://bucket/lake`) and the published outputs under it.

    An output lives under a prefix (`landing/hotel_bookings/split/<fingerprint>`). Each
    publish writes its files into a fresh attempt folder under it, then the manifest,
    which names the attempt: two writers racing on one prefix each write their own
    files, and whichever manifest lands last is complete and consistent.
    """

    def __init__(self, root: str):
        self.root = absolute(root).rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    def url(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self._root_path, *parts)

    def publish(self, prefix: str, files: dict[str, bytes], **meta: Any) -> dict:
        """Publish `files` under `prefix` as one output; the manifest goes last."""
        attempt = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        entries = {}
        for name, data in files.items():
            _write_atomic(self.fs, self._path(prefix, attempt, name), data)
            entries[name] = {"path": f"{attempt}/{name}", "sha256": digest(data),
                             "bytes": len(data)}
        manifest = {"files": entries, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()), **meta}
        _write_atomic(self.fs, self._path(prefix, MANIFEST),
                      json.dumps(manifest, indent=2).encode())
        return manifest

    def manifest(self, prefix: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._path(prefix, MANIFEST)))
        except FileNotFoundError:
            return None

    def read(self, prefix: str, name: str, manifest: dict | None = None) -> bytes:
        """A published file; SourceError when its output was never (fully) published."""
        manifest = manifest or self.manifest(prefix)
        if manifest is None or name not in manifest["files"]:
            raise SourceError(f"{redact_uri(self.url(prefix))}: not published yet "
                              "(run the steps before this one first)")
        return self.fs.cat_file(self._path(prefix, manifest["files"][name]["path"]))

    def read_parquet(self, prefix: str, name: str, manifest: dict | None = None):
        return pd.read_parquet(io.BytesIO(self.read(prefix, name, manifest)))

    def outputs(self, prefix: str) -> list[tuple[str, dict | None]]:
        """(sub-prefix, manifest or None) for each output folder directly under `prefix`."""
        try:
            entries = self.fs.ls(self._path(prefix), detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            sub = posixpath.join(prefix, posixpath.basename(entry.rstrip("/")))
            if self.fs.isdir(entry):
                found.append((sub, self.manifest(sub)))
        return found

    def remove(self, prefix: str) -> None:
        """Retract an output: the manifest first (readers stop trusting it), then the rest."""
        manifest = self._path(prefix, MANIFEST)
        if self.fs.exists(manifest):
            self.fs.rm(manifest)
        if self.fs.exists(self._path(prefix)):
            self.fs.rm(self._path(prefix), recursive=True)
