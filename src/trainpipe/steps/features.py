"""features: a scikit-learn transformer built from the dataset config, fitted on the
training split only, applied to every split.

The transformer uses scikit-learn and pandas classes, and functions of
trainpipe.coerce and trainpipe.expressions stored by value in the pickle, so the logged
model needs nothing from trainpipe to load.
"""

from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from trainpipe import cluster, coerce
from trainpipe.catalog import Pickle, Tables
from trainpipe.expressions import add_derived, parse_derived
from trainpipe.schema import feature_columns, parse_options
from trainpipe.steps import Report

ZONE = "features"
OUTPUTS = {"transformer": Pickle("transformer.pkl"), "features": Tables(("train", "val", "test"))}


def contract_types(cfg: DictConfig):
    """The first step: input columns to their contract types, from rows as the source holds
    them (strings for dates, ints where floats were, bool spellings) or already typed."""
    from sklearn.preprocessing import FunctionTransformer

    dataset = cfg.dataset
    columns = {col: {"type": dataset.columns[col].type,
                     "nullable": bool(dataset.columns[col].get("nullable", False)),
                     "format": dataset.columns[col].get("format")}
               for col in feature_columns(dataset)}
    return FunctionTransformer(coerce.to_contract_types, feature_names_out="one-to-one",
                               kw_args={"columns": columns, **parse_options(dataset)})


def build_transformer(cfg: DictConfig):
    """Derived columns, then numeric (imputed, optionally scaled) and categorical
    (ordinal or one-hot; unseen categories never crash prediction) columns."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import (
        FunctionTransformer,
        OneHotEncoder,
        OrdinalEncoder,
        StandardScaler,
    )

    dataset, prep = cfg.dataset, cfg.model.preprocessing
    kinds = feature_columns(dataset)
    derived = parse_derived(dataset)
    dates = [c for c, k in kinds.items()
             if k == "numeric" and dataset.columns[c].type == "datetime"]
    numeric = [c for c, k in kinds.items() if k == "numeric" and c not in dates] + list(derived)
    categorical = [c for c, k in kinds.items() if k == "categorical"]

    def numeric_steps() -> list:
        steps = [SimpleImputer(strategy="median", keep_empty_features=True)]
        return [*steps, StandardScaler()] if prep.scale_numeric else steps

    # A datetime feature is its number of days since 1970 (NaT stays missing), then numeric.
    date_steps = [
        FunctionTransformer(pd.DataFrame.sub, kw_args={"other": pd.Timestamp(0)},
                            feature_names_out="one-to-one"),
        FunctionTransformer(pd.DataFrame.div, kw_args={"other": pd.Timedelta(days=1)},
                            feature_names_out="one-to-one"),
        *numeric_steps()]
    if prep.categorical_encoding == "onehot":
        encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    else:
        encoder = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1,
                                 encoded_missing_value=-1)
    columns = ColumnTransformer(
        [("numeric", make_pipeline(*numeric_steps()), numeric),
         ("dates", make_pipeline(*date_steps), dates),
         ("categorical", encoder, categorical)],
        remainder="drop",  # the id, the target and dropped columns never become features
        verbose_feature_names_out=False,
    )
    steps = [("types", contract_types(cfg))]
    if derived:
        # The parsed formulas, never a string to evaluate; add_derived travels by value.
        steps.append(("derive", FunctionTransformer(
            add_derived, kw_args={"formulas": tuple(derived.items())})))
    steps.append(("columns", columns))
    return Pipeline(steps).set_output(transform="pandas")


def run(cfg: DictConfig, splits: dict[str, pd.DataFrame]) -> tuple[dict, Report]:
    target = cfg.dataset.target
    # The model's inputs: raw feature columns only, so it never asks for the id or target.
    inputs = list(feature_columns(cfg.dataset))
    if cluster.is_dask(splits["train"]):
        transformer = fit_on_dask(cfg, splits["train"][inputs])
        sample = _features_of(splits["train"].head(2), transformer, inputs, target)
        features = {name: df.map_partitions(_features_of, transformer, inputs, target,
                                            meta=sample.iloc[:0])
                    for name, df in splits.items()}
    else:
        transformer = build_transformer(cfg)
        transformer.fit(splits["train"][inputs], splits["train"][target])
        features = {name: _features_of(df, transformer, inputs, target)
                    for name, df in splits.items()}
    n_features = len(features["train"].columns) - 1
    return {"transformer": transformer, "features": features}, Report(
        summary=f"{n_features} features",
        params={"n_features": n_features,
                "categorical_encoding": cfg.model.preprocessing.categorical_encoding,
                "scale_numeric": cfg.model.preprocessing.scale_numeric},
    )


def _features_of(df: pd.DataFrame, transformer, inputs: list[str], target: str) -> pd.DataFrame:
    x = transformer.transform(df[inputs])
    x[target] = df[target].to_numpy()
    return x


def fit_on_dask(cfg: DictConfig, train):
    """The transformer of `build_transformer`, a plain scikit-learn object, fitted on a Dask
    training split: its statistics come from Dask over every row. Categories are exact;
    medians are Dask's approximate quantiles; means and variances (scaling) exact.

    The column step is fitted on a small stand-in table that has exactly those statistics
    (each category once, each median as the value of its column); the scalers then get the
    moments of the whole split."""
    import dask
    import numpy as np
    from sklearn.pipeline import Pipeline

    transformer = build_transformer(cfg)
    *first, (_, columns) = transformer.steps
    prepare = Pipeline(first)  # contract types and derived columns: no statistics
    prepare.fit(train.head(100))
    prepared = train.map_partitions(prepare.transform,
                                    meta=prepare.transform(train.head(2)).iloc[:0])
    kinds = {name: cols for name, _, cols in columns.transformers}
    numeric, dates, categorical = kinds["numeric"], kinds["dates"], kinds["categorical"]
    as_numbers = prepared[numeric + dates].map_partitions(_days, dates)
    medians, rows, counts, sums, squares, *uniques = dask.compute(
        as_numbers.quantile(0.5), prepared.shape[0], as_numbers.count(), as_numbers.sum(),
        (as_numbers ** 2).sum(), *[prepared[c].dropna().unique() for c in categorical])
    size = max([1, *map(len, uniques)])
    stand_in = {c: np.full(size, medians[c]) for c in numeric}
    stand_in |= {c: pd.Timestamp(0) + pd.to_timedelta(np.full(size, medians[c]), unit="D")
                 for c in dates}
    stand_in |= {c: np.resize(np.sort(np.asarray(u)), size) for c, u in
                 zip(categorical, uniques, strict=True)}
    meta = prepared._meta
    table = pd.DataFrame(stand_in)[list(meta.columns)].astype(meta.dtypes.to_dict())
    columns.fit(table)
    for name, cols in (("numeric", numeric), ("dates", dates)):
        scaler = columns.named_transformers_[name][-1]
        if cols and hasattr(scaler, "scale_"):  # the moments of the imputed columns
            filled = rows - counts[cols]
            mean = (sums[cols] + filled * medians[cols]) / rows
            var = (squares[cols] + filled * medians[cols] ** 2) / rows - mean ** 2
            scaler.mean_, scaler.var_ = mean.to_numpy(), var.clip(lower=0).to_numpy()
            scaler.scale_ = np.where(scaler.var_ > 0, np.sqrt(scaler.var_), 1.0)
            scaler.n_samples_seen_ = rows
    return transformer


def _days(df: pd.DataFrame, dates: list[str]) -> pd.DataFrame:
    """Date columns as days since 1970 (as the transformer sees them), others as they are."""
    return df.assign(**{c: (df[c] - pd.Timestamp(0)) / pd.Timedelta(days=1) for c in dates}
                     ).astype("float64")
