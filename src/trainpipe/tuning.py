"""trainpipe tune: an Optuna study over `model.search_space`, every trial an MLflow run.

    tune parent run (trainpipe.kind=tune)
      ├── trial-0   params, val_* metrics, state, seconds      (one nested run a trial)
      ├── trial-1   ...                                        (pruned: KILLED, failed: FAILED)
      └── plots: optimisation history, parameter importance

The data steps come from the cache: the command first runs the pipeline up to `features`
the normal way; a trial then fits the estimator on the published training features and
scores it on the validation split (the test split is never looked at during the search).

The study lives in a database of its own beside the tracking store (`default_storage`):
Optuna and MLflow both keep an `alembic_version` table and each refuses the other's. Any
number of processes, here (`--workers`) or on other machines, can work on one study. Each
worker beats a heartbeat; a worker that dies leaves its trial RUNNING until another process
sees the heartbeat stop and fails it (its MLflow run ends FAILED too: `_trial_died`).
"""

import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from omegaconf import DictConfig, OmegaConf

from trainpipe.config import did_you_mean, psycopg2_url, tracking_uri
from trainpipe.errors import ConfigError, Interrupted, TrainpipeError
from trainpipe.redaction import redact_uri
from trainpipe.steps import evaluate

# Which way each validation metric is better (evaluate.metrics_of names them).
HIGHER_IS_BETTER = {"roc_auc": True, "accuracy_score": True, "precision": True, "recall": True,
                    "f1_score": True, "r2_score": True, "log_loss": False,
                    "root_mean_squared_error": False, "mean_absolute_error": False}
TASK_METRICS = {"binary": ("roc_auc", "log_loss", "accuracy_score", "precision", "recall",
                           "f1_score"),
                "multiclass": ("f1_score", "log_loss", "accuracy_score"),
                "regression": ("root_mean_squared_error", "mean_absolute_error", "r2_score")}
# LightGBM's own name of a metric it can report while it fits (the pruner's intermediate
# scores); None: the metric has no LightGBM counterpart, the trial runs unpruned.
LIGHTGBM_METRICS = {("binary", "roc_auc"): "auc", ("binary", "log_loss"): "binary_logloss",
                    ("multiclass", "log_loss"): "multi_logloss",
                    ("regression", "root_mean_squared_error"): "rmse",
                    ("regression", "mean_absolute_error"): "l1"}
# Intermediate scores a LightGBM fit reports to the pruner: each is a write to the study's
# database and a read of the other trials (tens of ms), so a handful, not one a tree.
REPORTS_PER_FIT = 5
MAX_REPLACEMENTS = 3  # a worker killed by a signal is replaced at most this often
TRIAL_ATTR = "trainpipe"  # the trial's user attribute: its worker, pid, MLflow run


class TuneError(TrainpipeError):
    """The search could not be done (a worker failed, no trial completed)."""

    exit_code = 1


@dataclass(frozen=True)
class Plan:
    """What a `trainpipe tune` searches, where it keeps the study, and what it optimises."""

    study: str
    storage: str  # SQLAlchemy URL, with any password: never print it, print `shown`
    metric: str  # a validation metric, without val_
    direction: str  # maximize | minimize
    space: dict  # parameter -> its spec (model.search_space as plain data)
    trials: int

    @property
    def shown(self) -> str:
        return redact_uri(self.storage)


# ------------------------------------------------------------------------ the plan and checks


def plan(cfg: DictConfig) -> Plan:
    """The tuning plan of a config; every problem is a ConfigError naming its key, raised
    before any trial starts."""
    declared = cfg.model.get("search_space")
    space = OmegaConf.to_container(declared, resolve=True) if declared is not None else {}
    if not space:
        raise ConfigError(f"model.search_space: {cfg.model.name} has no parameters to search; "
                          "add some, e.g. +model.search_space.max_depth='{type: int, low: 3, "
                          "high: 12}'")
    if cfg.compute.engine != "local":
        raise ConfigError("compute=dask: trainpipe tune runs on compute=local (each trial fits "
                          "in one process); use trainpipe run compute=dask for the final model")
    check_estimator_takes(cfg, space)
    metric = cfg.tune.metric or evaluate.PRIMARY[cfg.dataset.task][0]
    known = TASK_METRICS[cfg.dataset.task]
    if metric not in known:
        raise ConfigError(f"tune.metric={metric!r}: not a validation metric of a "
                          f"{cfg.dataset.task} task; one of {', '.join(known)}")
    direction = cfg.tune.direction or ("maximize" if HIGHER_IS_BETTER[metric] else "minimize")
    storage = str(cfg.tune.storage) if cfg.tune.storage else default_storage(cfg)
    study = cfg.tune.study or f"{cfg.dataset.name}-{cfg.model.name}"
    return Plan(study, psycopg2_url(storage), metric, direction, space, int(cfg.tune.trials))


def check_estimator_takes(cfg: DictConfig, space: dict) -> None:
    """Every searched parameter is one the estimator takes, and it accepts the ends of each
    range (a tiny fit for estimators that only say so when they fit: train.check)."""
    from trainpipe.steps import train

    cls = train.estimator_class(cfg.model._target_)
    takes = set(cls().get_params())
    for name in space:
        if name not in takes:
            raise ConfigError(f"model.search_space.{name}: {cfg.model._target_} takes no "
                              f"parameter {name!r}{did_you_mean(name, takes)}")
    for end in (0, -1):  # the lowest and the highest point of the space
        point = {name: _end(spec, end) for name, spec in space.items()}
        try:
            train.check(with_params(cfg, point))
        except ConfigError as exc:
            raise ConfigError(f"model.search_space: at {point}: {exc}") from None


def _end(spec: dict, end: int):
    if spec["type"] == "categorical":
        return spec["choices"][end]
    return spec["low"] if end == 0 else spec["high"]


def with_params(cfg: DictConfig, params: dict) -> DictConfig:
    """A copy of the config whose model.params include `params`."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for name, value in params.items():
        copy.model.params[name] = value
    return copy


def default_storage(cfg: DictConfig) -> str:
    """The study's database beside the tracking store's: SQLite `…/mlflow.db` ->
    `…/optuna.db`; PostgreSQL `…/db` -> `…/db_optuna` on the same server."""
    from trainpipe.tracking import sqlite_path

    uri = tracking_uri(cfg)
    path = sqlite_path(uri)
    if path is not None:
        return f"sqlite:///{path.parent / 'optuna.db'}"
    if uri.startswith("postgresql"):
        return study_database(uri)
    raise ConfigError(f"tune.storage: no default beside tracking.uri={redact_uri(uri)} (only "
                      "beside an SQLite or PostgreSQL store); give one, e.g. "
                      "tune.storage=postgresql://user@host/mlflow_optuna")


def study_database(uri: str) -> str:
    """The database beside a PostgreSQL one (`…/db` -> `…/db_optuna`, same server): where
    studies live, never in MLflow's own (both keep alembic_version). `stack up` makes it."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}_optuna"))


def ensure_storage(storage: str) -> None:
    """Create the study's database when it is missing: the folder of an SQLite file (the
    file Optuna makes), or the PostgreSQL database (on the server of the URL)."""
    from pathlib import Path

    if storage.startswith("sqlite:///"):
        database = storage.removeprefix("sqlite:///").split("?", 1)[0]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    elif storage.startswith("postgresql"):
        _ensure_postgres_database(storage)


def _ensure_postgres_database(storage: str) -> None:
    import psycopg2
    from psycopg2 import errors, sql

    parts = urlsplit(storage)
    name = parts.path.lstrip("/")
    libpq = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    try:
        conn = psycopg2.connect(libpq, connect_timeout=10)
    except psycopg2.Error:  # no access to the maintenance database: try the study's own
        conn = None
    if conn is None:
        return  # Optuna connects to it next and says what is wrong
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except errors.DuplicateDatabase:
        pass  # another machine made it meanwhile
    except psycopg2.Error as exc:
        raise ConfigError(f"tune.storage: the database {name!r} is missing and cannot be "
                          f"created on {redact_uri(storage)} ({' '.join(str(exc).split())}); "
                          f"create it (createdb {name}) or give tune.storage") from None
    finally:
        conn.close()


# ------------------------------------------------------------------------------ the study


def storage_of(url: str, heartbeat: int, tracking: str | None = None):
    """Optuna's RDB storage with heartbeats; `tracking`: the tracking URI whose trial runs
    a process that finds a dead worker's trial ends FAILED."""
    import optuna

    kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite"):  # workers write at once: wait for the lock, not fail
        kwargs = {"connect_args": {"timeout": 60}}
    callback = _TrialDied(tracking) if tracking else None
    with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                          heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                          heartbeat_stale_trial_callback=callback)


def open_study(the_plan: Plan, cfg: DictConfig, worker: int = 0, tracking: str | None = None):
    """The study (created when missing: a same command again adds trials to it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # constant_liar: parallel workers do not all sample next to the same running trial
    sampler = optuna.samplers.TPESampler(seed=int(cfg.seed) + worker, constant_liar=True)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=5,
                                          n_warmup_steps=1)
              if cfg.tune.pruner else optuna.pruners.NopPruner())
    storage = storage_of(the_plan.storage, int(cfg.tune.heartbeat), tracking)
    try:
        study = optuna.create_study(study_name=the_plan.study, storage=storage,
                                    load_if_exists=True, direction=the_plan.direction,
                                    sampler=sampler, pruner=pruner)
    except Exception as exc:  # noqa: BLE001 - a database that cannot hold a study
        raise ConfigError(f"tune.storage={the_plan.shown}: cannot open the study "
                          f"({' '.join(str(exc).split())[:300]})") from None
    if study.direction.name.lower() != the_plan.direction:
        raise ConfigError(f"tune.study={the_plan.study}: the study exists and "
                          f"{study.direction.name.lower()}s; this config {the_plan.direction}s "
                          f"val_{the_plan.metric} (another tune.study, or tune.direction)")
    return study


class _TrialDied:
    """Optuna's failed-trial callback: a trial whose worker stopped beating is FAIL; its
    MLflow run, left RUNNING by the dead worker, ends FAILED with the reason."""

    def __init__(self, tracking: str):
        self.tracking = tracking

    def __call__(self, study, trial) -> None:
        run_id = (trial.user_attrs.get(TRIAL_ATTR) or {}).get("mlflow_run_id")
        if not run_id:
            return
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking)
        client.set_tag(run_id, "trainpipe.trial.state", "FAIL")
        client.set_tag(run_id, "trainpipe.trial.error", "its worker stopped (no heartbeat)")
        client.set_terminated(run_id, "FAILED")


# ------------------------------------------------------------------------------ one worker


@dataclass(frozen=True)
class Worker:
    """What a worker process needs; plain data, so it crosses a spawn."""

    config: dict  # the resolved config
    plan: Plan
    parent_run_id: str
    experiment_id: str
    batch: str  # this command's id: its trials carry it
    label: str  # this worker's name in the batch (w0, w1, w1r1 for a replacement)
    trials: int
    threads: int | None  # n_jobs for the estimator; None: as configured
    index: int = 0


def run_worker(worker: Worker) -> None:
    """Run `worker.trials` trials of the study (the entry point of a worker process)."""
    from trainpipe.tracking import Tracking

    cfg = OmegaConf.create(worker.config)
    tracking = Tracking(cfg)
    study = open_study(worker.plan, cfg, worker.index, tracking.uri)
    data = _validation_data(cfg)
    objective = _Objective(worker, cfg, tracking.client, data)
    study.optimize(objective, n_trials=worker.trials, timeout=cfg.tune.timeout,
                   catch=(Exception,), callbacks=[_progress(worker)], gc_after_trial=False)


def _validation_data(cfg: DictConfig) -> dict:
    """The published training and validation features (the pipeline made them)."""
    from trainpipe import pipeline
    from trainpipe.steps import ingest

    catalog = pipeline.catalog_for(cfg, ingest.read_sources(cfg))
    features = catalog.load("features", lambda step: {})
    target = cfg.dataset.target
    return {split: (features[split].drop(columns=[target]), features[split][target])
            for split in ("train", "val")}


def suggest(trial, space: dict) -> dict:
    """A point of the search space, sampled by the trial."""
    point = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            point[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif kind == "int":
            point[name] = trial.suggest_int(name, spec["low"], spec["high"],
                                            step=spec.get("step") or 1, log=spec.get("log", False))
        else:
            point[name] = trial.suggest_float(name, spec["low"], spec["high"],
                                              step=spec.get("step"), log=spec.get("log", False))
    return point


class _Objective:
    """One trial: sample, fit on train, score on val; its nested MLflow run records it."""

    def __init__(self, worker: Worker, cfg: DictConfig, client, data: dict):
        self.worker, self.cfg, self.client, self.data = worker, cfg, client, data
        self.task = cfg.dataset.task

    def __call__(self, trial) -> float:
        import optuna

        point = suggest(trial, self.worker.plan.space)
        params = self._params(point)
        run_id = self._start_run(trial, params)
        trial.set_user_attr(TRIAL_ATTR, {"batch": self.worker.batch, "worker": self.worker.label,
                                         "pid": os.getpid(), "host": socket.gethostname(),
                                         "mlflow_run_id": run_id})
        start = time.perf_counter()
        curve: list[tuple[int, float]] = []
        try:
            estimator, fit_seconds = self._fit(trial, params, curve)
            metrics = self._score(estimator)
        except optuna.TrialPruned:
            self._end_run(run_id, "PRUNED", start, curve, {})
            raise
        except Exception as exc:
            self._end_run(run_id, "FAIL", start, curve, {}, f"{type(exc).__name__}: {exc}")
            raise
        except BaseException as exc:  # Ctrl-C, SIGTERM: the trial did not end by itself
            self._end_run(run_id, "FAIL", start, curve, {}, "interrupted")
            if isinstance(exc, Interrupted):  # Optuna fails a trial on KeyboardInterrupt only
                raise KeyboardInterrupt(str(exc)) from exc
            raise
        metrics["fit_seconds"] = fit_seconds
        self._end_run(run_id, "COMPLETE", start, curve, metrics)
        return metrics[f"val_{self.worker.plan.metric}"]

    def _params(self, point: dict) -> dict:
        params = OmegaConf.to_container(self.cfg.model.get("params") or {}, resolve=True)
        if self.worker.threads is not None and "n_jobs" in params:
            params["n_jobs"] = self.worker.threads  # workers share the cores
        return params | point

    def _start_run(self, trial, params: dict) -> str:
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": self.worker.parent_run_id, "trainpipe.kind": "tune-trial",
                "trainpipe.tune.study": self.worker.plan.study,
                "trainpipe.trial.number": str(trial.number),
                "trainpipe.trial.worker": self.worker.label,
                "trainpipe.host": socket.gethostname(), "trainpipe.pid": str(os.getpid())}
        run_id = self.client.create_run(self.worker.experiment_id, run_name=f"trial-{trial.number}",
                                        tags=tags).info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run_id

    def _fit(self, trial, params: dict, curve: list) -> tuple[object, float]:
        from trainpipe.steps.train import estimator_class

        estimator = estimator_class(self.cfg.model._target_)(**params)
        x, y = self.data["train"]
        start = time.perf_counter()
        fit_kwargs = self._pruning(trial, estimator, params, curve)
        estimator.fit(x, y, **fit_kwargs)
        return estimator, time.perf_counter() - start

    def _pruning(self, trial, estimator, params: dict, curve: list) -> dict:
        """LightGBM reports its validation score as it adds trees: the median pruner stops a
        trial that lags the others at the same iteration."""
        name = LIGHTGBM_METRICS.get((self.task, self.worker.plan.metric))
        if name is None or not type(estimator).__module__.startswith("lightgbm"):
            return {}
        trees = int(params.get("n_estimators", 100))
        every = max(1, trees // REPORTS_PER_FIT)
        pruning = bool(self.cfg.tune.pruner)

        def report(env) -> None:
            import optuna

            done = env.iteration + 1
            if done % every or done >= trees:  # the last score is the trial's value
                return
            value = next(v for _, n, v, _ in env.evaluation_result_list if n == name)
            curve.append((done, value))
            if pruning:
                trial.report(value, done // every)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after {done} iterations")

        x, y = self.data["val"]
        return {"eval_X": (x,), "eval_y": (y,), "eval_names": ["val"], "eval_metric": name,
                "callbacks": [report]}

    def _score(self, estimator) -> dict[str, float]:
        x, y = self.data["val"]
        pred, proba = evaluate.predict(estimator, x, self.task)
        classes = getattr(estimator, "classes_", None)
        positive = evaluate.positive_class(self.cfg.dataset, classes)
        scores = evaluate.metrics_of(self.task, y, pred, proba, classes, positive)
        return {f"val_{k}": float(v) for k, v in scores.items()}

    def _end_run(self, run_id: str, state: str, start: float, curve: list, metrics: dict,
                 error: str | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, 0) for k, v in metrics.items()]
        rows.append(Metric("trial_seconds", time.perf_counter() - start, now, 0))
        by_iteration = f"val_{self.worker.plan.metric}_by_iteration"
        rows += [Metric(by_iteration, value, now, step) for step, value in curve]
        tags = [RunTag("trainpipe.trial.state", state)]
        if error:
            tags.append(RunTag("trainpipe.trial.error", error[:5000]))
        self.client.log_batch(run_id, metrics=rows, tags=tags)
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run_id, status)


def _progress(worker: Worker) -> Callable:
    """One line a finished trial: its state, score, the study's best so far."""
    metric = f"val_{worker.plan.metric}"

    def show(study, trial) -> None:
        seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
                   if trial.datetime_complete and trial.datetime_start else 0.0)
        value = f"{metric} {trial.value:.4f}" if trial.value is not None else ""
        try:
            leader = study.best_trial  # one query (best_value would be a second)
            best = f"best {leader.value:.4f} (trial {leader.number})"
        except ValueError:  # no trial completed yet
            best = ""
        print(f"  trial {trial.number:>4} {trial.state.name:<8} {value:<24} {best:<28} "
              f"{seconds:6.2f}s  {worker.label}", flush=True)

    return show


# -------------------------------------------------------------------------- many workers


@dataclass
class SearchResult:
    parent_run_id: str
    batch: str
    counts: dict[str, int] = field(default_factory=dict)  # this command's trials by state
    best_number: int | None = None
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    total_trials: int = 0  # in the whole study (earlier commands, other machines)
    seconds: float = 0.0
    replaced: list[str] = field(default_factory=list)  # workers killed and replaced


def search(cfg: DictConfig, overrides: list[str], the_plan: Plan, workers: int,
           echo: Callable[[str], None] = print) -> SearchResult:
    """Run this command's trials on `workers` processes (1: in this process), record them
    under one tune parent run, and return what was found."""
    from trainpipe.tracking import Tracking

    ensure_storage(the_plan.storage)
    tracking = Tracking(cfg)
    study = open_study(the_plan, cfg, tracking=tracking.uri)  # made once, before the workers
    parent, experiment_id = _start_parent(tracking, cfg, overrides, the_plan, workers)
    batch = uuid.uuid4().hex[:12]
    result = SearchResult(parent, batch)
    started = time.monotonic()
    status = "FAILED"
    try:
        base = Worker(OmegaConf.to_container(cfg, resolve=True), the_plan, parent,
                      experiment_id, batch, "w0", the_plan.trials, _threads(cfg, workers))
        if workers == 1:
            run_worker(base)
        else:
            _run_processes(base, workers, study, result, echo)
        _fail_dead_trials(study, batch, int(cfg.tune.heartbeat), bool(result.replaced))
        result.seconds = time.monotonic() - started
        _summarise(study, batch, result)
        _record_search(tracking, parent, study, the_plan, result)
        status = "FINISHED"
    except (KeyboardInterrupt, Interrupted):
        status = "KILLED"
        raise
    finally:
        tracking.client.set_terminated(parent, status)
    if result.best_number is None:
        raise TuneError(f"no trial of study {the_plan.study} completed; see the trial runs "
                        f"under tune run {parent}")
    return result


def _threads(cfg: DictConfig, workers: int) -> int | None:
    """With several workers, n_jobs=-1 in each would fight over the cores: share them."""
    n_jobs = (cfg.model.get("params") or {}).get("n_jobs")
    if workers == 1 or n_jobs is None or n_jobs > 0:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def _start_parent(tracking, cfg: DictConfig, overrides: list[str], the_plan: Plan,
                  workers: int) -> tuple[str, str]:
    import mlflow
    from mlflow.entities import Param

    from trainpipe.redaction import redact_text

    experiment_id = mlflow.set_experiment(tracking.experiment).experiment_id
    tags = {"trainpipe.kind": "tune", "trainpipe.dataset": cfg.dataset.name,
            "trainpipe.model": cfg.model.name, "trainpipe.tune.study": the_plan.study,
            "trainpipe.tune.storage": the_plan.shown,
            "trainpipe.overrides": " ".join(redact_text(o) for o in overrides),
            "trainpipe.host": socket.gethostname(), "trainpipe.pid": str(os.getpid())}
    run_id = tracking.client.create_run(experiment_id, run_name=f"tune-{the_plan.study}",
                                        tags=tags).info.run_id
    params = {"tune.trials": the_plan.trials, "tune.workers": workers,
              "tune.metric": f"val_{the_plan.metric}", "tune.direction": the_plan.direction,
              "tune.pruner": cfg.tune.pruner, "tune.timeout": cfg.tune.timeout,
              "model.estimator": cfg.model._target_,
              "tune.search_space": json.dumps(the_plan.space, sort_keys=True)}
    tracking.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run_id, experiment_id


def _run_processes(base: Worker, workers: int, study, result: SearchResult,
                   echo: Callable[[str], None]) -> None:
    """`workers` spawned processes share this command's trials; one killed by a signal is
    replaced by one that runs what it left (its running trial fails by heartbeat)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked MLflow/DB connections
    shares = [base.trials // workers + (i < base.trials % workers) for i in range(workers)]
    running = {}
    for i, share in enumerate(shares):
        if share:
            worker = _replace(base, label=f"w{i}", trials=share, index=i)
            running[worker.label] = (worker, _spawn(context, worker), 0)
    try:
        while running:
            time.sleep(0.2)
            for label, (worker, process, replaced) in list(running.items()):
                if process.is_alive():
                    continue
                del running[label]
                if process.exitcode == 0:
                    continue
                if process.exitcode > 0 or replaced >= MAX_REPLACEMENTS:
                    raise TuneError(f"tuning worker {label} (pid {process.pid}) failed with "
                                    f"exit code {process.exitcode}; its output is above")
                left = worker.trials - _finished(study, base.batch, label)
                echo(f"  ! worker {label} (pid {process.pid}) was killed (signal "
                     f"{-process.exitcode}); its running trial fails by heartbeat; "
                     f"{left} trial(s) left for a new worker")
                result.replaced.append(label)
                if left > 0:
                    new = _replace(worker, label=f"{label}r{replaced + 1}", trials=left)
                    running[new.label] = (new, _spawn(context, new), replaced + 1)
    except BaseException:
        for _, process, _ in running.values():
            process.terminate()  # SIGTERM: a worker ends its trial run, then exits
        for _, process, _ in running.values():
            process.join(15)
        raise


def _replace(worker: Worker, **changes) -> Worker:
    from dataclasses import replace

    return replace(worker, **changes)


def _spawn(context, worker: Worker):
    process = context.Process(target=_worker_process, args=(worker,), name=worker.label)
    process.start()
    return process


def _worker_process(worker: Worker) -> None:
    """A spawned worker: SIGTERM unwinds as an interruption (its trial run ends)."""
    import signal
    import sys

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        run_worker(worker)
    except KeyboardInterrupt:
        sys.exit(130)
    except TrainpipeError as exc:
        from trainpipe.redaction import redact_text

        print(redact_text(f"worker {worker.label}: {exc}"), file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


def _batch_trials(study, batch: str, label: str | None = None) -> list:
    trials = []
    for trial in study.get_trials(deepcopy=False):
        attr = trial.user_attrs.get(TRIAL_ATTR) or {}
        if attr.get("batch") == batch and (label is None or attr.get("worker") == label):
            trials.append(trial)
    return trials


def _finished(study, batch: str, label: str) -> int:
    return sum(t.state.is_finished() for t in _batch_trials(study, batch, label))


def _fail_dead_trials(study, batch: str, heartbeat: int, a_worker_died: bool) -> None:
    """A killed worker's trial is RUNNING until its heartbeat is older than the grace
    period; when no later trial started to notice, this command waits and fails it."""
    import optuna

    if not a_worker_died:
        return
    deadline = time.monotonic() + 2 * heartbeat + heartbeat + 10
    while time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if not any(t.state.name == "RUNNING" for t in _batch_trials(study, batch)):
            return
        time.sleep(1)


def _summarise(study, batch: str, result: SearchResult) -> None:
    counts: dict[str, int] = {}
    for trial in _batch_trials(study, batch):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    result.counts = counts
    result.total_trials = len(study.get_trials(deepcopy=False))
    try:
        best = study.best_trial
    except ValueError:
        return
    result.best_number, result.best_value, result.best_params = (
        best.number, best.value, dict(best.params))


def _record_search(tracking, parent: str, study, the_plan: Plan, result: SearchResult) -> None:
    """On the tune parent: the counts, the best trial, and the plots of the search."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = {f"trials_{state.lower()}": n for state, n in result.counts.items()}
    metrics["trials_in_study"] = result.total_trials
    metrics["search_seconds"] = result.seconds
    if result.best_value is not None:
        metrics[f"best_val_{the_plan.metric}"] = result.best_value
    tracking.client.log_batch(parent, metrics=[Metric(k, float(v), now, 0)
                                               for k, v in metrics.items()])
    if result.best_number is not None:
        tracking.client.set_tag(parent, "trainpipe.tune.best_trial", str(result.best_number))
        tracking.client.set_tag(parent, "trainpipe.tune.best_params",
                                json.dumps(result.best_params, sort_keys=True))
    tracking._log_files(parent, plots(study, the_plan))


# ---------------------------------------------------------------------------------- plots


def plots(study, the_plan: Plan) -> dict[str, bytes]:
    """The search as PNGs, drawn on matplotlib Figures (no pyplot): the optimisation history
    and, with two or more completed trials, each parameter's importance."""
    from trainpipe.steps.evaluate import PLOT_SIZE, _png

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        return {}
    about = f"study {the_plan.study}"
    metric = f"val_{the_plan.metric}"
    maximize = the_plan.direction == "maximize"
    files = {"optimization_history.png": _png(
        lambda ax: _history(ax, done, metric, maximize),
        f"Optimisation history\n{about} · {len(done)} completed trials", PLOT_SIZE)}
    importances = _importances(study)
    if importances:
        files["param_importances.png"] = _png(
            lambda ax: _importance(ax, importances),
            f"Parameter importance for {metric} (Optuna's PED-ANOVA)\n{about} · "
            f"{len(done)} completed trials", PLOT_SIZE)
    return files


def _history(ax, trials: list, metric: str, maximize: bool) -> None:
    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    best, so_far = [], None
    for value in values:
        so_far = value if so_far is None else (max if maximize else min)(so_far, value)
        best.append(so_far)
    ax.scatter(numbers, values, s=14, alpha=0.7, label="trial")
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(metric)
    ax.legend(loc="best")


def _importances(study) -> dict[str, float]:
    import optuna

    try:
        with warnings.catch_warnings():  # "few trials in some regimes": the plot says how many
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # too few trials, or a single value in the space
        return {}


def _importance(ax, importances: dict[str, float]) -> None:
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (normalised: they sum to 1)")


# ---------------------------------------------------------------------------- the end


def best_overrides(cfg: DictConfig, overrides: list[str], params: dict) -> list[str]:
    """The command's overrides (tune.* aside, searched params replaced) then the best
    params: what `trainpipe run` takes to train the best model again."""
    searched = {f"model.params.{name}" for name in params}
    kept = [o for o in overrides if not o.lstrip("+~").startswith("tune.")
            and o.lstrip("+~").split("=", 1)[0] not in searched]
    configured = set(cfg.model.get("params") or {})
    return kept + [f"{'' if name in configured else '+'}model.params.{name}="
                   f"{_override_value(v)}" for name, v in params.items()]


def _override_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"'{value}'" if any(c in value for c in " ,=[]{}'\"") else value
    return repr(value)


def link_final(cfg: DictConfig, parent: str, study: str, final_run_id: str | None) -> None:
    """The final pipeline run names its study; the tune run names its final run."""
    if final_run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    client.set_tag(final_run_id, "trainpipe.tune.study", study)
    client.set_tag(final_run_id, "trainpipe.tune.run_id", parent)
    client.set_tag(parent, "trainpipe.tune.final_run_id", final_run_id)
