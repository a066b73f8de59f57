"""Derived columns: formulas in a dataset file, parsed into a small grammar, never run as code.

A formula is parsed with Python's `ast` and checked against a whitelist: feature columns
(and derived columns defined before it), numbers, arithmetic, comparisons, logical
combinations of comparisons, a few named functions and the `.dt` parts of datetime columns.
Anything else is a ConfigError naming the key, before any run. What the model stores is
the parsed tree, nested tuples of strings and numbers, evaluated by `add_derived` with
numpy on whole columns; no string is ever evaluated.

This module is pickled by value (cloudpickle, as MLflow logs the model), so a logged model
loads and predicts without trainpipe installed. Hence the evaluator below the parser
uses only numpy, pandas and the standard library.
"""

from __future__ import annotations

import ast
import difflib
import functools
import operator
import re
import sys
from collections.abc import Callable

import cloudpickle
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from trainpipe.errors import ConfigError
from trainpipe.schema import feature_columns

cloudpickle.register_pickle_by_value(sys.modules[__name__])

Tree = tuple  # ("column", name) | ("number", x) | (op, ...): see _parse

ARITHMETIC: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/",
                               ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
COMPARISONS: dict[type, str] = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
                                ast.Eq: "==", ast.NotEq: "!="}
LOGICAL: dict[type, str] = {ast.BitAnd: "&", ast.BitOr: "|", ast.And: "&", ast.Or: "|"}
# name -> (fewest arguments, most (None: any), argument types)
FUNCTIONS: dict[str, tuple[int, int | None, tuple[str, ...]]] = {
    "abs": (1, 1, ("number",)), "sqrt": (1, 1, ("number",)), "log": (1, 1, ("number",)),
    "log1p": (1, 1, ("number",)), "exp": (1, 1, ("number",)),
    "min": (2, None, ("number",)), "max": (2, None, ("number",)),
    "clip": (3, 3, ("number", "number", "number")),
    "where": (3, 3, ("bool", "number", "number")),
}
DT_PARTS = ("year", "quarter", "month", "day", "dayofweek", "dayofyear", "hour", "minute")
ALLOWED = ("A formula may use feature columns (and derived columns defined before it), "
           "numbers, + - * / // % **, comparisons < <= > >= == !=, & | ~ (or and, or, not) "
           f"on comparisons, the functions {', '.join(FUNCTIONS)}, and the .dt parts "
           f"{', '.join(DT_PARTS)} of datetime columns.")
BACKTICKED = re.compile(r"`([^`]*)`")


class NotAllowed(Exception):
    """Why one piece of a formula is outside the grammar."""


class BadColumn(Exception):
    """Why a name in a formula is not a column it may read."""


def parse_derived(dataset: DictConfig) -> dict[str, Tree]:
    """`dataset.derived`, checked: new column name -> parsed formula, in file order.

    A ConfigError names the key of the first bad formula. Also refuses a dataset with no
    feature column at all: there would be nothing to derive from or to train on."""
    where = f"dataset '{dataset.get('name', '?')}'"
    features = feature_columns(dataset)
    if not features:
        raise ConfigError(f"{where}: no feature columns: every column of dataset.columns is "
                          "the target, the id_column or has kind: drop; a model needs at least "
                          "one feature")
    derived = dataset.get("derived") or {}
    if not isinstance(derived, DictConfig | dict):
        raise ConfigError(f"{where}: dataset.derived must map new column names to formulas, "
                          "e.g. {ratio: a / b}")
    # What a formula's names may be: feature columns with their types, then derived ones.
    types = {col: _column_type(dataset.columns[col].type) for col in features}
    parsed: dict[str, Tree] = {}
    for name, formula in derived.items():
        key = f"{where}: dataset.derived.{name}"
        if name in dataset.columns:
            raise ConfigError(f"{key}: '{name}' is already a column in dataset.columns; "
                              "give the derived column a new name")
        if not isinstance(formula, str):
            raise ConfigError(f"{key}: {formula!r} is not a formula; write one as text, "
                              "e.g. 'a / b'")
        try:
            parsed[str(name)] = _parse_formula(formula, types, dataset)
        except NotAllowed as exc:
            raise ConfigError(f"{key}: {formula!r} is not allowed: {exc}. {ALLOWED}") from None
        except BadColumn as exc:
            raise ConfigError(f"{key}: {formula!r}: {exc}") from None
        types[str(name)] = "number"  # a comparison's result is stored as 0/1
    return parsed


def _column_type(type_: str) -> str:
    return {"int": "number", "float": "number", "bool": "number", "datetime": "datetime"}.get(
        type_, "text")


def _parse_formula(formula: str, types: dict[str, str], dataset: DictConfig) -> Tree:
    # `a column name` in backticks, as pandas allows, for names that are not identifiers.
    quoted: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        holder = f"__backticked_{len(quoted)}__"
        quoted[holder] = match[1]
        return holder

    text = BACKTICKED.sub(placeholder, formula).strip()
    try:
        body = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise NotAllowed(f"not a formula ({exc.msg})") from None
    except (ValueError, RecursionError, MemoryError):
        raise NotAllowed("not a formula") from None
    parser = _Parser(text, types, quoted, dataset)
    try:
        tree, kind = parser.parse(body)
    except RecursionError:
        raise NotAllowed("nested too deeply") from None
    if kind == "datetime":
        raise NotAllowed(_datetime_hint(parser.columns[-1]))
    if not parser.columns:
        raise NotAllowed("it uses no column, so it would be the same number in every row")
    return tree


def _datetime_hint(column: str) -> str:
    return (f"'{column}' is a datetime column: use its parts, e.g. {column}.dt.month or "
            f"{column}.dt.year")


class _Parser:
    """Turns an `ast` expression into a tree, checking each node and its type: "number",
    "bool" (a comparison or a combination of comparisons) or "datetime" (a column, usable
    only through its .dt parts)."""

    def __init__(self, text: str, types: dict[str, str], quoted: dict[str, str],
                 dataset: DictConfig):
        self.text, self.types, self.quoted, self.dataset = text, types, quoted, dataset
        self.columns: list[str] = []  # the columns read, in order

    def source(self, node: ast.AST) -> str:
        segment = ast.get_source_segment(self.text, node) or type(node).__name__
        for holder, name in self.quoted.items():
            segment = segment.replace(holder, f"`{name}`")
        return segment

    def parse(self, node: ast.AST) -> tuple[Tree, str]:
        if isinstance(node, ast.Name):
            return self.column(self.quoted.get(node.id, node.id))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            try:
                return ("number", float(node.value)), "number"
            except OverflowError:
                raise NotAllowed(f"the number {self.source(node)} is too large") from None
        if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            return ("arithmetic", ARITHMETIC[type(node.op)], self.number(node.left),
                    self.number(node.right)), "number"
        if isinstance(node, ast.BinOp) and type(node.op) in LOGICAL:
            return ("logical", LOGICAL[type(node.op)], self.bool(node.left),
                    self.bool(node.right)), "bool"
        if isinstance(node, ast.BoolOp):
            values = [self.bool(v) for v in node.values]
            op = LOGICAL[type(node.op)]
            return functools.reduce(lambda a, b: ("logical", op, a, b), values), "bool"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return ("negate", self.number(node.operand)), "number"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd):
            return self.number(node.operand), "number"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
            return ("not", self.bool(node.operand)), "bool"
        if isinstance(node, ast.Compare):
            return self.compare(node), "bool"
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Attribute):
            return self.dt_part(node), "number"
        raise NotAllowed(f"{self.source(node)!r}: {self.what(node)} is not part of the grammar")

    def what(self, node: ast.AST) -> str:
        if isinstance(node, ast.Constant):
            return "text" if isinstance(node.value, str | bytes) else f"{node.value!r}"
        if isinstance(node, ast.BinOp | ast.UnaryOp):
            symbol = {ast.MatMult: "@", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>"}
            return f"the operator {symbol.get(type(node.op), type(node.op).__name__)}"
        return {ast.Subscript: "indexing", ast.Lambda: "lambda", ast.IfExp: "if/else (use "
                "where(condition, a, b))", ast.NamedExpr: ":="}.get(type(node), type(
                    node).__name__)

    def column(self, name: str) -> tuple[Tree, str]:
        kind = self.types.get(name)
        if kind is None:
            raise BadColumn(self.unknown_column(name))
        if kind == "text":
            raise BadColumn(f"'{name}' is a text column; formulas compute numbers from "
                             "int, float, bool and datetime columns")
        self.columns.append(name)
        return ("column", name), kind

    def unknown_column(self, name: str) -> str:
        dataset = self.dataset
        if name == dataset.target:
            return f"'{name}' is the target: a feature computed from it would leak the answer"
        if name == dataset.get("id_column"):
            return f"'{name}' is the id_column, never a feature"
        if name in dataset.columns:
            return f"'{name}' has kind: drop, so the model never receives it"
        if name in (dataset.get("derived") or {}):
            return f"'{name}' is derived later in dataset.derived; define it first"
        close = difflib.get_close_matches(name, list(self.types), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown column '{name}'{hint}; feature columns: {', '.join(self.types)}"

    def typed(self, node: ast.AST, want: str) -> Tree:
        tree, kind = self.parse(node)
        if kind == "datetime":
            raise NotAllowed(_datetime_hint(self.columns[-1]))
        if want == "bool" and kind != "bool":
            raise NotAllowed(f"{self.source(node)!r} is a number where a comparison is "
                             "expected: &, |, ~, and, or, not and the first argument of "
                             "where() take comparisons, e.g. (a > 1) & (b < 2)")
        return tree  # a comparison used as a number counts as 0/1

    def number(self, node: ast.AST) -> Tree:
        return self.typed(node, "number")

    def bool(self, node: ast.AST) -> Tree:
        return self.typed(node, "bool")

    def compare(self, node: ast.Compare) -> Tree:
        # a < b <= c means (a < b) & (b <= c), as in Python
        operands = [self.number(node.left)]
        pairs = []
        for op, right in zip(node.ops, node.comparators, strict=True):
            if type(op) not in COMPARISONS:
                raise NotAllowed(f"{self.source(node)!r}: the comparison "
                                 f"{type(op).__name__} is not part of the grammar")
            operands.append(self.number(right))
            pairs.append(("compare", COMPARISONS[type(op)], operands[-2], operands[-1]))
        return functools.reduce(lambda a, b: ("logical", "&", a, b), pairs)

    def call(self, node: ast.Call) -> tuple[Tree, str]:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            what = (f"unknown function '{name}'" if name else
                    "only the functions named below can be called")
            raise NotAllowed(f"{self.source(node)!r}: {what}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise NotAllowed(f"{self.source(node)!r}: give {name}() its arguments by position")
        fewest, most, kinds = FUNCTIONS[name]
        if not fewest <= len(node.args) <= (most or len(node.args)):
            count = f"{fewest}" if fewest == most else f"at least {fewest}"
            plural = "" if count == "1" else "s"
            raise NotAllowed(f"{self.source(node)!r}: {name}() takes {count} argument{plural}")
        args = tuple(self.typed(arg, kinds[min(i, len(kinds) - 1)])
                     for i, arg in enumerate(node.args))
        return ("call", name, args), "number"

    def dt_part(self, node: ast.Attribute) -> Tree:
        base = node.value
        if not (isinstance(base, ast.Attribute) and base.attr == "dt"):
            raise NotAllowed(f"{self.source(node)!r}: attributes are not allowed, except the "
                             ".dt parts of a datetime column (e.g. column.dt.month)")
        if node.attr not in DT_PARTS:
            raise NotAllowed(f"{self.source(node)!r}: .dt.{node.attr} is not one of the .dt "
                             f"parts {', '.join(DT_PARTS)}")
        if not isinstance(base.value, ast.Name):
            raise NotAllowed(f"{self.source(node)!r}: .dt parts apply to a datetime column")
        tree, kind = self.parse(base.value)
        if kind != "datetime":
            raise NotAllowed(f"{self.source(node)!r}: '{tree[1]}' is not a datetime column")
        return ("dt", node.attr, tree)


# The evaluator: what the logged model carries. numpy, pandas and the standard library only.

OPERATORS: dict[str, Callable] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "**": operator.pow,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
    "&": lambda a, b: np.logical_and(a, b), "|": lambda a, b: np.logical_or(a, b),
}
# numpy's functions by name: an unchanged run imports this module, and no numpy (deferred.py)
UFUNCS: dict[str, str] = {
    "abs": "abs", "sqrt": "sqrt", "log": "log", "log1p": "log1p", "exp": "exp",
    "min": "minimum", "max": "maximum", "clip": "clip", "where": "where",
}


def add_derived(frame: pd.DataFrame, formulas: tuple[tuple[str, Tree], ...]) -> pd.DataFrame:
    """The frame with one float column per formula, computed on whole columns. A value
    that is not finite (a division by zero, log(0)) becomes missing, imputed like any other."""
    values: dict[str, np.ndarray] = {}
    with np.errstate(all="ignore"):
        for name, tree in formulas:
            result = np.asarray(_evaluate(tree, frame, values), dtype="float64")
            values[name] = np.where(np.isinf(result), np.nan, result)
    return pd.concat([frame, pd.DataFrame(values, index=frame.index)], axis=1)


def _evaluate(tree: Tree, frame: pd.DataFrame, derived: dict[str, np.ndarray]):
    tag = tree[0]
    if tag == "column":
        if tree[1] in derived:
            return derived[tree[1]]
        # Every number is a float: int ** -1, bool - bool and nullable ints just work.
        return frame[tree[1]].to_numpy(dtype="float64", na_value=np.nan)
    if tag == "number":
        return tree[1]
    if tag == "dt":  # ("dt", part, ("column", name))
        part = DT_PARTS[DT_PARTS.index(tree[1])]
        values = getattr(frame[tree[2][1]].dt, part)
        return values.to_numpy(dtype="float64", na_value=np.nan)
    if tag == "call":
        args = [_evaluate(arg, frame, derived) for arg in tree[2]]
        if tree[1] in ("min", "max"):
            return functools.reduce(getattr(np, UFUNCS[tree[1]]), args)
        return getattr(np, UFUNCS[tree[1]])(*args)
    if tag == "negate":
        return -_as_number(_evaluate(tree[1], frame, derived))
    if tag == "not":
        return np.logical_not(_evaluate(tree[1], frame, derived))
    left, right = (_evaluate(t, frame, derived) for t in tree[2:])
    if tag == "arithmetic":
        left, right = _as_number(left), _as_number(right)
    return OPERATORS[tree[1]](left, right)


def _as_number(value):
    # a comparison's True/False counts as 1/0 (numpy refuses bool - bool)
    bools = isinstance(value, np.ndarray) and value.dtype.kind == "b"
    return value.astype("float64") if bools else value
