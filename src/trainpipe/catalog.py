"""Where step outputs live, and how each is stored: by declaration, never by step name.

A step module declares its outputs once, beside its code:

    ZONE = "landing"
    OUTPUTS = {"splits": Tables("train", "val", "test")}

and the catalog publishes them under `<zone>/<dataset>/<step>/<fingerprint>/` (see lake.py
for the manifest that makes a set of files one output) and loads them back, every file
checked against its manifest digest. An output that is not declared is not stored: when a
later step needs it while its step was cached, the step's function runs again in memory
(ingest re-reads the raw zone).

Codecs: Table (one DataFrame, Parquet), Tables (several), Pickle, Json, MlflowModel (the
model lives in MLflow; the lake keeps its URI). Json outputs and models may name what the
pipeline's parent run records from them (metrics, tags): read from the verified files, so a
re-run that redoes nothing still reports them without MLflow.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from trainpipe import cluster
from trainpipe.lake import DamagedOutput, Lake, Source, parts_of, to_parquet_bytes

Files = dict[str, bytes]


class Read:
    """A published output's files, each checked against its manifest digest when read."""

    def __init__(self, catalog: Catalog, step: str, manifest: dict):
        self.catalog, self.step, self.manifest = catalog, step, manifest

    def __call__(self, file: str) -> bytes:
        return self.catalog.read(self.step, file, self.manifest)

    def table(self, file: str):
        """A Parquet table: a pandas DataFrame, or a Dask DataFrame over its parts when it
        was published in parts (compute=dask)."""
        if parts_of(file, self.manifest):
            return cluster.read_table(self.catalog.lake.root, self.catalog.prefix(self.step),
                                      self.manifest, file)
        return pd.read_parquet(io.BytesIO(self(file)))


@dataclass
class SaveContext:
    """What a codec may use while publishing: the step's other outputs (a model's input
    example), and a way to log a model to the step's MLflow run."""

    outputs: dict[str, Any]
    log_model: Callable[..., str]


class Codec:
    """How one output is stored: `dump` makes its files, `load` reads them back, `record`
    says what the parent run records from them. `optional`: None is a valid value (no file)."""

    optional: bool = False

    def names(self) -> tuple[str, ...]:
        return (self.file,)

    def tables(self, value) -> dict:
        """Its Parquet tables by file name (a Dask table is written in parts)."""
        return {}

    def dump(self, value, ctx: SaveContext) -> Files:
        raise NotImplementedError

    def load(self, read: Read, cfg: DictConfig | None = None):
        raise NotImplementedError

    def record(self, read: Read) -> tuple[dict[str, str], dict[str, float]]:
        return {}, {}

    def provides(self) -> dict[str, Callable[[Read], Any]]:
        """Other outputs read from the same files (a model's URI): name -> reader."""
        return {}


@dataclass(frozen=True)
class Table(Codec):
    file: str
    optional: bool = False

    def dump(self, value: pd.DataFrame, ctx: SaveContext) -> Files:
        if cluster.is_dask(value):
            return {}  # written in parts already (Catalog.materialize)
        return {self.file: to_parquet_bytes(value)}

    def load(self, read: Read, cfg: DictConfig | None = None) -> pd.DataFrame:
        return read.table(self.file)

    def tables(self, value) -> dict:
        return {self.file: value}


@dataclass(frozen=True)
class Tables(Codec):
    """A dict of DataFrames, one Parquet file each (the train/val/test splits)."""

    keys: tuple[str, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(f"{k}.parquet" for k in self.keys)

    def dump(self, value: dict[str, pd.DataFrame], ctx: SaveContext) -> Files:
        return {f"{k}.parquet": to_parquet_bytes(value[k]) for k in self.keys
                if not cluster.is_dask(value[k])}  # Dask tables: written in parts already

    def load(self, read: Read, cfg: DictConfig | None = None) -> dict[str, pd.DataFrame]:
        return {k: read.table(f"{k}.parquet") for k in self.keys}

    def tables(self, value) -> dict:
        return {f"{k}.parquet": value[k] for k in self.keys}


@dataclass(frozen=True)
class Pickle(Codec):
    file: str

    def dump(self, value, ctx: SaveContext) -> Files:
        return {self.file: pickle.dumps(value)}

    def load(self, read: Read, cfg: DictConfig | None = None):
        return pickle.loads(read(self.file))


@dataclass(frozen=True)
class Json(Codec):
    """A JSON document. `parent="metrics"`: its numbers are the parent run's metrics;
    `parent="tags"`: its `tags` mapping is set on the parent run."""

    file: str
    parent: str | None = None

    def dump(self, value: dict, ctx: SaveContext) -> Files:
        return {self.file: json.dumps(value, indent=2, default=str).encode()}

    def load(self, read: Read, cfg: DictConfig | None = None) -> dict:
        try:
            return json.loads(read(self.file))
        except ValueError as exc:
            raise DamagedOutput(self.file, f"not JSON ({exc})") from None

    def record(self, read: Read) -> tuple[dict[str, str], dict[str, float]]:
        if self.parent == "metrics":
            return {}, {k: float(v) for k, v in self.load(read).items()}
        if self.parent == "tags":
            return {k: str(v) for k, v in self.load(read).get("tags", {}).items()}, {}
        return {}, {}


@dataclass(frozen=True)
class MlflowModel(Codec):
    """A model logged to the step's MLflow run; the lake keeps `model.json` (its URI).
    `example` names the step's output that is the model's input example; the URI is also
    an output of its own, `uri` (steps that need the model's name, not the model)."""

    example: str
    uri_output: str = "model_uri"
    file: str = "model.json"

    def dump(self, value, ctx: SaveContext) -> Files:
        uri = ctx.log_model(value, ctx.outputs[self.example])
        ctx.outputs[self.uri_output] = uri
        return {self.file: json.dumps({"model_uri": uri}).encode()}

    def provides(self) -> dict[str, Callable[[Read], Any]]:
        return {self.uri_output: self.uri}

    def load(self, read: Read, cfg: DictConfig | None = None):
        """The model, from the tracking store it was logged to (cfg's tracking.uri)."""
        import mlflow.sklearn

        from trainpipe.config import tracking_uri

        if cfg is not None:
            mlflow.set_tracking_uri(tracking_uri(cfg))
        return mlflow.sklearn.load_model(self.uri(read))

    def uri(self, read: Read) -> str:
        try:
            return str(json.loads(read(self.file))["model_uri"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DamagedOutput(self.file, f"no model URI in it ({exc!r})") from None

    def record(self, read: Read) -> tuple[dict[str, str], dict[str, float]]:
        return {"trainpipe.model_uri": self.uri(read)}, {}


def output_base(dataset: str, step: str, zone: str) -> str:
    """The folder holding every published output of `step`, one sub-folder per fingerprint."""
    return f"{zone}/{dataset}/{step}"


def stored(module) -> dict[str, Codec]:
    """A step module's stored outputs: name -> codec ({} for a step that stores nothing)."""
    return {name: codec for name, codec in module.OUTPUTS.items() if codec is not None}


def outputs(module) -> tuple[str, ...]:
    """Every output name of a step: declared ones and those its codecs provide."""
    provided = [n for codec in stored(module).values() for n in codec.provides()]
    return (*module.OUTPUTS, *provided)


class Catalog:
    """The outputs of one config's steps. `steps` maps a step name to its module (which
    declares ZONE and OUTPUTS), `fingerprints` a step name to its fingerprint."""

    def __init__(self, cfg: DictConfig, lake: Lake, sources: dict[str, Source],
                 fingerprints: dict[str, str], steps: dict[str, Any]):
        self.cfg, self.lake, self.sources = cfg, lake, sources
        self.fingerprints, self.steps = fingerprints, steps
        self.producer = {out: name for name, module in steps.items() for out in outputs(module)}
        self._verified: dict[tuple[str, str], bytes] = {}  # (step, file) -> checked bytes
        self._staged: dict[str, tuple[str, dict]] = {}  # step -> parts written, unpublished

    def materialize(self, step: str, outputs: dict[str, Any]) -> dict[str, Any]:
        """compute=dask: a step's Dask tables are computed now, each partition written as a
        Parquet part by the worker that made it (published later, with the manifest); the
        next steps read them from those parts instead of computing them again."""
        tables = {file: frame for name, codec in stored(self.steps[step]).items()
                  if outputs.get(name) is not None
                  for file, frame in codec.tables(outputs[name]).items() if cluster.is_dask(frame)}
        if not tables:
            return outputs
        attempt, entries = cluster.write_tables(self.lake.root, self.prefix(step), tables)
        self._staged[step] = (attempt, entries)
        read = Read(self, step, {"files": entries})
        done = dict(outputs)
        for name, codec in stored(self.steps[step]).items():
            value = outputs.get(name)
            if value is not None and any(map(cluster.is_dask, codec.tables(value).values())):
                done[name] = codec.load(read)
        return done

    def publishes(self, step: str) -> bool:
        return bool(stored(self.steps[step]))

    def prefix(self, step: str) -> str:
        base = output_base(self.cfg.dataset.name, step, self.steps[step].ZONE)
        return f"{base}/{self.fingerprints[step]}"

    def url(self, step: str) -> str:
        return self.lake.url(self.prefix(step))

    def manifest(self, step: str) -> dict | None:
        """The manifest of the step's published output, None when there is none; a damaged
        one (not JSON, a declared file missing, a name outside its folder) raises
        DamagedOutput."""
        if not self.publishes(step):
            return None
        manifest = self.lake.manifest(self.prefix(step))
        if manifest is not None:
            for name, codec in stored(self.steps[step]).items():
                missing = {n for n in codec.names()
                           if n not in manifest["files"] and not parts_of(n, manifest)}
                if missing and not (codec.optional and missing == set(codec.names())):
                    raise DamagedOutput(self.url(step), f"the manifest lacks {sorted(missing)} "
                                        f"(output {name!r})")
        return manifest

    def save(self, step: str, outputs: dict[str, Any], log_model: Callable[..., str],
             **runs: str | None) -> dict:
        """Publish a step's stored outputs; returns the manifest ({} when it stores none)."""
        codecs = stored(self.steps[step])
        if not codecs:
            return {}
        ctx = SaveContext(outputs, log_model)
        files: Files = {}
        for name, codec in codecs.items():
            if outputs.get(name) is None and codec.optional:
                continue
            files |= codec.dump(outputs[name], ctx)
        manifest = self.lake.publish(self.prefix(step), files, self._staged.pop(step, None),
                                     fingerprint=self.fingerprints[step], **runs)
        self._verified |= {(step, name): data for name, data in files.items()}
        return manifest

    def load(self, name: str, compute: Callable[[str], dict[str, Any]]):
        """An output of a step that did not run in this process. What is stored is read
        (and checked); what is not is made again by `compute(step)` (ingest: re-read)."""
        step, codec = self.producer[name], self.codec(name)
        if codec is None:
            return compute(step)[name]
        manifest = self.manifest(step)
        if manifest is None:
            raise DamagedOutput(self.url(step), "it is not published")
        if codec.optional and not set(codec.names()) & set(manifest["files"]):
            return None
        read = Read(self, step, manifest)
        if name in codec.provides():
            return codec.provides()[name](read)
        return codec.load(read, self.cfg)

    def codec(self, name: str) -> Codec | None:
        """The codec that stores an output (or provides it from its files); None for an
        output that is not stored."""
        codecs = stored(self.steps[self.producer[name]])
        return codecs.get(name) or next((c for c in codecs.values() if name in c.provides()),
                                        None)

    def read(self, step: str, file: str, manifest: dict) -> bytes:
        """A published file's bytes, checked against the manifest's digest (once a run)."""
        key = (step, file)
        if key not in self._verified:
            self._verified[key] = self.lake.read(self.prefix(step), file, manifest)
        return self._verified[key]

    def record(self, step: str, manifest: dict) -> tuple[dict[str, str], dict[str, float]]:
        """What the parent run records from a step's output (tags, metrics), from its
        checked files."""
        tags: dict[str, str] = {}
        metrics: dict[str, float] = {}
        for codec in stored(self.steps[step]).values():
            if set(codec.names()) <= set(manifest["files"]):
                more_tags, more_metrics = codec.record(Read(self, step, manifest))
                tags |= more_tags
                metrics |= more_metrics
        return tags, metrics
