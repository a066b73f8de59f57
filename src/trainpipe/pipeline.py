"""The pipeline: its steps in order, and the loop that runs them as MLflow runs.

    raw zone ─▶ ingest ─▶ validate ─▶ split ─▶ features ─▶ train ─▶ evaluate ─▶ register
             ─▶ predict (when there is scoring data)

Before anything runs, every step gets its fingerprint (see cache.py). A step whose
output is already published under its fingerprint is reused, not run again; so a re-run
redoes only what a change affects, and a crashed run resumes where it stopped. When
every step is reused there is nothing to record: no MLflow run is made (and MLflow is not
even imported), the result comes from the lake's manifests.
"""

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import ModuleType

from omegaconf import DictConfig

from trainpipe import cache, cluster, deferred, demo, lake
from trainpipe.catalog import Catalog, outputs, stored
from trainpipe.errors import ConfigError, Interrupted
from trainpipe.lake import DamagedOutput
from trainpipe.steps import evaluate, features, ingest, predict, register, split, train, validate
from trainpipe.tracker import Pending


@dataclass(frozen=True)
class Step:
    name: str
    module: ModuleType  # `run(cfg, **inputs)` does the work; OUTPUTS declares what it makes
    inputs: tuple[str, ...]
    reads: tuple[str, ...]  # the config keys it reads: part of its fingerprint
    when: Callable[[DictConfig], bool] = lambda cfg: True  # does it apply to this config?

    @property
    def outputs(self) -> tuple[str, ...]:
        return outputs(self.module)


DATASET = ("dataset.target", "dataset.task")
# compute=dask publishes tables in parts, splits by row hashes and trains with lightgbm.dask
ENGINE = ("compute.engine",)
# How the source spells missing values and booleans: validate and the model both read it.
SPELLINGS = ("dataset.na_values", "dataset.true_values", "dataset.false_values")
STEPS = (
    Step("ingest", ingest, ("sources",), ()),
    Step("validate", validate, ("raw", "raw_scoring"),
         ("dataset.name", "dataset.columns", "dataset.id_column", "dataset.strict", "validate",
          *SPELLINGS, *DATASET, *ENGINE)),
    Step("split", split, ("validated",), ("seed", "split", *DATASET, *ENGINE)),
    Step("features", features, ("splits",),
         ("dataset.columns", "dataset.derived", "dataset.id_column", "model.preprocessing",
          *SPELLINGS, *DATASET, *ENGINE)),
    # The model lives in the tracking store: another store means another output.
    # model.search_space is what tuning may try, not what this model is: not read.
    # lightgbm.dask's model depends on the partitions and the number of workers (a running
    # scheduler's workers are not known before the run: see "Scaling out" in the README)
    Step("train", train, ("splits", "transformer", "features"),
         ("model.name", "model._target_", "model.preprocessing", "model.params",
          "tracking.uri", "compute.workers", "compute.blocksize", *DATASET, *ENGINE)),
    Step("evaluate", evaluate, ("model", "features"), ("evaluate", "dataset.positive_class",
                                                        *DATASET)),
    # The registry lives in the tracking store. registry.require_promotion is left out: it
    # changes the exit code, not what is registered.
    Step("register", register, ("model_uri", "metrics", "splits", "pipeline_run_id"),
         ("registry.name", "registry.gate", "tracking.uri", "dataset.positive_class", *DATASET)),
    Step("predict", predict, ("model", "scoring", "model_uri", "registration"),
         ("dataset.id_column", *DATASET), when=predict.applies),
)
STEP_NAMES = tuple(s.name for s in STEPS)
PRODUCER = {output: step.name for step in STEPS for output in step.outputs}
ZONES = {s.name: s.module.ZONE for s in STEPS if stored(s.module)}  # steps that publish


@dataclass
class StepResult:
    name: str
    status: str = "pending"  # pending | running | done | cached | failed | killed
    seconds: float = 0.0
    summary: str = ""


@dataclass
class RunResult:
    steps: list[StepResult]
    run_id: str | None = None  # the parent run; None when nothing ran (up to date)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    made_by: str | None = None  # up to date: the run that made the last step's output
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)
    report: str | None = None  # where the run's report.html is (a path or an artifact URI)
    report_problem: str | None = None  # why there is none, when the run made one

    @property
    def up_to_date(self) -> bool:
        return self.error is None and self.run_id is None and bool(self.steps) and all(
            r.status == "cached" for r in self.steps)


def fingerprints(cfg: DictConfig, sources: dict[str, lake.Source]) -> dict[str, str]:
    prints: dict[str, str] = {}
    for step in STEPS:
        if step.name == "ingest":
            upstream = [sources[role].digest for role in sorted(sources)]
        else:
            upstream = [prints[p] for p in sorted({PRODUCER[i] for i in step.inputs
                                                   if i in PRODUCER})]
        prints[step.name] = cache.fingerprint(step.name, step.module, cfg, step.reads, upstream)
    return prints


def catalog_for(cfg: DictConfig, sources: dict[str, lake.Source],
                the_lake: lake.Lake | None = None) -> Catalog:
    return Catalog(cfg, the_lake or lake.Lake(cfg.lake.root), sources,
                   fingerprints(cfg, sources), {s.name: s.module for s in STEPS})


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
        on_notice: Callable[[str], None] = lambda m: None, tracker=None) -> RunResult:
    """Run the steps from `first` to `last` (default: all). Never raises: the error, if
    any, is in the result, and every MLflow run has already ended. `tracker`: a
    tracker.Tracker already started (the CLI starts one first thing, so MLflow is imported
    while the config is read); without one, it is started when there is work."""
    from trainpipe.tracker import Tracker

    selected = select(first, last)
    steps = [s for s in selected if s.when(cfg)]
    force = force or bool(cfg.get("force", False))
    result = RunResult([StepResult(s.name) for s in steps])
    if not steps:
        result.error = ConfigError("nothing to run for this config: " + "; ".join(
            f"{s.name} {s.when.__doc__ or 'does not apply'}" for s in selected))
        return result
    try:
        with sigterm_interrupts():
            from trainpipe.supervise import check_tracking_server

            # an unreachable server stops us before any work (demo data included)
            check_tracking_server(str(cfg.tracking.uri))
            the_lake = lake.Lake(cfg.lake.root)
            if steps[0].name == "ingest":
                _ensure_demo_data(cfg, on_notice)
            catalog = catalog_for(cfg, ingest.read_sources(cfg), the_lake)
            reused = plan(catalog, steps, force, on_notice)
            recorded = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run` made a run: record
            if all(reused[s.name] is not None for s in steps) and not recorded:
                _report_up_to_date(catalog, steps, reused, result, on_step)
                return result
            deferred.load_now()  # work ahead (a `mlflow run` records even reused steps)
            tracker = tracker or Tracker.start()
            compute = (cluster.connected(cfg, on_notice) if cluster.enabled(cfg)
                       else nullcontext({}))
            with compute as compute_tags:
                _run_tracked(cfg, overrides, catalog, steps, reused, result, on_step, tracker,
                             compute_tags, on_notice)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller, runs already ended
        result.error = exc
    finally:
        if tracker is not None:
            tracker.discard()  # unused (up to date, or stopped before any run), or ended
    return result


def plan(catalog: Catalog, steps: list[Step], force: bool,
         notice: Callable[[str], None] = lambda m: None) -> dict[str, dict | None]:
    """Step name -> the manifest of the published output it reuses, or None: it runs.

    Every published file the run will read (the inputs of the steps that run, what the
    parent run records from reused steps) is read and checked against its digest here: a
    damaged output is not reused, its step runs again."""
    _check_upstream_published(catalog, steps)
    selected = {s.name for s in steps}
    damaged: set[str] = set()
    while True:
        reused = _reusable(catalog, steps, force, damaged, notice)
        if None in reused.values():
            deferred.load_now()  # work ahead: see deferred.py
        try:
            for step in steps:
                if reused[step.name] is not None:
                    catalog.record(step.name, reused[step.name])
                else:
                    for name in step.inputs:
                        _check_input(catalog, name, reused)
            for step in steps:  # e.g. train: the estimator takes model.params
                if reused[step.name] is None and hasattr(step.module, "check"):
                    step.module.check(catalog.cfg, catalog.sources)
            return reused
        except DamagedOutput as exc:
            step = _step_of(catalog, exc)
            if step not in selected or step in damaged:
                raise ConfigError(f"{exc}; run from {step} to make it again: trainpipe run "
                                  f"--from {step}") from None
            notice(f"{exc}; running {step} again")
            damaged.add(step)


def _reusable(catalog: Catalog, steps: list[Step], force: bool, damaged: set[str],
              notice: Callable[[str], None]) -> dict[str, dict | None]:
    reused: dict[str, dict | None] = {}
    for step in reversed(steps):
        if force or step.name in damaged:
            reused[step.name] = None
        elif catalog.publishes(step.name):
            try:
                reused[step.name] = catalog.manifest(step.name)
            except DamagedOutput as exc:
                notice(f"{exc}; running {step.name} again")
                damaged.add(step.name)
                reused[step.name] = None
        else:  # stores nothing (ingest): reused when every step reading it is
            readers = [s for s in steps if set(s.inputs) & set(step.outputs)]
            done = readers and all(reused[s.name] is not None for s in readers)
            reused[step.name] = {} if done else None
    # An output is only as good as its inputs: once a step runs again (its output was
    # cleaned, damaged or never finished), every later step reading from it runs again,
    # so a new model is never paired with the metrics of an old one.
    rerun: set[str] = set()
    for step in steps:
        if not catalog.publishes(step.name):
            continue
        if reused[step.name] is None or set(step.inputs) & rerun:
            reused[step.name] = None
            rerun |= set(step.outputs)
    return reused


def _check_input(catalog: Catalog, name: str, reused: dict[str, dict | None]) -> None:
    """Read (and so check) the stored files behind an input the run will load."""
    producer = PRODUCER.get(name)
    if producer is None or reused.get(producer) is None and producer in reused:
        return  # made in this run
    codec = catalog.codec(name)
    manifest = reused.get(producer) or catalog.manifest(producer)
    if codec is None or manifest is None:
        return
    for file in set(codec.names()) & set(manifest["files"]):
        catalog.read(producer, file, manifest)


def _step_of(catalog: Catalog, exc: DamagedOutput) -> str:
    for step in STEP_NAMES:
        if catalog.publishes(step) and exc.where.startswith(catalog.url(step)):
            return step
    raise exc


def _check_upstream_published(catalog: Catalog, steps: list[Step]) -> None:
    """A slice (`--from`, `trainpipe step`) reads what earlier steps published for this
    config: when some of it is missing, say so before any run starts, naming the first step
    (in pipeline order) to run again."""
    selected = {s.name for s in steps}

    def published(name: str) -> bool:
        try:
            return not catalog.publishes(name) or catalog.manifest(name) is not None
        except DamagedOutput:
            return False

    needed, todo = set(), [s for s in steps]
    while todo:  # every earlier step whose output the slice needs, directly or not
        step = todo.pop()
        for producer in {PRODUCER[i] for i in step.inputs if i in PRODUCER} - selected - needed:
            needed.add(producer)
            if not published(producer) or not catalog.publishes(producer):
                todo.append(next(s for s in STEPS if s.name == producer))
    missing = sorted((n for n in needed if not published(n)), key=STEP_NAMES.index)
    if not missing:
        return
    reader, producer = next((s.name, PRODUCER[i]) for s in steps for i in s.inputs
                            if PRODUCER.get(i) in missing)
    raise ConfigError(
        f"{reader} reads the output of {producer}, which is not published for this config "
        f"(fingerprint {catalog.fingerprints[producer][:12]}); run from {missing[0]} first: "
        f"trainpipe run --from {missing[0]} (or without --from)")


def _report_up_to_date(catalog: Catalog, steps: list[Step], reused: dict[str, dict | None],
                       result: RunResult, on_step) -> None:
    """Nothing to do: the result is what the lake says of the published outputs."""
    for step, step_result in zip(steps, result.steps, strict=True):
        manifest = reused[step.name]
        step_result.status, step_result.summary = "cached", _reused_summary(manifest)
        if manifest:
            _collect(result, *catalog.record(step.name, manifest))
            result.made_by = manifest.get("pipeline_run_id") or manifest.get("run_id")


def _reused_summary(manifest: dict) -> str:
    made_by = manifest.get("pipeline_run_id") or manifest.get("run_id")
    return f"reused, made by run {made_by}" if made_by else "reused"


def _collect(result: RunResult, tags: dict[str, str], metrics: dict[str, float],
             tracking=None, parent=None, new: bool = False) -> None:
    """What the parent run records, as it comes (a later failure keeps what came before).
    New metrics (from a step that ran) are also recorded on the run's logged model."""
    result.tags |= tags
    result.metrics |= metrics
    if tracking is not None:
        if tags:
            tracking.set_tags(parent, tags)
        if metrics:
            model = result.tags.get("trainpipe.model_uri") if new else None
            tracking.log_metrics(parent, metrics, model_uri=model)


def _run_tracked(cfg: DictConfig, overrides: list[str], catalog: Catalog, steps: list[Step],
                 reused: dict[str, dict | None], result: RunResult, on_step, tracker,
                 compute_tags: dict[str, str], on_notice: Callable[[str], None]) -> None:
    """Run the steps that must run, recorded through the tracker process. A step's outputs
    are published in the background while the next step works (the step after it takes
    them from memory): MLflow's run ids, which manifests name, arrive when they arrive."""
    from trainpipe.tracker import PUBLISH_GRACE, STOP_GRACE, WAIT_AFTER_INTERRUPT

    tracking = tracker.open(cfg)
    for step in steps:  # e.g. the plotting backend, imported while earlier steps run
        if reused[step.name] is None and hasattr(step.module, "warm_up"):
            step.module.warm_up()
    parent = tracking.start_pipeline(cfg, overrides, [s.name for s in steps])
    publisher = Publisher()
    publishing: dict = {}  # step -> Future of its outputs, once published
    status = "FAILED"
    try:
        sources = {role: source.describe() for role, source in catalog.sources.items()}
        tracking.log_sources(parent, cfg, sources)
        _collect(result, compute_tags, {}, tracking, parent)
        # what the runner gives steps besides step outputs: the data, the run they are in
        values: dict = {"sources": catalog.sources, "pipeline_run_id": parent}

        def compute(name: str) -> dict:  # an output that is not stored: make it again
            step = next(s for s in STEPS if s.name == name)
            return step.module.run(cfg, **{i: values[i] for i in step.inputs})[0]

        for step, step_result in zip(steps, result.steps, strict=True):
            if reused[step.name] is not None:  # said now, in order; recorded in the background
                step_result.status = "cached"
                step_result.summary = _reused_summary(reused[step.name])
                on_step(step_result)
                publisher.submit(lambda s=step: _reuse(tracking, parent, catalog, s,
                                                       reused[s.name], result))
            else:
                values |= _run_step(cfg, step, step_result, values, catalog, tracking, parent,
                                    compute, result, on_step, publisher, publishing)
            publisher.raise_errors()  # a failed publish stops the run here, not at the end
            tracker.raise_errors()  # likewise a failed write to MLflow
        publisher.drain()
        status = "FINISHED"
    except (KeyboardInterrupt, Interrupted):
        status = "KILLED"
        raise
    finally:  # interrupted: what was computed publishes if it can within PUBLISH_GRACE,
        # then the runs are ended within WAIT_AFTER_INTERRUPT, whatever hangs
        killed = status == "KILLED"
        if killed:
            most = PUBLISH_GRACE + WAIT_AFTER_INTERRUPT + STOP_GRACE
            on_notice(f"interrupted: ending the runs KILLED (at most {most:.0f} s; another "
                      "Ctrl-C waits too)")
        with _uninterrupted():
            publisher.stop(PUBLISH_GRACE if killed else None)
            _settle(result, publisher, killed)
            _finish(tracker, tracking, parent, status, result,
                    WAIT_AFTER_INTERRUPT if killed else None)


def _settle(result: RunResult, publisher: "Publisher", killed: bool) -> None:
    """A step is done once its outputs are published and its run ended FINISHED. A step
    stopped before that (Ctrl-C just as it started, or before its outputs were published)
    has its run ended with the parent's: the summary and the report say so, as MLflow does."""
    for step in result.steps:
        if step.status == "running" or step.status == "done" and step.name not in (
                publisher.ended):
            step.status = "killed" if killed else "failed"


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Publisher:
    """Publishes step outputs one at a time, in order, in a thread of its own."""

    def __init__(self):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue()
        self._errors: list[BaseException] = []
        self.ended: set[str] = set()  # steps whose runs a job ended (FINISHED or FAILED)
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="trainpipe-publish",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], object]):
        """Queue `job`; returns a Future of what it returns."""
        from concurrent.futures import Future

        future: Future = Future()
        self._queue.put((job, future))
        return future

    def raise_errors(self) -> None:
        if self._errors:
            raise self._errors[0]

    def drain(self) -> None:
        """Wait until everything submitted is published; raise the first failure."""
        self._queue.join()
        self.raise_errors()

    def stop(self, timeout: float | None) -> None:
        """Finish what was submitted (steps that finished keep their outputs, also when a
        later one fails or is interrupted), waiting at most `timeout` seconds."""
        self._queue.put(None)
        self._thread.join(timeout)
        with self._lock:
            self._stopped = True

    def end(self, step: StepResult, end_run: Callable[[], object], status: str | None = None
            ) -> None:
        """A job's last word on its step: end its run (and set its status). Once stop() has
        returned, the step is the parent's to end (KILLED): a late job says nothing, so
        what the summary tells and what MLflow records cannot differ."""
        with self._lock:
            if not self._stopped:
                end_run()
                step.status = status or step.status
                self.ended.add(step.name)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, future = item
            try:
                if self._errors:  # an earlier publish failed: that is the error to tell
                    future.set_exception(self._errors[0])
                else:
                    future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - raised in the pipeline's thread
                self._errors.append(exc)
                future.set_exception(exc)
            finally:
                self._queue.task_done()


def _finish(tracker, tracking, parent, status: str, result: RunResult,
            timeout: float | None) -> None:
    """End the runs and wait for the tracker. When the run already failed, that error is
    the one to report: the tracker's own troubles then only stop it."""
    import sys

    failing = sys.exc_info()[1] is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        _write_report(tracking, parent, status, result, sys.exc_info()[1], _left(deadline))
        tracking.end_open_runs(status)
        tracker.close(_left(deadline))
        result.run_id = parent.result(0)
    except BaseException:
        tracker.discard()
        if parent.done() and parent._error is None:
            result.run_id = parent.result(0)
        if not failing:
            raise


def _write_report(tracking, parent, status: str, result: RunResult,
                  error: BaseException | None, timeout: float | None) -> None:
    """report.html on the parent run, built by the tracker from what it recorded, before
    the runs end. A page that cannot be made is said, never the run's failure."""
    from dataclasses import asdict

    from trainpipe.errors import TrainpipeError

    why = None
    if isinstance(error, KeyboardInterrupt):
        why = "interrupted (Ctrl-C)"
    elif error is not None:
        why = str(error) if isinstance(error, TrainpipeError | Interrupted) else (
            f"{type(error).__name__}: {error}")
        why = "\n".join([why, *getattr(error, "__notes__", [])])
    written = tracking.write_report(parent, status, time.monotonic() - result.started,
                                    [asdict(r) for r in result.steps], why)
    try:
        result.report = written.result(timeout)
    except Exception as exc:  # noqa: BLE001 - the run's own outcome stands
        result.report_problem = f"{type(exc).__name__}: {exc}"


def _reuse(tracking, parent, catalog: Catalog, step: Step, manifest: dict,
           result: RunResult) -> None:
    """A reused step makes no run of its own: the parent run lists it (its fingerprint and
    the run that made its output)."""
    if manifest:
        made_by = manifest.get("pipeline_run_id") or manifest.get("run_id") or "?"
        tags, metrics = catalog.record(step.name, manifest)
        tags[f"trainpipe.reused.{step.name}"] = (
            f"fingerprint {catalog.fingerprints[step.name]}, made by run {made_by}")
        _collect(result, tags, metrics, tracking, parent)


def _run_step(cfg, step: Step, step_result: StepResult, values: dict, catalog: Catalog,
              tracking, parent, compute, result: RunResult, on_step, publisher,
              publishing: dict) -> dict:
    step_result.status = "running"
    on_step(step_result)
    start = time.perf_counter()
    run = tracking.start_step(step.name, catalog.fingerprints[step.name], parent)
    try:
        for name in step.inputs:
            if name not in values and PRODUCER.get(name) in publishing:
                # made in this run, and known once published (a model's URI): wait for it
                values |= publishing[PRODUCER[name]].result()
            if name not in values:
                values[name] = catalog.load(name, compute)
        try:
            inputs = {n: values[n] for n in step.inputs}
            inputs = {n: v.result() if isinstance(v, Pending) else v for n, v in inputs.items()}
            if in_tracker(step, cfg):
                outputs, report = tracking.run_step(step.module.__name__, inputs).result()
            else:
                outputs, report = step.module.run(cfg, **inputs)
            report = report.finishing()  # e.g. plots, drawn while the next step works
            outputs = catalog.materialize(step.name, outputs)  # compute=dask: parts written
        except Exception as exc:
            _record_failure_report(tracking, run, exc)
            raise
        step_result.status, step_result.summary = "done", report.summary
    except (KeyboardInterrupt, Interrupted):
        step_result.status = "killed"  # the parent's end takes every open run with it
        raise
    except BaseException:
        step_result.status = "failed"
        tracking.end_run(run, "FAILED")
        raise
    finally:
        step_result.seconds = time.perf_counter() - start
        on_step(step_result)
    publishing[step.name] = publisher.submit(lambda: _publish(
        step, dict(outputs), report, run, parent, catalog, tracking, result, step_result,
        publisher))
    return outputs


def in_tracker(step: Step, cfg: DictConfig) -> bool:
    """A step that works in MLflow itself (register: the registry is its output) runs in the
    tracker process, where MLflow is imported and its store open already; not with
    compute=dask, whose tables live on the cluster this process is connected to."""
    return getattr(step.module, "IN_TRACKER", False) and not cluster.enabled(cfg)


def _publish(step: Step, outputs: dict, report, run, parent, catalog: Catalog, tracking,
             result: RunResult, step_result: StepResult, publisher: "Publisher") -> dict:
    """A step's outputs into the lake (and its model into MLflow), its report onto its run.
    Returns the outputs with what publishing made of them (the logged model's URI)."""
    try:
        manifest = {}
        if catalog.publishes(step.name):
            manifest = catalog.save(
                step.name, outputs, lambda model, example: tracking.log_model(
                    run, model, example).result(), run_id=run.result(),
                pipeline_run_id=parent.result())
        tracking.record(run, _told(report.finished(), step_result))
        if manifest:
            _collect(result, *catalog.record(step.name, manifest), tracking, parent, new=True)
        publisher.end(step_result, lambda: tracking.end_run(run, "FINISHED"))
        return outputs
    except BaseException:
        publisher.end(step_result, lambda: tracking.end_run(run, "FAILED"), "failed")
        raise


def _told(report, step_result: StepResult):
    """The report with what the terminal told of the step, for the run report's page."""
    from dataclasses import replace

    from trainpipe.report import step_tags

    return replace(report, tags=report.tags | step_tags(step_result.summary,
                                                        step_result.seconds))


def _record_failure_report(tracking, run, exc: Exception) -> None:
    """Errors that carry a report (validation) leave it on the failed step's run."""
    if getattr(exc, "report", None) is not None:
        tracking.record(run, exc.report)
        where = tracking.artifact_uri(run).result()
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
def _signals_handled(handlers: dict) -> Iterator[None]:
    """`handlers` (signal -> handler) while the block runs, the previous ones after."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _uninterrupted():
    """While the runs are being ended, Ctrl-C and SIGTERM wait: a second Ctrl-C, pressed
    because the first seemed slow, would otherwise stop the ending halfway and leave runs
    RUNNING or never written. The waits inside are bounded."""
    return _signals_handled({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN})


def sigterm_interrupts():
    """SIGTERM unwinds like Ctrl-C, so runs end KILLED instead of staying RUNNING."""

    def interrupt(signum, frame):
        raise Interrupted("terminated by SIGTERM")

    return _signals_handled({signal.SIGTERM: interrupt})
