"""split: a seeded train/validation/test split, stratified for classification, the same
rows whether the table is one pandas frame or Dask partitions."""

from __future__ import annotations

import itertools
import math

import pandas as pd
from omegaconf import DictConfig

from trainpipe import cluster
from trainpipe.catalog import Tables
from trainpipe.errors import DataValidationError
from trainpipe.steps import Report

SPLITS = ("train", "val", "test")
ZONE = "landing"
OUTPUTS = {"splits": Tables(SPLITS)}


def run(cfg: DictConfig, validated: pd.DataFrame) -> tuple[dict, Report]:
    """The split is the same for a seed however the table is stored (one pandas frame, Dask
    partitions of any size): each row's place is decided by a seeded hash of its values.
    Within each class (one group for regression) the rows with the smallest hashes go to
    test, the next to val; the split sizes are scikit-learn's train_test_split's, and each
    class is spread over the splits as a stratified split spreads it. Identical rows land
    in the same split."""
    import numpy as np

    target, seed = cfg.dataset.target, int(cfg.seed)
    classify = cfg.dataset.task != "regression"
    parts = (cluster.per_partition(_hashes_by_group, validated, target, seed, classify)
             if cluster.is_dask(validated)
             else [_hashes_by_group(validated, target, seed, classify)])
    hashes: dict = {}
    for part in parts:
        for group, values in part.items():
            hashes.setdefault(group, []).append(values)
    hashes = {g: np.sort(np.concatenate(v)) for g, v in hashes.items()}
    counts = pd.Series({g: len(v) for g, v in hashes.items()}, dtype="int64")
    # validate checks this; its output is reused when only the split's fractions change
    problem = feasibility(cfg, counts)
    if problem is not None:
        raise DataValidationError(f"cannot split the validated data: {target} · {problem[1]}")
    val_size, test_size = float(cfg.split.val_size), float(cfg.split.test_size)
    rows = int(counts.sum())
    n_test = math.ceil(test_size * rows)  # as train_test_split rounds
    n_val = math.ceil(val_size / (1 - test_size) * (rows - n_test))
    test = _shares(counts, n_test)
    val = _shares(counts - test, n_val)
    # a row is test when its hash <= its group's first bound, val when <= the second
    bounds = {g: (_bound(h, test[g]), _bound(h, test[g] + val[g])) for g, h in hashes.items()}
    if cluster.is_dask(validated):
        labelled = validated.map_partitions(_label, target, seed, classify, bounds,
                                            meta=validated._meta.assign(_split=np.int8(0)))
    else:
        labelled = _label(validated, target, seed, classify, bounds)
    splits = {name: labelled[labelled["_split"] == i].drop(columns=["_split"])
              for i, name in enumerate(SPLITS)}
    sizes = {"rows_train": rows - n_test - n_val, "rows_val": n_val, "rows_test": n_test}
    return {"splits": splits}, Report(
        summary=" / ".join(f"{n} {sizes['rows_' + n]:,}" for n in SPLITS),
        params={"val_size": val_size, "test_size": test_size, "seed": cfg.seed},
        metrics=sizes)


def _row_hashes(df: pd.DataFrame, seed: int):
    """Each row's hash mixed with the seed (splitmix64's finalizer; pandas' hash key only
    reaches text columns): another seed, another split."""
    import numpy as np

    x = pd.util.hash_pandas_object(df, index=False).to_numpy()
    x = x + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _groups(df: pd.DataFrame, target: str, classify: bool) -> pd.Series:
    return df[target].astype(str) if classify else pd.Series("all", index=df.index)


def _hashes_by_group(df: pd.DataFrame, target: str, seed: int, classify: bool) -> dict:
    hashes, groups = _row_hashes(df, seed), _groups(df, target, classify).to_numpy()
    return {g: hashes[groups == g] for g in pd.unique(groups)}


def _label(df: pd.DataFrame, target: str, seed: int, classify: bool, bounds: dict):
    """0 train, 1 val, 2 test (SPLITS' order) for each row."""
    import numpy as np

    hashes, groups = _row_hashes(df, seed), _groups(df, target, classify).to_numpy()
    label = np.zeros(len(df), dtype=np.int8)
    for group, (test_bound, val_bound) in bounds.items():
        mine = groups == group
        if val_bound is not None:
            label[mine & (hashes <= val_bound)] = 1
        if test_bound is not None:
            label[mine & (hashes <= test_bound)] = 2
    return df.assign(_split=label)


def _bound(sorted_hashes, n: int):
    """The largest hash of the `n` smallest; None when n is 0."""
    return sorted_hashes[n - 1] if n > 0 else None


def _shares(counts: pd.Series, total: int) -> pd.Series:
    """`total` rows shared out over groups in proportion to `counts` (largest remainders)."""
    exact = counts * total / counts.sum()
    shares = exact.astype(int)
    left = total - int(shares.sum())
    for group in (exact - shares).sort_values(ascending=False, kind="stable").index[:left]:
        shares[group] += 1
    return shares


def feasibility(cfg: DictConfig, counts: pd.Series, rows: int | None = None
                ) -> tuple[str, str] | None:
    """(check, what is needed) when the target (its value counts; `rows` with a target,
    default their sum) has too few rows for train, val and test to each get a row of every
    class (for regression: 2 rows each, as the metrics need two); None when it has enough.
    Fewer would crash the split or leave a metric undefined (a test split without positives
    has no ROC AUC)."""
    val, test = float(cfg.split.val_size), float(cfg.split.test_size)
    fractions = f"split.val_size={val} and split.test_size={test}"
    rows = int(counts.sum()) if rows is None else rows
    if cfg.dataset.task == "regression":
        needed = _rows_for_split(val, test)
        if rows >= needed:
            return None
        return "rows_for_split", (f"{rows:,} rows with a target; {fractions} need at "
                                  f"least {needed} (2 in each of train, val and test)")
    # A stratified split gives each split at least floor(fraction x rows) of a class.
    needed = math.ceil(1 / min(val, test, 1 - val - test) - 1e-9)
    few = counts[counts < needed]
    if few.empty:
        return None
    classes = ", ".join(f"class {_plain(c)!r} has {n:,} row" + ("" if n == 1 else "s")
                        for c, n in few.items())
    return "rows_per_class", (f"{classes}; {fractions} need at least {needed} rows of each "
                              "class (one in each of train, val and test)")


def _rows_for_split(val: float, test: float) -> int:
    """The fewest rows that run() (with scikit-learn train_test_split's rounding) cuts into
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
