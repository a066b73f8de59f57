"""Values to their contract types: what a cell says, read as the dataset file says it is.

A CSV cell is text until its column's type says what it is; no value is guessed (pandas'
inference would read the code 01001 as 1001, `NA` as missing and 1e30 as an int). Each
parse returns the typed values, the cells the source leaves missing, and per cause the
rows that cannot be read as the type. Typed sources (Parquet) go through the same rules.

Used twice: validate reports the failing rows, and the logged model's first step
(`to_contract_types`) turns rows as a source holds them (strings for dates, ints where
floats were, bool spellings) into the types the model was trained on. The model is
pickled with this module's functions inside it (cloudpickle, by value), so this module
imports nothing from trainpipe and nothing beyond numpy, pandas and pyarrow.
"""

import datetime
import numbers
import sys

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# The model's first step calls to_contract_types: whichever process pickles the model (the
# tracker logs it), this module's code goes into the pickle, not a reference to trainpipe.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NA_VALUES = ("",)  # what a missing cell looks like unless dataset.na_values says otherwise
TRUE_VALUES = ("true", "1", "yes")  # bool spellings, compared case-insensitively
FALSE_VALUES = ("false", "0", "no")
ISO_DATES = "ISO8601"  # without a column `format`, dates must be ISO 8601 (2024-01-31 ...)

NATIVE = {"bool": (bool, np.bool_), "datetime": (datetime.date,)}  # no text to parse

INT_TEXT = r"^[+-]?[0-9]+$"
NUMBER_TEXT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
INFINITE_TEXT = r"(?i)^[+-]?inf(inity)?$"
INT64_LIMIT = 2.0**63  # floats at or beyond it are no int64

# Causes of failure: the checks validate reports.
TYPE = "type"  # cannot be read as the column's type (text in a number column, a list, ...)
WHOLE = "whole_number"  # a number with a fraction in an int column
INT64 = "int64_range"  # a whole number outside what an int64 holds


def parse(values: pd.Series, kind: str, *, nullable: bool = True, na_values=NA_VALUES,
          true_values=TRUE_VALUES, false_values=FALSE_VALUES, date_format: str | None = None,
          ) -> tuple[pd.Series, np.ndarray, dict[str, np.ndarray]]:
    """`values` read as `kind` (int, float, str, bool, datetime).

    Returns the typed values (a failing cell becomes missing), the mask of cells the source
    leaves missing (null, or text listed in `na_values`), and the failing rows' masks by
    cause. An int column with missing cells, or a nullable one, is float64 (pandas has no
    NaN in int64); a bool column with missing cells, or a nullable one, holds True, False
    and None.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):  # Parquet's dictionary columns
        values = values.astype(object)
    missing = values.isna().to_numpy(dtype=bool, na_value=True)
    failed: dict[str, np.ndarray] = {}
    if kind == "str" and not _is_text(values) and values.dtype != object:
        text = values.astype(object).where(~missing).map(str, na_action="ignore")
        return _str(pd.Series(text, index=values.index, dtype="str")), missing, failed
    if _is_text(values) or values.dtype == object or (
            kind == "bool" and pd.api.types.is_integer_dtype(values)):
        text, wrong = _as_text(values, missing)
        declared = pc.is_in(pa.array(text.array), value_set=pa.array(list(na_values), pa.string()))
        missing = missing | (declared.to_numpy(zero_copy_only=False) & ~wrong)
        if wrong.any():
            failed[TYPE] = wrong
        blank = missing | wrong
        usable = text.where(~blank) if blank.any() else text  # (where copies the column)
        typed, text_failed = _from_text(usable, kind, true_values, false_values, date_format)
        if kind in NATIVE and values.dtype == object:
            # Cells already of the type (a JSON request's true, a Parquet date) need no
            # spelling or format.
            native = values.map(lambda v: isinstance(v, NATIVE[kind])).to_numpy(bool)
            if native.any():
                own = values.where(native)
                if kind == "datetime":
                    own = pd.to_datetime(own, utc=True).dt.tz_localize(None)
                typed = typed.where(~native, own)
                text_failed = {cause: mask & ~native for cause, mask in text_failed.items()}
        for cause, mask in text_failed.items():
            failed[cause] = failed.get(cause, np.zeros(len(values), bool)) | mask
    else:
        typed, failed = _from_typed(values, kind, missing)
    return _final(typed, kind, nullable), missing, {k: m for k, m in failed.items() if m.any()}


def to_contract_types(frame: pd.DataFrame, columns: dict[str, dict], na_values=NA_VALUES,
                      true_values=TRUE_VALUES, false_values=FALSE_VALUES) -> pd.DataFrame:
    """The model's first step: each input column in its contract type, whether it comes as
    the source's text (a CSV read by pandas: strings for dates, ints where floats were,
    bool spellings) or typed. `columns` maps a column to its spec (type, nullable, format).

    A value that cannot be read becomes missing (and is imputed) rather than failing the
    whole batch; validation is the step that rejects data."""
    out = {}
    for name, spec in columns.items():
        kind, fmt = spec["type"], spec.get("format")
        typed, _, failed = parse(frame[name], kind, nullable=spec.get("nullable", False),
                                 na_values=na_values, true_values=true_values,
                                 false_values=false_values, date_format=fmt)
        if kind == "datetime" and fmt and failed:
            # A JSON request (MLflow serving, the logged input example) carries dates as
            # ISO 8601 text, whatever the training file's format was.
            iso, _, _ = parse(frame[name], kind, na_values=na_values)
            typed = typed.fillna(iso)
        out[name] = typed
    return pd.DataFrame(out, index=frame.index)


def _is_text(values: pd.Series) -> bool:
    return isinstance(values.dtype, pd.StringDtype)


def _as_text(values: pd.Series, missing: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    """Text of each cell, and the mask of cells that are no scalar (a list, a dict, bytes):
    those have no text to parse."""
    if _is_text(values):
        return values, np.zeros(len(values), bool)
    cells = values.to_numpy(dtype=object)
    wrong = np.fromiter((not m and not _scalar(v) for v, m in zip(cells, missing, strict=True)),
                        bool, len(cells))
    text = [None if m or w else str(v) for v, m, w in zip(cells, missing, wrong, strict=True)]
    return pd.Series(text, index=values.index, dtype="str"), wrong


def _scalar(value) -> bool:
    return isinstance(value, str | numbers.Number | np.bool_ | datetime.date)  # Decimal too


def _from_text(text: pd.Series, kind: str, true_values, false_values, date_format):
    """Typed values and failure masks from text; `text` is missing where nothing is to read."""
    present = text.notna().to_numpy()
    if kind == "str":
        return text, {}
    if kind == "bool":
        folded = text.str.strip().str.lower()
        is_true = folded.isin([str(v).lower() for v in true_values]).to_numpy(bool, na_value=False)
        is_false = folded.isin([str(v).lower() for v in false_values]).to_numpy(bool,
                                                                                 na_value=False)
        typed = _series(np.where(is_true, True, np.where(is_false, False, None)), text.index)
        return typed, {TYPE: present & ~is_true & ~is_false}
    if kind == "datetime":
        stripped = text.str.strip()
        typed = pd.to_datetime(stripped, format=date_format or ISO_DATES, errors="coerce",
                               utc=True).dt.tz_localize(None)
        return typed, {TYPE: present & typed.isna().to_numpy()}
    return _numbers(text, kind, present)


def _numbers(text: pd.Series, kind: str, present: np.ndarray):
    """int or float from text, by the grammar of decimal numbers (no hex, no 1_000, no NaN:
    a missing value is what na_values says)."""
    arrow = pa.array(text.array) if _is_text(text) else pa.array(text, pa.large_string())
    # The common case, fast: arrow's cast, when it reads every value as the grammar does
    # (it also reads hex ints, 0x10, and NaN floats, which the grammar does not).
    try:
        if kind == "int" and (_all_digits(arrow) or not _contains(arrow, "x", "X")):
            return _series(pc.cast(arrow, pa.int64()).to_numpy(zero_copy_only=False),
                           text.index), {}
        if kind == "float":
            floats = pc.cast(arrow, pa.float64())
            if not pc.any(pc.is_nan(floats)).as_py():
                return _series(floats.to_numpy(zero_copy_only=False), text.index), {}
    except pa.ArrowInvalid:  # text that is no number, or beyond int64: sorted out below
        pass
    arrow = pc.replace_substring_regex(pc.utf8_trim_whitespace(arrow), r"^\+", "")
    number = _matches(arrow, NUMBER_TEXT)
    if kind == "float":
        number |= _matches(arrow, INFINITE_TEXT)
    floats = pc.cast(pc.if_else(pa.array(number), arrow, None), pa.float64())
    floats = floats.to_numpy(zero_copy_only=False)
    if kind == "float":
        return _series(floats, text.index), {TYPE: present & ~number}
    whole, in_range = _whole(floats, number)
    ints = np.where(in_range, floats, np.nan)
    # Plain integer text is parsed exactly: a float holds 53 bits, an int64 63, and near
    # the limit the float's rounding cannot tell 2**63 - 1 (fits) from 2**63 (does not).
    exact = whole & (np.abs(floats) <= INT64_LIMIT) & _matches(arrow, INT_TEXT)
    if exact.any():
        digits = pc.filter(arrow, pa.array(exact))
        ints = ints.astype(object)
        try:
            ints[exact] = pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)
            in_range |= exact
        except pa.ArrowInvalid:
            parsed = np.array([int(d) for d in digits.to_pylist()], dtype=object)
            fits = np.array([-(2**63) <= v < 2**63 for v in parsed], bool)
            positions = np.flatnonzero(exact)
            ints[positions] = np.where(fits, parsed, np.nan)
            in_range[positions] = fits
    typed = _series(ints, text.index)
    typed = typed.astype("int64") if in_range.all() else typed.astype("float64")
    return typed, {TYPE: present & ~number, WHOLE: number & ~whole,
                   INT64: whole & ~in_range}


def _whole(floats: np.ndarray, number: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which numbers are whole, and which of those an int64 holds (1e400 is whole, too big)."""
    finite = number & np.isfinite(floats)
    fraction = np.ones_like(floats)
    np.mod(floats, 1, where=finite, out=fraction)
    whole = (finite & (fraction == 0)) | (number & ~finite)
    return whole, whole & finite & (np.abs(floats) < INT64_LIMIT)


def _all_digits(arrow) -> bool:
    return pc.all(pc.ascii_is_decimal(arrow)).as_py() is not False


def _contains(arrow, *parts: str) -> bool:
    return any(pc.any(pc.match_substring(arrow, part)).as_py() for part in parts)


def _matches(arrow, pattern: str) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(arrow, pattern), False).to_numpy(
        zero_copy_only=False)


def _from_typed(values: pd.Series, kind: str, missing: np.ndarray):
    """Typed values (Parquet) in the contract type; text columns never come here."""
    dtype = values.dtype
    numeric = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
    if kind == "datetime":
        if pd.api.types.is_datetime64_any_dtype(dtype):
            if getattr(dtype, "tz", None) is not None:
                values = values.dt.tz_convert("UTC").dt.tz_localize(None)
            return values.astype("datetime64[ns]"), {}
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns]"), {TYPE: ~missing}
    if kind == "bool":
        if pd.api.types.is_bool_dtype(dtype):
            return values.astype(object).where(~missing, None), {}
        return pd.Series(None, index=values.index, dtype=object), {TYPE: ~missing}
    if not numeric:
        return pd.Series(np.nan, index=values.index), {TYPE: ~missing}
    floats = values.to_numpy(dtype="float64", na_value=np.nan)
    if kind == "float":
        return _series(floats, values.index), {}
    if pd.api.types.is_integer_dtype(dtype):
        if dtype.kind == "u" and dtype.itemsize == 8:
            over = ~missing & (values.to_numpy(dtype="float64", na_value=0) >= INT64_LIMIT)
            kept = values.where(~over)
            return kept.astype("float64" if over.any() or missing.any() else "int64"), {
                INT64: over}
        return values.astype("float64" if missing.any() else "int64"), {}
    finite = ~missing & np.isfinite(floats)
    whole, in_range = _whole(floats, finite)
    typed = _series(np.where(in_range, floats, np.nan), values.index)
    return typed, {TYPE: ~missing & ~finite, WHOLE: finite & ~whole, INT64: whole & ~in_range}


def _series(array: np.ndarray, index: pd.Index) -> pd.Series:
    """A Series over a fresh array, without the copy pandas makes by default."""
    return pd.Series(array, index=index, copy=False)


def _final(typed: pd.Series, kind: str, nullable: bool) -> pd.Series:
    """The published dtype: the same whatever the data, given the contract."""
    if kind == "int":
        if typed.dtype == "int64" and not nullable:
            return typed
        if nullable or typed.isna().any():
            return typed.astype("float64")
        return typed.astype("int64")
    if kind == "float":
        return typed.astype("float64")
    if kind == "bool":
        if nullable or typed.isna().any():
            return typed.astype(object).where(typed.notna(), None)
        return typed.astype(bool)
    if kind == "datetime":
        return typed.astype("datetime64[ns]")
    return _str(typed)


def _str(typed: pd.Series) -> pd.Series:
    return typed.astype("str")
