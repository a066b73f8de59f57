"""Where each step's outputs live: data in the lake, models in MLflow.

Every output is published under its step's fingerprint:

    landing/<dataset>/validate/<fp>/   train.parquet, scoring.parquet
    landing/<dataset>/split/<fp>/      train.parquet, val.parquet, test.parquet
    features/<dataset>/features/<fp>/  {train,val,test}.parquet, transformer.pkl
    models/<dataset>/train/<fp>/       model.json (the MLflow model URI)
    models/<dataset>/evaluate/<fp>/    metrics.json

Steps exchange values in memory during a run; the catalog publishes them as they are
made and loads them back for steps that run while their upstream steps were cached.
"""

import io
import json
import pickle

from omegaconf import DictConfig

from trainpipe.lake import Lake, Source, to_parquet_bytes
from trainpipe.steps import ingest
from trainpipe.steps.split import SPLITS
from trainpipe.tracking import Tracking

ZONES = {"validate": "landing", "split": "landing", "features": "features",
         "train": "models", "evaluate": "models"}


def output_base(dataset: str, step: str) -> str:
    """The folder holding every published output of `step`, one sub-folder per fingerprint."""
    return f"{ZONES[step]}/{dataset}/{step}"


class Catalog:
    def __init__(self, cfg: DictConfig, lake: Lake, tracking: Tracking | None,
                 sources: dict[str, Source], fingerprints: dict[str, str]):
        self.cfg, self.lake, self.tracking = cfg, lake, tracking
        self.sources, self.fingerprints = sources, fingerprints

    def prefix(self, step: str) -> str:
        return f"{output_base(self.cfg.dataset.name, step)}/{self.fingerprints[step]}"

    def manifest(self, step: str) -> dict | None:
        return self.lake.manifest(self.prefix(step)) if step in ZONES else None

    def save(self, step: str, outputs: dict, run_id: str) -> dict:
        """Publish a step's outputs; returns the manifest. `manifest["parent"]` holds what
        the pipeline's parent run records from this step (tags, metrics)."""
        if step not in ZONES:  # ingest: the raw zone is read-only, nothing to publish
            return {}
        files: dict[str, bytes] = {}
        parent: dict = {}
        if step == "validate":
            files["train.parquet"] = to_parquet_bytes(outputs["validated"])
            if outputs.get("scoring") is not None:
                files["scoring.parquet"] = to_parquet_bytes(outputs["scoring"])
        elif step == "split":
            files = {f"{n}.parquet": to_parquet_bytes(df) for n, df in outputs["splits"].items()}
        elif step == "features":
            files = {f"{n}.parquet": to_parquet_bytes(df) for n, df in outputs["features"].items()}
            files["transformer.pkl"] = pickle.dumps(outputs["transformer"])
        elif step == "train":
            model = outputs["model"]
            model_uri = self.tracking.log_model(model, outputs["example"],
                                                type(model[-1]).__module__)
            files["model.json"] = json.dumps({"model_uri": model_uri}).encode()
            parent["tags"] = {"trainpipe.model_uri": model_uri}
        elif step == "evaluate":
            metrics = outputs["metrics"]
            files["metrics.json"] = json.dumps(metrics, indent=2).encode()
            parent["metrics"] = {k: v for k, v in metrics.items() if k.startswith("test_")}
        rows = {"rows": len(outputs["validated"])} if step == "validate" else {}
        return self.lake.publish(self.prefix(step), files, run_id=run_id,
                                 fingerprint=self.fingerprints[step], parent=parent, **rows)

    def load(self, name: str):
        """An input for a step that runs while the step producing it was cached."""
        if name in ("raw", "raw_scoring"):
            role = "train" if name == "raw" else "scoring"
            return ingest.to_table(self.sources[role]) if role in self.sources else None
        if name in ("validated", "scoring"):
            prefix = self.prefix("validate")
            manifest = self.lake.manifest(prefix)
            file = "train.parquet" if name == "validated" else "scoring.parquet"
            if name == "scoring" and manifest and file not in manifest["files"]:
                return None
            return self.lake.read_parquet(prefix, file, manifest)
        if name in ("splits", "features"):
            prefix = self.prefix("split" if name == "splits" else "features")
            manifest = self.lake.manifest(prefix)
            return {n: self.lake.read_parquet(prefix, f"{n}.parquet", manifest) for n in SPLITS}
        if name == "transformer":
            data = self.lake.read(self.prefix("features"), "transformer.pkl")
            return pickle.load(io.BytesIO(data))
        if name == "model":
            import mlflow.sklearn

            pointer = json.loads(self.lake.read(self.prefix("train"), "model.json"))
            return mlflow.sklearn.load_model(pointer["model_uri"])
        raise KeyError(name)
