"""split: a seeded train/validation/test split, stratified for classification."""

import pandas as pd
from omegaconf import DictConfig

from trainpipe.catalog import Tables
from trainpipe.steps import Report

SPLITS = ("train", "val", "test")
ZONE = "landing"
OUTPUTS = {"splits": Tables(SPLITS)}


def run(cfg: DictConfig, validated: pd.DataFrame) -> tuple[dict, Report]:
    from sklearn.model_selection import train_test_split

    val_size, test_size = float(cfg.split.val_size), float(cfg.split.test_size)
    target = cfg.dataset.target
    classify = cfg.dataset.task != "regression"
    rest, test = train_test_split(validated, test_size=test_size, random_state=cfg.seed,
                                  stratify=validated[target] if classify else None)
    train, val = train_test_split(rest, test_size=val_size / (1 - test_size),
                                  random_state=cfg.seed,
                                  stratify=rest[target] if classify else None)
    splits = {"train": train, "val": val, "test": test}
    sizes = {f"rows_{name}": len(df) for name, df in splits.items()}
    return {"splits": splits}, Report(
        summary=" / ".join(f"{n} {len(df):,}" for n, df in splits.items()),
        params={"val_size": val_size, "test_size": test_size, "seed": cfg.seed},
        metrics=sizes,
    )
