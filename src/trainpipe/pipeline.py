"""The pipeline: its steps in order, and the loop that runs them as MLflow runs.

    raw zone ─▶ ingest ─▶ validate ─▶ split ─▶ features ─▶ train ─▶ evaluate

Before anything runs, every step gets its fingerprint (see cache.py). A step whose
output is already published under its fingerprint is not run again ("cached"); so a
re-run redoes only what a change affects, and a crashed run resumes where it stopped.
"""

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType

from omegaconf import DictConfig

from trainpipe import cache, demo, lake
from trainpipe.catalog import ZONES, Catalog
from trainpipe.errors import ConfigError, Interrupted
from trainpipe.steps import evaluate, features, ingest, split, train, validate


@dataclass(frozen=True)
class Step:
    name: str
    module: ModuleType  # its `run(cfg, **inputs)` does the work
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    reads: tuple[str, ...]  # the config keys it reads: part of its fingerprint


DATASET = ("dataset.target", "dataset.task")
# How the source spells missing values and booleans: validate and the model both read it.
SPELLINGS = ("dataset.na_values", "dataset.true_values", "dataset.false_values")
STEPS = (
    Step("ingest", ingest, ("sources",), ("raw", "raw_scoring"), ()),
    Step("validate", validate, ("raw", "raw_scoring"), ("validated", "scoring"),
         ("dataset.name", "dataset.columns", "dataset.id_column", "dataset.strict", "validate",
          *SPELLINGS, *DATASET)),
    Step("split", split, ("validated",), ("splits",), ("seed", "split", *DATASET)),
    Step("features", features, ("splits",), ("transformer", "features"),
         ("dataset.columns", "dataset.derived", "dataset.id_column", "model.preprocessing",
          *SPELLINGS, *DATASET)),
    # The model lives in the tracking store: another store means another output.
    Step("train", train, ("splits", "transformer", "features"), ("model", "example"),
         ("model", "tracking.uri", *DATASET)),
    Step("evaluate", evaluate, ("model", "features"), ("metrics",), ("evaluate", *DATASET)),
)
STEP_NAMES = tuple(s.name for s in STEPS)
PRODUCER = {output: step.name for step in STEPS for output in step.outputs}


@dataclass
class StepResult:
    name: str
    status: str = "pending"  # pending | running | done | cached | failed | killed
    seconds: float = 0.0
    summary: str = ""


@dataclass
class RunResult:
    steps: list[StepResult]
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None


def fingerprints(cfg: DictConfig, sources: dict[str, lake.Source]) -> dict[str, str]:
    prints: dict[str, str] = {}
    for step in STEPS:
        if step.name == "ingest":
            upstream = [sources[role].digest for role in sorted(sources)]
        else:
            upstream = [prints[p] for p in sorted({PRODUCER[i] for i in step.inputs})]
        prints[step.name] = cache.fingerprint(step.name, step.module, cfg, step.reads, upstream)
    return prints


def select(first: str | None, last: str | None) -> list[Step]:
    names = list(STEP_NAMES)
    for name in (first, last):
        if name is not None and name not in names:
            raise ConfigError(f"unknown step {name!r}; steps: {', '.join(names)}")
    start = names.index(first) if first else 0
    stop = names.index(last) + 1 if last else len(names)
    if start >= stop:
        raise ConfigError(f"--from {first} comes after --to {last}")
    return list(STEPS[start:stop])


def run(cfg: DictConfig, overrides: list[str], first: str | None = None,
        last: str | None = None, force: bool = False,
        on_step: Callable[[StepResult], None] = lambda r: None,
        on_notice: Callable[[str], None] = lambda m: None) -> RunResult:
    """Run the steps from `first` to `last` (default: all). Never raises: the error, if
    any, is in the result, and every MLflow run has already ended."""
    from trainpipe.tracking import Tracking, warm_up

    steps = select(first, last)
    force = force or bool(cfg.get("force", False))
    result = RunResult([StepResult(s.name) for s in steps])
    try:
        with _sigterm_interrupts():
            tracking = Tracking(cfg)  # first: an unreachable server stops us before any work
            if steps[0].name == "ingest":
                _ensure_demo_data(cfg, on_notice)
            sources = ingest.read_sources(cfg)
            catalog = Catalog(cfg, lake.Lake(cfg.lake.root), tracking, sources,
                              fingerprints(cfg, sources))
            _check_upstream_published(catalog, steps)
            cached = _cached(catalog, steps, force)
            if any(cached.get(s) is None for s in ("train", "evaluate")):
                warm_up()  # only when a model will be logged or plots drawn
            with tracking.pipeline_run(cfg, overrides, [s.name for s in steps]) as parent:
                result.run_id = parent
                tracking.log_sources(parent, cfg, sources)
                values: dict = {"sources": sources}
                for step, step_result in zip(steps, result.steps, strict=True):
                    values |= _run_step(cfg, step, step_result, values, catalog,
                                        cached[step.name], result, on_step)
                tracking.log_metrics(parent, result.metrics)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller, runs already ended
        result.error = exc
    return result


def _check_upstream_published(catalog: Catalog, steps: list[Step]) -> None:
    """A slice (`--from`, `trainpipe step`) reads what earlier steps published for this
    config: say which step to run first, before any run starts."""
    selected = {s.name for s in steps}
    for step in steps:
        needed = {PRODUCER[i] for i in step.inputs if i in PRODUCER} - selected - {"ingest"}
        for producer in sorted(needed):
            if catalog.manifest(producer) is None:
                raise ConfigError(
                    f"{step.name} reads the output of {producer}, which is not published for "
                    f"this config (fingerprint {catalog.fingerprints[producer][:12]}); run from "
                    f"there first: trainpipe run --from {producer} (or without --from)")


def _cached(catalog: Catalog, steps: list[Step], force: bool) -> dict[str, dict | None]:
    """Step name -> the manifest of its published output, or None if it must run. A step
    that publishes nothing (ingest) is cached when every step reading it is."""
    cached: dict[str, dict | None] = {}
    for step in reversed(steps):
        if force:
            cached[step.name] = None
        elif step.name in ZONES:
            cached[step.name] = catalog.manifest(step.name)
        else:
            readers = [s for s in steps if set(s.inputs) & set(step.outputs)]
            done = readers and all(cached[s.name] is not None for s in readers)
            cached[step.name] = {"run_id": None} if done else None
    # An output is only as good as its inputs: once a step runs again (its output was
    # cleaned or never finished), every later step reading from it runs again too, so a
    # new model is never paired with the metrics of an old one.
    rerun: set[str] = set()
    for step in [s for s in steps if s.name != "ingest"]:
        if cached[step.name] is None or set(step.inputs) & rerun:
            cached[step.name] = None
            rerun |= set(step.outputs)
    return cached


def _run_step(cfg, step: Step, step_result: StepResult, values: dict, catalog: Catalog,
              cached: dict | None, result: RunResult, on_step) -> dict:
    tracking = catalog.tracking
    fingerprint = catalog.fingerprints[step.name]
    step_result.status = "running"
    on_step(step_result)
    start = time.perf_counter()
    outputs: dict = {}
    try:
        with tracking.step_run(step.name, fingerprint, cached) as run_id:
            if cached is not None:
                manifest, status = cached, "cached"
                made_by = manifest.get("run_id")
                summary = f"cached, from run {made_by}" if made_by else "cached"
            else:
                inputs = {n: values[n] if n in values else catalog.load(n)
                          for n in step.inputs}
                try:
                    outputs, report = step.module.run(cfg, **inputs)
                except Exception as exc:
                    _record_failure_report(tracking, run_id, exc)
                    raise
                manifest = catalog.save(step.name, outputs, run_id)
                tracking.record(run_id, report)
                status, summary = "done", report.summary
            parent = manifest.get("parent", {})
            if parent.get("tags"):
                tracking.set_tags(result.run_id, parent["tags"])
            result.tags |= parent.get("tags", {})
            result.metrics |= parent.get("metrics", {})
        step_result.status, step_result.summary = status, summary
    except (KeyboardInterrupt, Interrupted):
        step_result.status = "killed"
        raise
    except BaseException:
        step_result.status = "failed"
        raise
    finally:
        step_result.seconds = time.perf_counter() - start
        on_step(step_result)
    return outputs


def _record_failure_report(tracking, run_id: str, exc: Exception) -> None:
    """Errors that carry a report (validation) leave it on the failed step's run."""
    if getattr(exc, "report", None) is not None:
        tracking.record(run_id, exc.report)
        where = tracking.artifact_uri(run_id)
        exc.add_note(f"full report: {where}/" + ", ".join(exc.report.artifacts))


def _ensure_demo_data(cfg: DictConfig, notice: Callable[[str], None]) -> None:
    """With no file at the default source in the lake's raw zone, write demo data there.
    A source outside the lake is never invented: a missing one is an error."""
    source = str(cfg.dataset.source)
    generator = demo.GENERATORS.get(cfg.dataset.name)
    in_raw_zone = source.startswith(str(cfg.lake.root).rstrip("/") + "/raw/")
    if generator is None or not in_raw_zone or lake.exists(source):
        return
    df = generator(seed=cfg.seed)
    lake.write_file(source, df.to_csv(index=False).encode())
    notice(f"no data at {source}: wrote {len(df):,} rows of synthetic demo data there")


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so runs end KILLED instead of staying RUNNING."""

    def interrupt(signum, frame):
        raise Interrupted("terminated by SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
