"""What identifies a step's output: its fingerprint. This is the one place it is defined.

A step's fingerprint is the sha256 of:
  1. the step's name;
  2. its code version: the sha256 of the step module's source and of the trainpipe
     modules it imports from (schema.py for validate and features, ...), and trainpipe's
     version (which covers how catalog.py and lake.py publish);
  3. the resolved values of the config keys the step reads (`Step.reads`), with a
     relative SQLite store (`sqlite:///mlflow.db`) made absolute: the same words in two
     folders name two stores, and a model lives in one of them;
  4. the fingerprints of the steps whose outputs it reads; for ingest, which reads the
     raw zone, the sha256 of each source file's bytes.
Same fingerprint, same output: a published output with that fingerprint is reused.
File timestamps play no part.
"""

import hashlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

import trainpipe


def code_modules(module: ModuleType) -> list[str]:
    """The step module and the trainpipe modules it imports names from. (`__spec__`
    names a module without loading it when its import is deferred: see deferred.py.)"""
    used = {module.__name__}
    for value in vars(module).values():
        name = value.__spec__.name if isinstance(value, ModuleType) else getattr(
            value, "__module__", None)
        if isinstance(name, str) and name.startswith("trainpipe."):
            used.add(name)
    return sorted(used)


def code_version(module: ModuleType) -> str:
    sha = hashlib.sha256()
    for name in code_modules(module):
        sha.update(Path(sys.modules[name].__spec__.origin).read_bytes())
    return f"{trainpipe.__version__}+{sha.hexdigest()[:16]}"


def config_values(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    values = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        values[key] = (OmegaConf.to_container(value, resolve=True)
                       if OmegaConf.is_config(value) else value)
    if isinstance(values.get("tracking.uri"), str):
        values["tracking.uri"] = absolute_store(values["tracking.uri"])
    return values


def absolute_store(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def fingerprint(name: str, module: ModuleType, cfg: DictConfig, reads: tuple[str, ...],
                upstream: list[str]) -> str:
    identity = {"step": name, "code": code_version(module),
                "config": config_values(cfg, reads), "upstream": upstream}
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
