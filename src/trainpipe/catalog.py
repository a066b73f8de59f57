"""Where each step's inputs and outputs live: data in the lake, models in MLflow.

Steps exchange values in memory during a run; the catalog publishes them as they
are made and loads them back when a step runs alone (`trainpipe step NAME`).
"""

import io
import json
import pickle

from omegaconf import DictConfig

from trainpipe.lake import Lake, to_parquet_bytes
from trainpipe.steps import ingest
from trainpipe.steps.split import SPLITS
from trainpipe.tracking import Tracking


class Catalog:
    def __init__(self, cfg: DictConfig, lake: Lake, tracking: Tracking):
        self.cfg, self.lake, self.tracking = cfg, lake, tracking
        name = cfg.dataset.name
        self.prefix = {  # output set -> lake prefix
            "validated": f"landing/{name}/validated",
            "splits": f"landing/{name}/splits",
            "features": f"features/{name}",
            "model": f"models/{name}",
        }

    def save(self, outputs: dict, run_id: str, parent_run_id: str) -> dict[str, str]:
        """Publish a step's outputs; returns tags for the parent run (e.g. the model URI)."""
        ds = self.cfg.dataset
        if "raw" in outputs:  # the raw zone is read-only: record the data, write nothing
            for key, context in (("raw", "training"), ("raw_scoring", "scoring")):
                table = outputs[key]
                if table is not None:
                    self.tracking.log_dataset([parent_run_id, run_id], table.df, name=ds.name,
                                              source=table.source, digest=table.digest,
                                              target=ds.target, context=context)
        if "validated" in outputs:
            files = {"train.parquet": to_parquet_bytes(outputs["validated"])}
            if outputs.get("scoring") is not None:
                files["scoring.parquet"] = to_parquet_bytes(outputs["scoring"])
            self.lake.publish(self.prefix["validated"], files, run_id=run_id)
        if "splits" in outputs:
            self.lake.publish(self.prefix["splits"], {
                f"{n}.parquet": to_parquet_bytes(df) for n, df in outputs["splits"].items()
            }, run_id=run_id)
        if "features" in outputs:
            files = {f"{n}.parquet": to_parquet_bytes(df) for n, df in outputs["features"].items()}
            files["transformer.pkl"] = pickle.dumps(outputs["transformer"])
            self.lake.publish(self.prefix["features"], files, run_id=run_id)
        if "model" in outputs:
            model_uri = self.tracking.log_model(outputs["model"], outputs["example"],
                                                type(outputs["model"][-1]).__module__)
            pointer = {"model_uri": model_uri, "run_id": run_id}
            self.lake.publish(self.prefix["model"],
                              {"model.json": json.dumps(pointer).encode()}, run_id=run_id)
            return {"trainpipe.model_uri": model_uri}
        return {}

    def load(self, name: str):
        ds = self.cfg.dataset
        if name == "raw":
            return ingest.read_table(ds.source)
        if name == "raw_scoring":
            return ingest.read_table(ds.scoring_source) if ds.get("scoring_source") else None
        if name == "validated":
            return self.lake.read_parquet(self.prefix["validated"], "train.parquet")
        if name == "splits":
            return {n: self.lake.read_parquet(self.prefix["splits"], f"{n}.parquet")
                    for n in SPLITS}
        if name == "features":
            return {n: self.lake.read_parquet(self.prefix["features"], f"{n}.parquet")
                    for n in SPLITS}
        if name == "transformer":
            return pickle.load(io.BytesIO(self.lake.read(self.prefix["features"],
                                                         "transformer.pkl")))
        if name == "model":
            import mlflow.sklearn

            pointer = json.loads(self.lake.read(self.prefix["model"], "model.json"))
            return mlflow.sklearn.load_model(pointer["model_uri"])
        raise KeyError(name)
