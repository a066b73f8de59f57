"""train: fit the estimator named by the `model` config on the transformed training split.

The output is the whole inference pipeline (features + estimator), so the logged model
predicts on raw rows exactly as training saw them.
"""

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from trainpipe.catalog import MlflowModel
from trainpipe.errors import ConfigError
from trainpipe.steps import Report

ZONE = "models"
# The model lives in the tracking store; `example` (rows as the model takes them) is its
# input example there and is not stored in the lake.
OUTPUTS = {"model": MlflowModel(example="example"), "example": None}

EXAMPLE_ROWS = 5


def build_estimator(model_cfg: DictConfig):
    from hydra.utils import get_class

    try:
        cls = get_class(model_cfg._target_)
    except Exception as exc:
        raise ConfigError(f"model._target_: cannot import {model_cfg._target_!r} ({exc})") from None
    params = OmegaConf.to_container(model_cfg.get("params") or {}, resolve=True)
    try:
        estimator = cls(**params)
        # scikit-learn checks types and ranges only in fit; check them before the work
        # (estimators that declare their constraints: scikit-learn's own, not LightGBM's)
        if hasattr(estimator, "_parameter_constraints"):
            estimator._validate_params()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.params: {exc}") from None
    return estimator


def run(cfg: DictConfig, splits: dict[str, pd.DataFrame], transformer,
        features: dict[str, pd.DataFrame]) -> tuple[dict, Report]:
    from sklearn.pipeline import Pipeline

    target = cfg.dataset.target
    estimator = build_estimator(cfg.model)
    train = features["train"]
    estimator.fit(train.drop(columns=[target]), train[target])
    model = Pipeline([*transformer.steps, ("model", estimator)])
    example = splits["train"].head(EXAMPLE_ROWS)[list(transformer.feature_names_in_)]
    params = {"model": cfg.model.name, "estimator": cfg.model._target_,
              **OmegaConf.to_container(cfg.model.get("params") or {}, resolve=True)}
    return {"model": model, "example": example}, Report(
        summary=f"{type(estimator).__name__} on {len(train):,} rows", params=params)
