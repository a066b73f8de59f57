"""train: fit the estimator named by the `model` config on the transformed training split.

The output is the whole inference pipeline (features + estimator), so the logged model
predicts on raw rows exactly as training saw them.
"""

from __future__ import annotations

import contextlib
import io
import re

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from trainpipe import cluster
from trainpipe.catalog import MlflowModel
from trainpipe.errors import ClusterError, ConfigError
from trainpipe.steps import Report

ZONE = "models"
# The model lives in the tracking store; `example` (rows as the model takes them) is its
# input example there and is not stored in the lake.
OUTPUTS = {"model": MlflowModel(example="example"), "example": None}

EXAMPLE_ROWS = 5
# compute=dask, a scikit-learn model whose training split is too big to collect
USE_LIGHTGBM = ("Use model=lightgbm (it trains on the Dask workers), or raise "
                "compute.collect_limit if this machine has the memory")


def estimator_class(target: str) -> type:
    """The class `model._target_` names (`package.module.Class`). Not hydra.utils.get_class:
    importing Hydra costs every run 0.2 s that the cached config saved."""
    import importlib

    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model._target_: cannot import {target!r} ({exc})") from None
    if not isinstance(cls, type):
        raise ConfigError(f"model._target_: {target!r} is not a class (package.module.Class)")
    return cls


def build_estimator(model_cfg: DictConfig):
    cls = estimator_class(model_cfg._target_)
    params = OmegaConf.to_container(model_cfg.get("params") or {}, resolve=True)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:
            import inspect

            from trainpipe.config import did_you_mean

            takes = set(inspect.signature(cls).parameters) - {"kwargs"}
            raise ConfigError(f"model.params.{unknown[1]}: {cls.__name__} takes no such "
                              f"parameter{did_you_mean(unknown[1], takes)}") from None
        raise ConfigError(f"model.params: {exc}") from None


def check(cfg: DictConfig, sources: dict | None = None) -> None:
    """Before any step runs: the estimator can be made from `model.params`, and takes them.
    scikit-learn's own estimators check their declared constraints; others (LightGBM) only
    say what they refuse when they fit, so they fit a tiny table here."""
    if sources and cluster.enabled(cfg):
        check_collectable(cfg, sources)
    estimator = build_estimator(cfg.model)
    try:
        if hasattr(estimator, "_parameter_constraints"):
            estimator._validate_params()
        else:
            _tiny_fit(estimator, cfg.dataset.task)
    except Exception as exc:  # noqa: BLE001 - whatever the estimator refuses, in its words
        message = " ".join(str(exc).split()) or type(exc).__name__
        message = re.sub(r" at /\S+, line \d+ ?\.?", "", message)  # LightGBM's source line
        raise ConfigError(f"model.params: {cfg.model._target_} refuses them: {message}"
                          ) from None


def _tiny_fit(estimator, task: str) -> None:
    import numpy as np
    from sklearn.base import clone

    rng = np.random.default_rng(0)
    x = rng.random((40, 3))
    y = rng.random(40) if task == "regression" else np.arange(40) % (3 if task == "multiclass"
                                                                     else 2)
    # LightGBM prints its refusals ("[LightGBM] [Fatal] ...") besides raising them
    with contextlib.redirect_stderr(io.StringIO()), _quiet_native_stderr():
        clone(estimator).fit(x, y)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 for a moment."""
    import os

    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run(cfg: DictConfig, splits: dict[str, pd.DataFrame], transformer,
        features: dict[str, pd.DataFrame]) -> tuple[dict, Report]:
    from sklearn.pipeline import Pipeline

    target = cfg.dataset.target
    estimator = build_estimator(cfg.model)
    train = features["train"]
    if cluster.is_dask(train) and trains_on_dask(cfg):
        estimator, on = _fit_on_dask(cfg, train), f"{train.npartitions} partitions"
    else:
        if cluster.is_dask(train):  # checked before any step ran; measured again here
            train = cluster.collect(
                train, cfg.compute.collect_limit,
                f"model={cfg.model.name}: {cfg.model._target_} cannot train out of core and "
                "the training split it must collect is", USE_LIGHTGBM)
        estimator.fit(train.drop(columns=[target]), train[target])
        on = f"{len(train):,} rows"
    model = Pipeline([*transformer.steps, ("model", estimator)])
    example = splits["train"].head(EXAMPLE_ROWS)[list(transformer.feature_names_in_)]
    params = {"model": cfg.model.name, "estimator": cfg.model._target_,
              **OmegaConf.to_container(cfg.model.get("params") or {}, resolve=True)}
    return {"model": model, "example": example}, Report(
        summary=f"{type(estimator).__name__} on {on}", params=params)


def trains_on_dask(cfg: DictConfig) -> bool:
    """LightGBM trains on Dask partitions (lightgbm.dask); scikit-learn models cannot."""
    return str(cfg.model._target_).startswith("lightgbm.")


def _fit_on_dask(cfg: DictConfig, train):
    """lightgbm.dask's estimator fitted on the workers' partitions; the model kept is its
    local equivalent (LGBMClassifier / LGBMRegressor), which predicts on pandas."""
    import lightgbm.dask as lgb_dask
    from lightgbm.basic import LightGBMError

    target = cfg.dataset.target
    params = OmegaConf.to_container(cfg.model.get("params") or {}, resolve=True)
    # minutes a worker waits for one that stopped answering (LightGBM's default: 120)
    params = {"time_out": 10, **params}
    features, labels, client = cluster.spread(train, target)
    name = str(cfg.model._target_).rsplit(".", 1)[1]  # LGBMClassifier -> DaskLGBMClassifier
    estimator = getattr(lgb_dask, f"Dask{name}")(client=client, **params)
    _quiet_lightgbm()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # "Found ... in params" warnings
            estimator.fit(features, labels,
                          feature_name=[str(c) for c in train.columns if c != target])
    except LightGBMError as exc:
        raise ClusterError(
            f"LightGBM's training on the Dask workers stopped: {exc}"
            + (". A worker it trained on stopped answering: it was killed, or restarted by "
               "its nanny for going over its memory limit (compute.memory_limit, or dask "
               f"worker --memory-limit). {cluster.RESUMES}" if _network_failure(exc)
               else "")) from None
    return estimator.to_local()


def _quiet_lightgbm() -> None:
    """lightgbm.dask's info lines here ("Finding random open ports") go to a logger that
    keeps only warnings. (A LocalCluster's workers print nothing: cluster._quiet_workers.)"""
    import logging

    import lightgbm

    logger = logging.getLogger("lightgbm")
    logger.setLevel(logging.WARNING)
    lightgbm.register_logger(logger)


def _network_failure(exc: Exception) -> bool:
    return bool(re.search(r"socket|connect|network|timed? ?out", str(exc), re.IGNORECASE))


def check_collectable(cfg: DictConfig, sources: dict) -> None:
    """compute=dask with a scikit-learn model: it trains on the collected training split,
    so that split must fit in compute.collect_limit. Estimated from the source's size
    before any work."""
    from dask.utils import format_bytes, parse_bytes

    source = sources["train"]
    if trains_on_dask(cfg) or not hasattr(source, "files"):
        return
    share = 1 - float(cfg.split.val_size) - float(cfg.split.test_size)
    # bytes in memory a byte of source, measured on the hotel data: CSV 2, Parquet 5
    estimate = source.size * (5 if source.format == "parquet" else 2) * share
    limit = parse_bytes(cfg.compute.collect_limit)
    if estimate > limit:
        raise ConfigError(
            f"model={cfg.model.name}: {cfg.model._target_} cannot train out of core; with "
            f"compute=dask it trains on the collected training split, about "
            f"{format_bytes(int(estimate))} here, over compute.collect_limit="
            f"{cfg.compute.collect_limit}. {USE_LIGHTGBM}")
