"""split: a seeded train/validation/test split, stratified for classification."""

import itertools
import math

import pandas as pd
from omegaconf import DictConfig

from trainpipe.catalog import Tables
from trainpipe.errors import DataValidationError
from trainpipe.steps import Report

SPLITS = ("train", "val", "test")
ZONE = "landing"
OUTPUTS = {"splits": Tables(SPLITS)}


def run(cfg: DictConfig, validated: pd.DataFrame) -> tuple[dict, Report]:
    from sklearn.model_selection import train_test_split

    val_size, test_size = float(cfg.split.val_size), float(cfg.split.test_size)
    target = cfg.dataset.target
    # validate checks this; its output is reused when only the split's fractions change
    problem = feasibility(cfg, validated[target])
    if problem is not None:
        raise DataValidationError(f"cannot split the validated data: {target} · {problem[1]}")
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


def feasibility(cfg: DictConfig, target: pd.Series) -> tuple[str, str] | None:
    """(check, what is needed) when `target` has too few rows for train, val and test to
    each get a row of every class (for regression: 2 rows each, as the metrics need two);
    None when it has enough. Fewer would crash the split or leave a metric undefined (a
    test split without positives has no ROC AUC)."""
    val, test = float(cfg.split.val_size), float(cfg.split.test_size)
    fractions = f"split.val_size={val} and split.test_size={test}"
    target = target.dropna()
    if cfg.dataset.task == "regression":
        needed = _rows_for_split(val, test)
        if len(target) >= needed:
            return None
        return "rows_for_split", (f"{len(target):,} rows with a target; {fractions} need at "
                                  f"least {needed} (2 in each of train, val and test)")
    # A stratified split gives each split at least floor(fraction x rows) of a class.
    needed = math.ceil(1 / min(val, test, 1 - val - test) - 1e-9)
    counts = target.value_counts()
    few = counts[counts < needed]
    if few.empty:
        return None
    classes = ", ".join(f"class {_plain(c)!r} has {n:,} row" + ("" if n == 1 else "s")
                        for c, n in few.items())
    return "rows_per_class", (f"{classes}; {fractions} need at least {needed} rows of each "
                              "class (one in each of train, val and test)")


def _rows_for_split(val: float, test: float) -> int:
    """The fewest rows that scikit-learn's train_test_split, as run() calls it, cuts into
    at least 2 rows of train, val and test."""
    def sizes(n: int) -> tuple[int, int, int]:
        n_test = math.ceil(test * n)
        rest = n - n_test
        n_val = math.ceil(val / (1 - test) * rest)
        return rest - n_val, n_val, n_test

    smallest = min(val, test, 1 - val - test)
    return next(n for n in itertools.count(max(6, math.floor(2 / smallest) - 2))
                if min(sizes(n)) >= 2)


def _plain(value):
    return value.item() if hasattr(value, "item") else value
