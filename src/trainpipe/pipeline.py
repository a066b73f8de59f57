"""The pipeline: its steps in order, and the loop that runs them as MLflow runs.

    raw zone ─▶ ingest ─▶ validate ─▶ split ─▶ features ─▶ train ─▶ evaluate
"""

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from omegaconf import DictConfig

from trainpipe import demo, lake
from trainpipe.catalog import Catalog
from trainpipe.errors import Interrupted
from trainpipe.steps import evaluate, features, ingest, split, train, validate


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable
    inputs: tuple[str, ...]  # names the catalog can load when the step runs alone


STEPS = (
    Step("ingest", ingest.run, ()),
    Step("validate", validate.run, ("raw", "raw_scoring")),
    Step("split", split.run, ("validated",)),
    Step("features", features.run, ("splits",)),
    Step("train", train.run, ("splits", "transformer", "features")),
    Step("evaluate", evaluate.run, ("model", "features")),
)
STEP_NAMES = tuple(s.name for s in STEPS)


@dataclass
class StepResult:
    name: str
    status: str = "pending"  # pending | running | done | failed | killed
    seconds: float = 0.0
    summary: str = ""


@dataclass
class RunResult:
    steps: list[StepResult]
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None


def run(cfg: DictConfig, overrides: list[str], only: str | None = None,
        on_step: Callable[[StepResult], None] = lambda r: None,
        on_notice: Callable[[str], None] = lambda m: None) -> RunResult:
    """Run every step (or `only` one, reading its inputs from the lake). Never raises:
    the error, if any, is in the result, and every MLflow run has already ended."""
    from trainpipe.tracking import Tracking, warm_up

    steps = [s for s in STEPS if only in (None, s.name)]
    result = RunResult([StepResult(s.name) for s in steps])
    try:
        with _sigterm_interrupts():
            if only in (None, "ingest"):
                _ensure_demo_data(cfg, on_notice)
            tracking = Tracking(cfg)
            warm_up()
            catalog = Catalog(cfg, lake.Lake(cfg.lake.root), tracking)
            with tracking.pipeline_run(cfg, overrides, [s.name for s in steps]) as parent:
                result.run_id = parent
                values: dict = {}
                for step, step_result in zip(steps, result.steps, strict=True):
                    values |= _run_step(cfg, step, step_result, values, catalog, parent,
                                        result, on_step)
                result.metrics = {k: v for k, v in values.get("metrics", {}).items()
                                  if k.startswith("test_")}
                tracking.log_metrics(parent, result.metrics)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller, runs already ended
        result.error = exc
    return result


def _run_step(cfg, step: Step, step_result: StepResult, values: dict, catalog: Catalog,
              parent: str, result: RunResult, on_step) -> dict:
    tracking = catalog.tracking
    step_result.status = "running"
    on_step(step_result)
    start = time.perf_counter()
    try:
        with tracking.step_run(step.name) as run_id:
            try:
                inputs = {n: values[n] if n in values else catalog.load(n) for n in step.inputs}
                outputs, report = step.run(cfg, **inputs)
            except Exception as exc:
                if getattr(exc, "report", None) is not None:  # e.g. the validation report
                    tracking.record(run_id, exc.report)
                    where = tracking.artifact_uri(run_id)
                    exc.add_note(f"full report: {where}/" + ", ".join(exc.report.artifacts))
                raise
            tags = catalog.save(outputs, run_id, parent)
            tracking.record(run_id, report)
            if tags:
                tracking.set_tags(parent, tags)
                result.tags |= tags
    except (KeyboardInterrupt, Interrupted):
        step_result.status = "killed"
        raise
    except BaseException:
        step_result.status = "failed"
        raise
    finally:
        step_result.seconds = time.perf_counter() - start
        if step_result.status == "running":
            step_result.status = "done"
            step_result.summary = report.summary
        on_step(step_result)
    return outputs


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
