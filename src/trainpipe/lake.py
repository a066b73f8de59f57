"""The data lake over fsspec: a local folder or any S3 endpoint, same code.

Zones under the root: raw/ (read-only to trainpipe, except demo data), landing/
(validated data and its splits), features/ (transformed splits and the fitted
transformer), models/ (pointers to logged models), predictions/ (scored data). All data IO
lives here.

A step's outputs are published as a set: each file is written under a temporary
name and moved into place, then `manifest.json` (digests, rows, producing run) is
written last. Readers trust only files named in a manifest.

On S3 (AWS, MinIO, any endpoint: `AWS_ENDPOINT_URL`), credentials come only from the
environment or AWS profiles. Requests are retried a bounded number of times (`S3_CONFIG`);
then the error says what went wrong in words: a bucket that does not exist, credentials
refused, an endpoint that cannot be reached.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import pandas as pd

from trainpipe.errors import ConfigError, SourceError, TrainpipeError
from trainpipe.redaction import redact_text, redact_uri

MANIFEST = "manifest.json"
OBJECT_STORES = ("s3", "s3a")
# botocore's settings for every S3 request of the lake: a request that cannot connect is
# tried S3_ATTEMPTS times in all (exponential backoff with jitter, a few seconds
# together), then fails with a LakeUnavailable error.
S3_ATTEMPTS = 4
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60,
             "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"}}
# And every S3 call has a total time limit, whatever happens on the wire: botocore's
# timeouts bound connecting and each read, not a PUT whose body an endpoint never takes, nor
# the retries together. The limit grows with the bytes moved (at least 1 MB/s is expected).
S3_TIMEOUT = float(os.environ.get("TRAINPIPE_S3_TIMEOUT", "120"))
S3_MIN_RATE = 1e6  # bytes per second


class DamagedOutput(TrainpipeError):
    """A published output that cannot be trusted: its manifest is not JSON or names files
    outside its folder, or a file's bytes differ from the digest the manifest recorded.
    The pipeline treats it as not published (and redoes its step)."""

    exit_code = 1

    def __init__(self, where: str, reason: str):
        super().__init__(f"{redact_uri(where)}: damaged output: {reason}")
        self.where, self.reason = where, reason


class LakeUnavailable(TrainpipeError):
    """The lake's storage cannot be reached (after retries): the endpoint is down or gone."""

    exit_code = 1


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`: bounded retries and timeouts for S3, nothing otherwise.

    The endpoint is named explicitly (when set) so that fsspec's cache of filesystem
    objects never hands out one bound to another endpoint."""
    if fsspec.utils.get_protocol(url) not in OBJECT_STORES:
        return {}
    options: dict[str, Any] = {"config_kwargs": copy.deepcopy(S3_CONFIG)}  # botocore edits it
    if endpoint := _endpoint():
        options["endpoint_url"] = endpoint
    return options


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _url_to_fs(url: str):
    options = storage_options(url)
    if not options:
        return fsspec.core.url_to_fs(url)
    _quiet_orphaned_connection_errors()
    fs, path = fsspec.core.url_to_fs(url, **options)
    return _Bounded(fs), path


class _Bounded:
    """An object store's filesystem whose calls each end within a time limit (S3_TIMEOUT,
    plus the bytes moved at S3_MIN_RATE): fsspec's async calls take `timeout=`. Files are
    read and written whole through these calls, never through open() file objects, whose
    reads no limit covers."""

    CALLS = {"cat_file", "pipe_file", "exists", "ls", "rm", "info", "put_file", "get_file",
             "makedirs", "find"}

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if name not in self.CALLS:
            return attr

        def bounded(*args, nbytes: int = 0, **kwargs):
            if name == "pipe_file":
                nbytes = len(args[1] if len(args) > 1 else kwargs["value"])
            elif name == "put_file":
                nbytes = os.path.getsize(args[0])
            return attr(*args, timeout=time_limit(nbytes), **kwargs)

        return bounded


def time_limit(nbytes: int = 0) -> float:
    """The most an S3 call moving `nbytes` may take, in seconds."""
    return S3_TIMEOUT + nbytes / S3_MIN_RATE


_quieted = False


def _quiet_orphaned_connection_errors() -> None:
    """When an endpoint goes away, aiohttp leaves background write tasks whose connection
    errors asyncio prints as "Task exception was never retrieved" with a traceback. The
    request they belonged to has already failed and is reported in words: drop the noise."""
    global _quieted
    if _quieted:
        return
    from fsspec.asyn import get_loop

    def handler(loop, context):
        exc = context.get("exception")
        if ("never retrieved" in str(context.get("message", ""))
                and isinstance(exc, (OSError, *_aiohttp_errors()))):
            return
        loop.default_exception_handler(context)

    get_loop().set_exception_handler(handler)
    _quieted = True


def _aiohttp_errors() -> tuple[type[BaseException], ...]:
    try:
        import aiohttp
    except ImportError:
        return ()
    return (aiohttp.ClientConnectionError,)


@contextmanager
def storage_errors(url: str, doing: str) -> Iterator[None]:
    """Turn storage failures into errors that say what is wrong and what to check.

    A missing object stays a FileNotFoundError (callers decide what that means); a missing
    bucket, refused credentials and an unreachable endpoint become TrainpipeErrors."""
    try:
        yield
    except TrainpipeError:
        raise
    except FileNotFoundError as exc:
        if _missing_bucket(exc):
            raise SourceError(f"{redact_uri(url)}: cannot {doing}: the bucket "
                              f"{_bucket(url)!r} does not exist{_at_endpoint(url)}; create it "
                              "or fix the URL") from None
        raise
    except PermissionError as exc:
        hint = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the "
                "bucket's policy" if _is_object_store(url) else "check the permissions")
        raise SourceError(f"{redact_uri(url)}: cannot {doing}: access denied{_at_endpoint(url)}"
                          f" ({_reason(exc)}); {hint}") from None
    except OSError as exc:
        if exc.errno not in LOCAL_FAULTS:
            _explain(exc, url, doing)
            raise
        where = f": {redact_uri(exc.filename)}" if exc.filename else ""
        raise SourceError(f"{redact_uri(url)}: cannot {doing}: {LOCAL_FAULTS[exc.errno]}"
                          f"{where}") from None
    except Exception as exc:
        _explain(exc, url, doing)
        raise


def _explain(exc: BaseException, url: str, doing: str) -> None:
    """Raise the TrainpipeError that says what `exc` means; return when it is unknown."""
    kind = _classify(exc, _is_object_store(url))
    if kind == "timeout":
        endpoint = _endpoint()
        where = f"the S3 endpoint {redact_uri(endpoint)}" if endpoint else "AWS S3"
        raise LakeUnavailable(
            f"{redact_uri(url)}: cannot {doing}: {where} did not finish within "
            f"{S3_TIMEOUT:.0f} s (+1 s per MB moved; TRAINPIPE_S3_TIMEOUT sets it): it "
            "accepts connections but does not answer") from None
    if kind == "unreachable":
        endpoint = _endpoint()
        where = (f"the S3 endpoint {redact_uri(endpoint)}" if endpoint
                 else "AWS S3" if _is_object_store(url) else "the storage")
        raise LakeUnavailable(
            f"{redact_uri(url)}: cannot {doing}: {where} cannot be reached; gave up "
            f"after {S3_ATTEMPTS} attempts ({_reason(exc)})") from None
    if kind == "credentials":
        raise SourceError(f"{redact_uri(url)}: cannot {doing}: no S3 credentials found "
                          f"({_reason(exc)}); set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from None
    if kind == "client":
        raise SourceError(f"{redact_uri(url)}: cannot {doing}{_at_endpoint(url)} "
                          f"({_reason(exc)})") from None


# What a local folder can refuse, in words (a full disk, a read-only mount, a file in the way)
LOCAL_FAULTS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only",
                errno.ENOTDIR: "a file stands where a folder must be",
                errno.EEXIST: "a file stands where a folder must be"}


def _is_object_store(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in OBJECT_STORES


def _bucket(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def _at_endpoint(url: str) -> str:
    if not _is_object_store(url):
        return ""
    endpoint = _endpoint()
    return f" (endpoint {redact_uri(endpoint)})" if endpoint else " (AWS S3)"


def _missing_bucket(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "nosuchbucket" in text or ("bucket" in text and "not exist" in text)


def _classify(exc: BaseException, object_store: bool) -> str | None:
    """'timeout', 'unreachable', 'credentials', 'client' (another refusal by S3) or None."""
    import sys

    from fsspec.exceptions import FSTimeoutError

    if isinstance(exc, FSTimeoutError):
        return "timeout"

    if "botocore" in sys.modules:  # only S3 raises these; never import botocore for that
        from botocore import exceptions as boto

        if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
            return "credentials"
        if isinstance(exc, boto.ConnectionError | boto.HTTPClientError
                      | boto.ConnectTimeoutError | boto.ReadTimeoutError):
            return "unreachable"
        if isinstance(exc, boto.ClientError):
            return "client"
    if isinstance(exc, ConnectionError | TimeoutError):
        return "unreachable"
    if "aiohttp" in sys.modules:
        import aiohttp

        if isinstance(exc, aiohttp.ClientConnectionError):
            return "unreachable"
    if type(exc) is OSError and object_store:
        return "client"  # s3fs's plain OSError for an S3 error answer it has no type for
    return None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}"[:300])


class OutsideLake(TrainpipeError):
    """A name that would reach outside the lake root (`..`, an absolute path)."""

    exit_code = 2

    def __init__(self, where: str, part: str):
        super().__init__(f"{redact_uri(where)}: {part!r} would reach outside the lake root")


def _inside_output(path: str, name: str) -> bool:
    """A manifest entry's path is `<attempt>/<name>`: one plain folder, then the file."""
    attempt, _, file = path.partition("/")
    plain = all(p and p not in (".", "..") and "/" not in p and "\\" not in p
                for p in (attempt, file))
    return plain and file == name


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

    @property
    def size(self) -> int:
        return len(self.data)

    def describe(self) -> dict:
        """What a record of it needs (not the bytes)."""
        return {"url": self.url, "digest": self.digest, "bytes": self.size,
                "format": self.format}


def read_source(url: str) -> Source:
    """Read a CSV or Parquet file from any fsspec URL; a clear SourceError otherwise."""
    with _reading(url):
        fs, path = _url_to_fs(url)
        if isinstance(fs, _Bounded):  # an object store: one bounded call
            data = fs.cat_file(path, nbytes=fs.info(path).get("size") or 0)
        else:
            with fs.open(path, "rb") as f:
                data = f.read()
    return Source(url, data, digest(data), _detect_format(url, data))


@contextmanager
def _reading(url: str) -> Iterator[None]:
    """What reading a source can fail with, in words (SourceError)."""
    try:
        with storage_errors(url, "read it"):
            yield
    except TrainpipeError:
        raise
    except FileNotFoundError:
        raise SourceError(f"{redact_uri(absolute(url))}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{redact_uri(absolute(url))}: is a folder, not a CSV or Parquet "
                          "file (compute=dask reads a folder or glob of parts)") from None
    except Exception as exc:  # permissions, network, unknown protocol, ...
        raise SourceError(f"{redact_uri(url)}: cannot be read ({type(exc).__name__}: "
                          f"{redact_uri(str(exc))})") from None


BLOCK = 8 * 2**20  # bytes read or copied at a time when a file is streamed


@dataclass(frozen=True)
class LocalFile:
    """A source as a file on this machine, with the identity of its bytes (as Source has),
    for files too large to hold in memory."""

    url: str
    path: str  # the local file to read
    digest: str
    size: int
    format: str  # "csv" or "parquet"

    def describe(self) -> dict:
        """What a record of it needs."""
        return {"url": self.url, "digest": self.digest, "bytes": self.size,
                "format": self.format}


@contextmanager
def local_file(url: str) -> Iterator[LocalFile]:
    """A CSV or Parquet file at any fsspec URL as a local file, with its sha256, read block
    by block: a local file is read where it is, any other is downloaded to a temporary file
    that goes when the block ends. A clear SourceError as from `read_source`."""
    folder = None
    try:
        with _reading(url):
            fs, path = _url_to_fs(url)
            if "file" not in _protocols(fs):
                folder = tempfile.mkdtemp(prefix="trainpipe-")
            target = path if folder is None else os.path.join(folder, posixpath.basename(path))
            if folder is not None:  # downloaded in one bounded call, then read here
                fs.get_file(path, target, nbytes=fs.info(path).get("size") or 0)
            sha, size, head = hashlib.sha256(), 0, b""
            with open(target, "rb") as src:
                while block := src.read(BLOCK):
                    sha.update(block)
                    size += len(block)
                    head = head or block[:4096]
        yield LocalFile(url, target, sha.hexdigest(), size, _detect_format(url, head))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staged_file(url: str) -> Iterator[str]:
    """A local path to write one file to, published at `url` (any fsspec URL) when the block
    ends: renamed into place in a local folder, uploaded to an object store (where an object
    appears whole or not at all). When the block fails, nothing appears at `url`."""
    with storage_errors(url, "write it"):
        fs, path = _url_to_fs(url)
        local = "file" in _protocols(fs)
        if local and fs.isdir(path):
            raise SourceError(f"{redact_uri(absolute(url))}: is a folder; name a file")
        if local:  # beside the target: the rename is atomic, no copy
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
    folder = None if local else tempfile.mkdtemp(prefix="trainpipe-")
    name = posixpath.basename(path)
    tmp = (posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{name}") if local
           else os.path.join(folder, name))
    try:
        yield tmp
        with storage_errors(url, "write it"):
            if local:
                os.replace(tmp, path)
            else:
                fs.put_file(tmp, path)
    finally:
        with suppress(OSError):
            os.remove(tmp)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _detect_format(url: str, data: bytes) -> str:
    if data[:4] == b"PAR1":
        return "parquet"
    name = url.lower().rsplit("?", 1)[0]
    if name.endswith((".parquet", ".pq")):
        raise SourceError(f"{redact_uri(url)}: named like Parquet but is not a Parquet file")
    markup = {b"{": "JSON", b"[": "JSON", b"<": "XML or HTML"}.get(
        data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1])  # no CSV header starts like these
    if markup:
        raise SourceError(f"{redact_uri(url)}: neither CSV nor Parquet (it looks like {markup})")
    if name.endswith((".csv", ".txt", ".tsv")) or b"\0" not in data[:4096]:
        return "csv"
    raise SourceError(f"{redact_uri(url)}: neither CSV nor Parquet")


def absolute(url: str) -> str:
    """Local paths made absolute (so records say where the data really was); URLs as is."""
    if "://" in url:
        return url
    return os.path.abspath(url)


def exists(url: str) -> bool:
    with storage_errors(url, "check whether it exists"):
        fs, path = _url_to_fs(url)
        return fs.exists(path)


def write_file(url: str, data: bytes) -> None:
    """Write one file whole or not at all (temporary name, then move)."""
    with storage_errors(url, "write it"):
        fs, path = _url_to_fs(url)
        _write_atomic(fs, path, data)


def _write_atomic(fs, path: str, data: bytes) -> None:
    if set(_protocols(fs)) & set(OBJECT_STORES):
        # An object store's PUT is atomic: the object appears whole or not at all, and a
        # copy-then-delete "move" would only double the traffic.
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        with suppress(Exception):  # best effort: the original error is the one to report
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class Lake:
    """A lake root (`./lake`, `s3://bucket/lake`) and the published outputs under it.

    An output lives under a prefix (`landing/hotel_bookings/split/<fingerprint>`). Each
    publish writes its files into a fresh attempt folder under it, then the manifest,
    which names the attempt: two writers racing on one prefix each write their own
    files, and whichever manifest lands last is complete and consistent.
    """

    def __init__(self, root: str):
        self.root = absolute(root).rstrip("/")
        with storage_errors(self.root, "open the lake"):
            self.fs, self._root_path = _url_to_fs(self.root)
        if "://" not in self.root and os.path.exists(self.root) and not os.path.isdir(
                self.root):
            raise ConfigError(f"lake.root {self.root}: is a file, not a folder")

    def url(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _path(self, *parts: str) -> str:
        """The storage path of a key under the root; never outside it (a '..' or an
        absolute part in a name from config or a manifest is refused)."""
        path = posixpath.join(self._root_path, *parts)
        root = self._root_path.rstrip("/")
        inside = posixpath.normpath(path) == root or path.startswith(root + "/")
        for part in parts:
            if ".." in part.split("/") or "\0" in part or not inside:
                raise OutsideLake(self.url(*parts), part)
        return path

    def publish(self, prefix: str, files: dict[str, bytes],
                staged: tuple[str, dict[str, dict]] | None = None, **meta: Any) -> dict:
        """Publish `files` under `prefix` as one output; the manifest goes last. `staged`:
        (attempt, entries) of files already written into an attempt folder (by Dask
        workers), published with them."""
        attempt, entries = staged or (new_attempt(), {})
        entries = dict(entries)
        with storage_errors(self.url(prefix), "publish there"):
            for name, data in files.items():
                _write_atomic(self.fs, self._path(prefix, attempt, name), data)
                entries[name] = {"path": f"{attempt}/{name}", "sha256": digest(data),
                                 "bytes": len(data)}
            # microseconds: `clean` orders outputs by this, and runs can finish in one second
            created = datetime.now(UTC).isoformat(timespec="microseconds")
            manifest = {"files": entries, "created": created, **meta}
            _write_atomic(self.fs, self._path(prefix, MANIFEST),
                          json.dumps(manifest, indent=2).encode())
        return manifest

    def manifest(self, prefix: str) -> dict | None:
        """The manifest of the output under `prefix`; None when there is none. DamagedOutput
        when it is not a manifest: not JSON, no `files`, a file named outside its folder."""
        try:
            with storage_errors(self.url(prefix, MANIFEST), "read it"):
                data = self.fs.cat_file(self._path(prefix, MANIFEST))
        except FileNotFoundError:
            return None
        where = self.url(prefix, MANIFEST)
        try:
            manifest = json.loads(data)
        except ValueError as exc:
            raise DamagedOutput(where, f"not JSON ({exc})") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise DamagedOutput(where, "it has no `files` mapping")
        for name, entry in files.items():
            path = entry.get("path") if isinstance(entry, dict) else None
            if not (isinstance(path, str) and isinstance(entry.get("sha256"), str)
                    and _inside_output(path, name)):
                raise DamagedOutput(where, f"the entry for {name!r} does not name a file of "
                                    "this output with its digest")
        return manifest

    def read(self, prefix: str, name: str, manifest: dict | None = None) -> bytes:
        """A published file, checked against its manifest digest; SourceError when its output
        was never (fully) published, DamagedOutput when the bytes are not what was published."""
        manifest = manifest or self.manifest(prefix)
        if manifest is None or name not in manifest["files"]:
            raise SourceError(f"{redact_uri(self.url(prefix))}: not published yet "
                              "(run the steps before this one first)")
        entry = manifest["files"][name]
        try:
            with storage_errors(self.url(prefix, entry["path"]), "read it"):
                data = self.fs.cat_file(self._path(prefix, entry["path"]))
        except FileNotFoundError:
            raise DamagedOutput(self.url(prefix), f"{name} is missing") from None
        if digest(data) != entry["sha256"]:
            raise DamagedOutput(self.url(prefix), f"{name} is not the file that was published "
                                f"({len(data):,} bytes, sha256 {digest(data)[:12]}; the "
                                f"manifest says {entry['sha256'][:12]})")
        return data

    def read_parquet(self, prefix: str, name: str, manifest: dict | None = None):
        return pd.read_parquet(io.BytesIO(self.read(prefix, name, manifest)))

    def outputs(self, prefix: str) -> list[tuple[str, dict | None]]:
        """(sub-prefix, manifest or None) for each output folder directly under `prefix`."""
        try:
            with storage_errors(self.url(prefix), "list it"):
                entries = self.fs.ls(self._path(prefix), detail=True)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            sub = posixpath.join(prefix, posixpath.basename(entry["name"].rstrip("/")))
            if entry.get("type") == "directory":
                found.append((sub, self.manifest(sub)))
        return found

    def remove(self, prefix: str) -> None:
        """Retract an output: the manifest first (readers stop trusting it), then the rest."""
        manifest = self._path(prefix, MANIFEST)
        with storage_errors(self.url(prefix), "remove it"):
            if self.fs.exists(manifest):
                self.fs.rm(manifest)
            if self.fs.exists(self._path(prefix)):
                self.fs.rm(self._path(prefix), recursive=True)


# --- compute=dask: sources of many parts, outputs written part by part by workers --------

SOURCE_DIGESTS = ".trainpipe/source-digests"  # under the lake root: see PartedSource
SUFFIXES = {".csv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class PartedSource:
    """A source read by Dask workers, never here: one file, or a folder or glob of CSV or
    Parquet parts. Its digest is the sha256 of its files' names and sha256s.

    What it trusts: a file whose size and stamp (S3's ETag, a local file's modification
    time in nanoseconds) match the lake's record (`<root>/.trainpipe/source-digests/`) keeps
    the sha256 recorded for it; any other file is hashed again here, as `local_file` reads
    it (block by block; a file on S3 is downloaded to a temporary file first). A changed
    byte changes the stamp, so it is seen without reading the unchanged gigabytes; a file
    rewritten with the same size and a forged modification time is not.
    """

    url: str
    files: tuple[dict, ...]  # {"url", "bytes", "stamp", "sha256"}, in name order
    digest: str
    format: str  # "csv" or "parquet"

    @property
    def size(self) -> int:
        return sum(f["bytes"] for f in self.files)

    def describe(self) -> dict:
        return {"url": self.url, "digest": self.digest, "bytes": self.size,
                "format": self.format, "files": len(self.files)}


def list_source(url: str, root: str) -> PartedSource:
    """The files of a source for Dask, with their sha256 (recorded under the lake `root`)."""
    with _reading(url):
        fs, path = _url_to_fs(url)
        if any(c in path for c in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if not posixpath.basename(p).startswith((".", "_"))]
        else:
            paths = [path]
        paths = sorted(p for p in paths if posixpath.splitext(p)[1].lower() in SUFFIXES)
        if not paths:
            raise SourceError(f"{redact_uri(absolute(url))}: no CSV or Parquet files there")
        infos = [fs.info(p) for p in paths]
    formats = {SUFFIXES[posixpath.splitext(p)[1].lower()] for p in paths}
    if len(formats) > 1:
        raise SourceError(f"{redact_uri(absolute(url))}: mixes CSV and Parquet files; a "
                          "source is one or the other")
    protocol = _protocols(fs)[0]
    urls = [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths]
    known = _source_digests(root, url)
    files = []
    for file_url, path, info in zip(urls, paths, infos, strict=True):
        stamp = str(info.get("ETag") or info.get("etag") or _mtime_ns(path, info))
        entry = {"url": file_url, "bytes": int(info.get("size") or 0), "stamp": stamp}
        old = known.get(file_url, {})
        files.append(entry | {"sha256": old["sha256"]} if (
            old.get("bytes"), old.get("stamp")) == (entry["bytes"], stamp) else entry)
    _hash_missing(files)
    if any(known.get(f["url"]) != f for f in files):
        _save_source_digests(root, url, files)
    identity = json.dumps([(posixpath.relpath(f["url"], urls[0].rsplit("/", 1)[0]),
                            f["sha256"]) for f in files]).encode()
    return PartedSource(url, tuple(files), digest(identity), formats.pop())


def _mtime_ns(path: str, info: dict) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return int(float(info.get("mtime") or info.get("LastModified", 0) or 0) * 1e9)


def _hash_missing(files: list[dict]) -> None:
    """sha256 of the files without a trusted one, several at a time (local_file's)."""
    from concurrent.futures import ThreadPoolExecutor

    def sha(url: str) -> str:
        with local_file(url) as file:
            return file.digest

    todo = [f for f in files if "sha256" not in f]
    with ThreadPoolExecutor(4) as pool:
        for file, value in zip(todo, pool.map(sha, [f["url"] for f in todo]), strict=True):
            file["sha256"] = value


def _digests_key(url: str) -> str:
    return posixpath.join(SOURCE_DIGESTS, digest(absolute(url).encode())[:24] + ".json")


def _source_digests(root: str, url: str) -> dict[str, dict]:
    try:
        the_lake = Lake(root)
        data = the_lake.fs.cat_file(the_lake._path(_digests_key(url)))
        return {f["url"]: f for f in json.loads(data)["files"]}
    except Exception:  # noqa: BLE001 - no record (or an unreadable one): hash every file
        return {}


def _save_source_digests(root: str, url: str, files: list[dict]) -> None:
    the_lake = Lake(root)
    with storage_errors(the_lake.url(_digests_key(url)), "record the source's digests"):
        _write_atomic(the_lake.fs, the_lake._path(_digests_key(url)),
                      json.dumps({"source": redact_uri(url), "files": files}).encode())


def part_name(table: str, number: int) -> str:
    """`train.parquet`'s part 3 is `train.part00003.parquet`."""
    stem = table.removesuffix(".parquet")
    return f"{stem}.part{number:05d}.parquet"


def parts_of(table: str, manifest: dict) -> list[str]:
    """The names of a table's parts in a manifest, in order ([] when it is one file)."""
    stem = table.removesuffix(".parquet") + ".part"
    return sorted(n for n in manifest["files"] if n.startswith(stem) and n.endswith(".parquet")
                  and n[len(stem):-len(".parquet")].isdigit())


def new_attempt() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def write_part(root: str, prefix: str, attempt: str, name: str, df: pd.DataFrame) -> dict:
    """One part of a table, written by a worker into an output's attempt folder (published
    later with the others by the manifest). Returns its manifest entry."""
    the_lake = _lake(root)
    data = to_parquet_bytes(df)
    with storage_errors(the_lake.url(prefix), "publish there"):
        _write_atomic(the_lake.fs, the_lake._path(prefix, attempt, name), data)
    return {"path": f"{attempt}/{name}", "sha256": digest(data), "bytes": len(data),
            "rows": len(df)}


def read_part(root: str, prefix: str, name: str, entry: dict) -> pd.DataFrame:
    """One published part, read by a worker and checked against its manifest digest."""
    data = _lake(root).read(prefix, name, {"files": {name: entry}})
    return pd.read_parquet(io.BytesIO(data))


_lakes: dict[str, Lake] = {}


def _lake(root: str) -> Lake:
    """One Lake per root in a worker process (each opens its filesystem once)."""
    if root not in _lakes:
        _lakes[root] = Lake(root)
    return _lakes[root]
