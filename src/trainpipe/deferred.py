"""Imports that wait for their first use, while `trainpipe run` checks whether anything
changed.

An unchanged run answers from the lake's manifests in under half a second; pandas,
numpy, pyarrow and the code that needs them (coerce.py) would add 0.3 s of importing it
never uses. Inside `imports_deferred()` those modules are made as shells (importlib's
LazyLoader). The first use of any of them, or `load_now()`, stops deferring and loads
all the shells made so far, in order. The pipeline calls `load_now()` as soon as it
knows there is work, before any other code runs: a shell reached through a submodule
(`import numpy.linalg`) would load twice, and Python 3.11's LazyLoader must not be raced
by two threads. The modules an unchanged run imports keep numpy & co. out of what runs
at import: annotations are not evaluated (`from __future__ import annotations`), tables
name numpy's functions (expressions.py).
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

# In the order they load: a package before those importing its submodules.
DEFERRED = ("numpy", "pyarrow", "pandas", "trainpipe.coerce")


class _Shell(importlib.util._LazyModule):
    def __getattribute__(self, attr):
        if attr == "__spec__":  # read by every `import` of the module: not a use
            return types.ModuleType.__getattribute__(self, attr)
        load_now()  # the first use of one ends deferring: see DEFERRED
        return getattr(self, attr)


def _load_shells() -> None:
    for name in DEFERRED:
        module = sys.modules.get(name)
        if type(module) is _Shell:
            importlib.util._LazyModule.__getattribute__(module, "__name__")  # loads it


class _Loader(importlib.util.LazyLoader):
    def exec_module(self, module):
        super().exec_module(module)
        module.__class__ = _Shell


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # where import finds it
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_finder: _Finder | None = None


@contextmanager
def imports_deferred() -> Iterator[None]:
    global _finder
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)
    try:
        yield
    finally:
        _stop()


def load_now() -> None:
    """Stop deferring, and load every module deferred so far."""
    _stop()
    _load_shells()


def _stop() -> None:
    global _finder
    if _finder is not None:
        sys.meta_path.remove(_finder)
        _finder = None
