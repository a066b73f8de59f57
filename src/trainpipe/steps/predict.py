"""predict: score the scoring data (`dataset.scoring_source`) with the model of this run.

The predictions table has one row per scored row: the id column (when the dataset has
one), `prediction`, one `proba_<class>` column per class for classification, and
`model_version`, the model that made them. `trainpipe predict` (serving.py) scores files
with the same `score` function, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
from omegaconf import DictConfig

from trainpipe.catalog import Table
from trainpipe.errors import ConfigError
from trainpipe.steps import Report
from trainpipe.steps.evaluate import predict as predict_labels

ZONE = "predictions"
OUTPUTS = {"predictions": Table("predictions.parquet")}
CHUNK_ROWS = 100_000  # rows scored at a time: the model's intermediate arrays stay small
PROBA = "proba_"  # + the class label: one column per class


def applies(cfg: DictConfig) -> bool:
    """runs only when dataset.scoring_source is set (the rows to score)"""
    return bool(cfg.dataset.get("scoring_source"))


def run(cfg: DictConfig, model, scoring: pd.DataFrame | None, model_uri: str,
        registration: dict) -> tuple[dict, Report]:
    if scoring is None:  # validate publishes the scoring table whenever scoring_source is set
        raise ConfigError("predict: no scoring data; set dataset.scoring_source")
    # The model that made the predictions, as the registry knows it: models:/<name>/<version>
    model_version = f"models:/{registration['name']}/{registration['version']}"
    chunks = (score(model, rows, cfg.dataset, model_version)
              for rows in _chunks(scoring, CHUNK_ROWS))
    predictions = pd.concat(chunks, ignore_index=True)
    return {"predictions": predictions}, Report(
        summary=f"{len(predictions):,} rows scored",
        params={"model_uri": model_uri}, metrics={"rows_scored": len(predictions)})


def score(model, rows: pd.DataFrame, dataset: DictConfig, model_version: str) -> pd.DataFrame:
    """The predictions for validated rows. The model gets only its own input columns (it
    would ignore the others, and MLflow warns about each one)."""
    x = rows[input_columns(model)]
    labels, proba = predict_labels(model, x, dataset.task)
    out = pd.DataFrame(index=rows.index)
    id_column = dataset.get("id_column")
    if id_column and id_column in rows:
        out[id_column] = rows[id_column]
    out["prediction"] = labels
    if proba is not None:
        for i, label in enumerate(model.classes_):
            out[f"{PROBA}{label}"] = proba[:, i]
    out["model_version"] = model_version
    return out


def input_columns(model) -> list[str]:
    """The raw columns the model reads (the features step fits it on exactly these)."""
    return [str(c) for c in model.feature_names_in_]


def _chunks(df: pd.DataFrame, rows: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(df), rows):
        yield df.iloc[start:start + rows]
