"""MLflow wiring: one parent run per pipeline run, one child run per step.

Runs always end in a true state: FINISHED on success, FAILED on an error, KILLED on
Ctrl-C or SIGTERM. Everything written here passes through redaction first.
"""

import errno
import fcntl
import functools
import json
import os
import platform
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from omegaconf import DictConfig, OmegaConf

import trainpipe
from trainpipe.config import tracking_uri
from trainpipe.errors import Interrupted, TrainpipeError
from trainpipe.redaction import redact_text, redact_uri, shorten
from trainpipe.steps import Report

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
TAG_LIMIT = 5000  # characters of a long tag (an error); MLflow takes 8000 on runs
BATCH = 100  # MLflow's limit on params per log_batch
PACKAGES = ("mlflow", "scikit-learn", "pandas", "numpy", "pyarrow", "cloudpickle", "lightgbm",
            "pandera", "hydra-core")
# What a logged model needs to load: the estimator's package is added to these.
MODEL_REQUIREMENTS = ("mlflow", "scikit-learn", "pandas", "numpy", "pyarrow", "cloudpickle")
MODULE_PACKAGES = {"sklearn": "scikit-learn", "lightgbm": "lightgbm", "xgboost": "xgboost"}


def quiet_mlflow() -> None:
    """trainpipe reports for itself; MLflow's hints about int columns, pickle formats and
    table creation would bury the summary."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    # a progress bar per downloaded file (a model's input example for serve's curl line)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")


class Tracking:
    """The pipeline's runs in an MLflow store: a parent run per pipeline run, a child run per
    step that runs. Runs are made and ended with the client alone (no fluent active run), so
    a tracker process can hold several at once and end them whatever happens."""

    def __init__(self, cfg: DictConfig, pid: int | None = None):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.experiment = str(cfg.tracking.experiment)
        self.pid = pid or os.getpid()  # the pipeline's process (a tracker runs beside it)
        self._open: list[str] = []  # runs started here and not ended yet
        self._steps: dict[str, str] = {}  # step name -> its run, started here
        from trainpipe.supervise import check_tracking_server

        check_tracking_server(self.uri)  # fail fast (not after MLflow's minutes of retries)
        quiet_mlflow()
        # MLflow prints "View run ... at <tracking URI>" (password included) per run
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if self.uri.startswith(("http://", "https://")):  # bound MLflow's minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # each try, in seconds
        mlflow.set_tracking_uri(self.uri)
        create_sqlite_stores_atomically()

    @functools.cached_property
    def client(self) -> MlflowClient:
        """Made on first use: MlflowClient opens the store (creating it the first time), and a
        run that fails before any work leaves no new store behind."""
        return MlflowClient(self.uri)

    def start_pipeline(self, cfg: DictConfig, overrides: list[str], steps: list[str]) -> str:
        """The parent run; under `mlflow run` it is the run MLflow already created."""
        resume = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
        if resume:
            self.experiment_id = self.client.get_run(resume).info.experiment_id
        else:
            self.experiment_id = mlflow.set_experiment(self.experiment).experiment_id
        self._end_stale_runs()
        tags = {"trainpipe.kind": "pipeline", "trainpipe.version": trainpipe.__version__,
                "trainpipe.dataset": cfg.dataset.name, "trainpipe.model": cfg.model.name,
                "trainpipe.steps": ",".join(steps),
                "trainpipe.overrides": " ".join(redact_text(o) for o in overrides)}
        tags |= _source_tags() | _git_tags() | self._process_tags()
        run_id = self._start(f"{cfg.dataset.name}-{cfg.model.name}", tags, resume)
        params = flat_params(cfg)
        for i in range(0, len(params), BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params[i:i + BATCH]])
        self._log_files(run_id, {
            "config.yaml": OmegaConf.to_yaml(redact_config(cfg)).encode(),
            "environment.json": json.dumps(_environment(), indent=2).encode()})
        return run_id

    def start_step(self, name: str, fingerprint: str, parent: str) -> str:
        tags = {"trainpipe.step": name, "trainpipe.fingerprint": fingerprint,
                "mlflow.parentRunId": parent, **self._process_tags(), **_source_tags()}
        self._steps[name] = self._start(name, tags)
        return self._steps[name]

    def write_report(self, parent: str, status: str, seconds: float, steps: list[dict],
                     error: str | None = None) -> str:
        """The end of a pipeline run, before its runs end `status`: record how long it took
        and why it failed (`error`) on the parent, how each step that did not finish went
        (`steps`: name, seconds and summary, as the pipeline measured and told them; a
        finished step's came with its record) on its run, then build report.html from what
        the store holds and log it on the parent. Returns where the page is."""
        from trainpipe import report

        for step in steps:
            if step["name"] in self._steps and step["status"] != "done":
                self.set_tags(self._steps[step["name"]],
                              report.step_tags(step["summary"], step["seconds"]))
        self.set_tags(parent, {report.SECONDS: f"{seconds:.3f}"}
                      | ({report.ERROR: error} if error else {}))
        self._log_files(parent, {report.REPORT: report.build(self.client, parent, status)})
        return report.location(self.client.get_run(parent).info.artifact_uri)

    @contextmanager
    def command_run(self, name: str, tags: dict[str, str]) -> Iterator[str]:
        """The run of a command outside the pipeline (`trainpipe predict`), in the configured
        experiment; it ends FINISHED, FAILED or KILLED like every run."""
        self.experiment_id = mlflow.set_experiment(self.experiment).experiment_id
        tags = {"trainpipe.version": trainpipe.__version__, **tags}
        run_id = self._start(name, tags | _source_tags() | self._process_tags())
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except (KeyboardInterrupt, Interrupted):
            status = "KILLED"
            raise
        finally:
            self.end_open_runs(status)

    def end_run(self, run_id: str, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status)
        if run_id in self._open:
            self._open.remove(run_id)

    def end_open_runs(self, status: str) -> None:
        """End every run started here that is still open, newest first (steps, then the
        parent): after a failure, an interruption, or when the pipeline's process is gone.
        A run that cannot be ended (the disk under the store is full) stays RUNNING until
        the next run, which marks it KILLED; the error that stopped the run is the one told."""
        for run_id in reversed(list(self._open)):
            if status == "FINISHED":
                self.end_run(run_id, status)
            else:
                with suppress(Exception):
                    self.end_run(run_id, status)

    def _start(self, name: str, tags: dict[str, str], resume: str | None = None) -> str:
        """Runs are created with trainpipe's own source tags: MLflow's fluent start_run
        would also probe the git repository through GitPython (about 0.4 s)."""
        if resume:
            run_id = resume
            self.set_tags(run_id, tags)
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name,
                                            tags=tags).info.run_id
        self._open.append(run_id)
        return run_id

    def _process_tags(self) -> dict[str, str]:
        return {"trainpipe.host": socket.gethostname(), "trainpipe.pid": str(self.pid)}

    def _end_stale_runs(self) -> None:
        """Runs left RUNNING by a trainpipe process of this machine that is gone (killed,
        crashed machine) are marked KILLED; runs of live processes are left alone."""
        experiment = mlflow.get_experiment_by_name(self.experiment)
        if experiment is None:
            return
        host = socket.gethostname()
        stale = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`trainpipe.host` = '{host}'",
            max_results=1000)
        for run in stale:
            pid = int(run.data.tags.get("trainpipe.pid", "0"))
            if pid and pid != self.pid and not _alive(pid):
                self.client.set_terminated(run.info.run_id, "KILLED")

    def record(self, run_id: str, report: Report) -> None:
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), 0, 0) for k, v in report.metrics.items()],
            params=[Param(k, _param_value(v)) for k, v in report.params.items()],
            tags=_run_tags(report.tags),
            synchronous=True,
        )
        self._log_files(run_id, report.artifacts)

    def run_step(self, module: str, inputs: dict) -> tuple[dict, Report]:
        """A step (its module) that works in MLflow itself (register), run here: see
        pipeline.in_tracker."""
        import importlib

        return importlib.import_module(module).run(self.cfg, **inputs)

    def artifact_uri(self, run_id: str) -> str:
        return redact_uri(self.client.get_run(run_id).info.artifact_uri)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=_run_tags(tags))

    def log_metrics(self, run_id: str, metrics: dict[str, float],
                    model_uri: str | None = None) -> None:
        """Metrics on a run; with `model_uri` (models:/m-...), also on that logged model, so
        MLflow's Models page shows them beside it."""
        model_id = model_uri.rsplit("/", 1)[-1] if model_uri else None
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0, model_id=model_id)
                                               for k, v in metrics.items()])

    def log_sources(self, run_id: str, cfg: DictConfig, sources: dict[str, dict]) -> None:
        """The input data as MLflow dataset inputs: name, digest, source, size. `sources`:
        role -> {url, digest, bytes, format} (lake.Source.describe())."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from trainpipe.lake import absolute

        inputs = []
        for role, source in sources.items():
            url = redact_uri(absolute(source["url"]))
            try:
                with warnings.catch_warnings():  # "can be interpreted in multiple ways"
                    warnings.simplefilter("ignore")
                    resolved = resolve_dataset_source(url)
                source_type, source_json = resolved._get_source_type(), resolved.to_json()
            except Exception:  # noqa: BLE001 - a URL scheme MLflow has no source type for
                source_type, source_json = "url", json.dumps({"url": url})
            profile = {"sha256": source["digest"], "bytes": source["bytes"],
                       "format": source["format"]}
            dataset = Dataset(cfg.dataset.name, source["digest"][:32], source_type, source_json,
                              None, json.dumps(profile))
            context = "training" if role == "train" else "scoring"
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
        try:
            self.client.log_inputs(run_id, datasets=inputs)
        except mlflow.exceptions.MlflowException:
            # Two runs logging the same new dataset at once: MLflow's insert of the shared
            # dataset row races (a unique-constraint error). The second try finds the row.
            time.sleep(0.2)
            self.client.log_inputs(run_id, datasets=inputs)

    def log_model(self, run_id: str, model, example) -> str:
        """Log the inference pipeline as an output of a (train) run; return its model URI.
        It is named after the dataset and the model (`hotel_bookings-lightgbm`) and carries
        the estimator's parameters."""
        import mlflow.sklearn

        estimator = model[-1]
        packages = [*MODEL_REQUIREMENTS]
        extra = MODULE_PACKAGES.get(type(estimator).__module__.split(".")[0])
        if extra and extra not in packages:
            packages.append(extra)
        params = OmegaConf.to_container(self.cfg.model.get("params") or {}, resolve=True)
        _predict_on_one_thread(estimator)
        info = mlflow.sklearn.log_model(
            model,
            run_id=run_id,
            name=f"{self.cfg.dataset.name}-{self.cfg.model.name}",
            params={k: _param_value(v) for k, v in params.items()},
            tags={"trainpipe.dataset": self.cfg.dataset.name,
                  "trainpipe.model": self.cfg.model.name,
                  "trainpipe.estimator": f"{type(estimator).__module__}."
                                         f"{type(estimator).__name__}"},
            signature=_signature(example, model.predict(example)),
            input_example=example,
            # Explicit requirements: inferring them re-imports the model (seconds).
            pip_requirements=[f"{p}=={_version(p)}" for p in packages if _version(p)],
            # cloudpickle: skops refuses tree models without a trusted-types list, and is slower.
            serialization_format="cloudpickle",
        )
        return info.model_uri

    def _log_files(self, run_id: str, files: dict[str, bytes]) -> None:
        if not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                (Path(tmp) / name).write_bytes(content)
            self.client.log_artifacts(run_id, tmp)


def _run_tags(tags: dict) -> list:
    """Tags as MLflow takes them: secrets redacted, long values (an error) shortened."""
    return [RunTag(k, shorten(redact_text(str(v)), TAG_LIMIT)) for k, v in tags.items()]


def _signature(example, predictions):
    """The model's first step reads columns as a source holds them (dates as text, ints
    where floats were, bool spellings) as well as typed: MLflow must not insist on the typed
    form, so those columns take any value. int columns read the same either way."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    signature = infer_signature(example, predictions)
    signature.inputs = Schema([
        spec if spec.type == DataType.long else ColSpec(AnyType(), spec.name, spec.required)
        for spec in signature.inputs.inputs])
    return signature


def _predict_on_one_thread(estimator) -> None:
    """A model predicts on one thread once fitted (`n_jobs` applies to the fit). Served, it
    predicts a few rows per request, and a pool of threads started for every predict
    (`n_jobs=-1`) costs more than the prediction: one row through a 200-tree forest takes
    ~35 ms that way, ~6 ms on one thread (bench/RESULTS.md, serve)."""
    if "n_jobs" in estimator.get_params():
        estimator.set_params(n_jobs=1)


def warm_up() -> threading.Thread:
    """Load, in a background thread, what logging the model and the run report will need,
    while the store opens and the pipeline's first steps run."""

    def work() -> None:
        import mlflow.pyfunc.scoring_server  # noqa: F401 - log_model checks the input example
        import mlflow.sklearn  # noqa: F401

        # MLflow's own helpers, private: without them MLflow just does the work later
        with suppress(Exception):  # maps modules to packages (reads every installed dist)
            from mlflow.utils import requirements_utils

            requirements_utils._init_modules_to_packages_map()
        with suppress(Exception):  # the context tags of a logged model (GitPython: git info)
            from mlflow.tracking.context.registry import resolve_tags

            resolve_tags()
        from trainpipe import report

        report.default_params()  # what the run report compares the run's config with

    thread = threading.Thread(target=work, name="trainpipe-warm-up", daemon=True)
    thread.start()
    return thread


def warm_up_model(cfg: DictConfig) -> None:
    """Import the model's library in the background while the data steps run: unpickling
    the trained model here would import it (scikit-learn: about a second) after training,
    when the run waits for the logged model."""
    import importlib

    def work() -> None:
        with suppress(Exception):  # a model that cannot import fails where it is used
            importlib.import_module(module)

    module = str(cfg.model.get("_target_") or "").rpartition(".")[0]
    if module:
        threading.Thread(target=work, name="trainpipe-warm-up", daemon=True).start()


def flat_params(cfg: DictConfig) -> list[tuple[str, str]]:
    """The resolved config as dotted params; column specs stay in config.yaml (too many)."""
    container = OmegaConf.to_container(redact_config(cfg), resolve=True)
    container["dataset"].pop("columns", None)
    out: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out.append((prefix[:250], _param_value(value)))

    walk("", container)
    return out


def redact_config(cfg: DictConfig) -> DictConfig:
    container = OmegaConf.to_container(cfg, resolve=True)

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return redact_uri(value) if isinstance(value, str) else value

    return OmegaConf.create(walk(container))


def _param_value(value: Any) -> str:
    return redact_text(str(value))[:MAX_PARAM_LENGTH]


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _environment() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": {p: _version(p) for p in PACKAGES}}


def _source_tags() -> dict[str, str]:
    import getpass
    import sys

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"mlflow.user": user, "mlflow.source.type": "LOCAL",
            "mlflow.source.name": os.path.basename(sys.argv[0]) or "trainpipe"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _git_tags() -> dict[str, str]:
    """The working folder's git commit (and whether the checkout had uncommitted changes);
    without one, `trainpipe.git_no_commit` says why: not a git checkout, no commit yet,
    no git, or git's own error."""
    def git(*args: str) -> subprocess.CompletedProcess:
        # LC_ALL=C: git's messages in English, to tell "not a git repository" apart
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              env={**os.environ, "LC_ALL": "C"})

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            commit = head.stdout.strip()
            return {"mlflow.source.git.commit": commit, "trainpipe.git_commit": commit,
                    "trainpipe.git_dirty": str(bool(dirty)).lower()}
    except FileNotFoundError:
        why = "git was not found"
    except subprocess.TimeoutExpired:
        why = "git did not answer within 5 s"
    except (OSError, subprocess.SubprocessError) as exc:
        why = f"git could not be run: {exc}"
    else:
        said = head.stderr.strip()
        if "not a git repository (or any" in said:
            why = "the working folder was not a git checkout"
        elif "Needed a single revision" in said:
            why = "the git checkout had no commit yet"
        else:
            why = "git failed: " + (said.splitlines()[0].removeprefix("fatal: ") if said
                                    else f"exit code {head.returncode}")
    return {"trainpipe.git_no_commit": shorten(why, 300)}


# The embedded store: an SQLite file made whole or not at all, and its failures in words.


class StoreError(TrainpipeError):
    """The embedded store cannot be opened as it is: half made, or not a store at all."""

    exit_code = 2


class NoSpace(TrainpipeError):
    """The disk under the store (or under another file the run writes) is full."""

    exit_code = 1


def sqlite_path(uri: str) -> Path | None:
    """The file of an SQLite store URI; None for other stores and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).absolute()


_mlflow_sqlite_builder: Callable[..., Any] | None = None


def create_sqlite_stores_atomically() -> None:
    """Route every opening of an SQLite store in this process (MlflowClient, the fluent
    API, log_model) through `create_sqlite_store`, whichever comes first."""
    from mlflow.tracking._tracking_service import utils

    global _mlflow_sqlite_builder
    if _mlflow_sqlite_builder is None:
        _mlflow_sqlite_builder = utils._tracking_store_registry.get_store_builder("sqlite:///")
        utils._tracking_store_registry.register("sqlite", _open_sqlite_store)


def _open_sqlite_store(store_uri: str, artifact_uri: str | None = None):
    path = sqlite_path(store_uri)
    if path is None:
        return _mlflow_sqlite_builder(store_uri=store_uri, artifact_uri=artifact_uri)
    with store_errors(store_uri):
        create_sqlite_store(path, lambda uri: _mlflow_sqlite_builder(store_uri=uri,
                                                                    artifact_uri=artifact_uri))
        try:
            return _mlflow_sqlite_builder(store_uri=store_uri, artifact_uri=artifact_uri)
        except Exception as exc:
            problem = _store_problem(path, exc)
            if problem is None:
                raise
            raise StoreError(problem) from None


def create_sqlite_store(path: Path, build: Callable[[str], Any]) -> None:
    """Make the store at `path` whole or not at all. MLflow's migrations (seconds) run on
    a temporary file, under a lock on the folder, then the file is linked into place. A
    process killed meanwhile leaves only its temporary file, which the next creator removes;
    processes starting at once wait for the first one, then open its store."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_locked(path.parent) as folder:
        if path.exists():
            return  # made by the process we waited for
        for stale in path.parent.glob(f".{path.name}.creating-*"):
            stale.unlink(missing_ok=True)  # its creator died: creators hold this lock
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        tmp_uri = f"sqlite:///{tmp}"
        try:
            build(tmp_uri)
            _dispose_engine(tmp_uri)
            with suppress(FileExistsError):  # never replace a store another program made
                os.link(tmp, path)
            os.fsync(folder)  # the store's name survives a power cut
        finally:
            _dispose_engine(tmp_uri)
            for leftover in path.parent.glob(f"{tmp.name}*"):  # the file and any journal
                leftover.unlink(missing_ok=True)


@contextmanager
def _folder_locked(folder: Path) -> Iterator[int]:
    """An exclusive lock on `folder` across processes; a dead process holds it no longer."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _dispose_engine(uri: str) -> None:
    """Close MLflow's cached connections to a database (the temporary one, once made)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()


def _store_problem(path: Path, exc: Exception) -> str | None:
    """Why the file at `path` is not a store this MLflow can open, and what to do; None
    when it is a complete store (the error lies elsewhere)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            revision = (db.execute("SELECT version_num FROM alembic_version").fetchone()
                        if "alembic_version" in tables else None)
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.DatabaseError as error:
        return (f"{path} is not an MLflow store ({error}); check tracking.uri: it names an "
                "SQLite file")
    head = _get_latest_schema_revision()
    found = revision[0] if revision else None
    if found == head:
        return None
    said = " ".join(str(exc).split())[:200]
    what = (f"{path} is not a complete MLflow store (schema revision {found or 'none'}, "
            f"MLflow {mlflow.__version__} needs {head}): its creation or an upgrade was "
            f"interrupted, or a program made it half (MLflow says: {said}).")
    if runs == 0:
        return f"{what} It holds no runs: delete it and run again: rm {path}"
    return (f"{what} It holds {runs} run(s): keep a copy of it, then try `mlflow db upgrade "
            f"sqlite:///{path}`, or move it aside to start a new store.")


@contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """A full disk (or quota) under the store or another file of the run is named as such,
    instead of SQLAlchemy's remarks and a chain of tracebacks."""
    try:
        yield
    except TrainpipeError:
        raise
    except Exception as exc:
        full = _full_disk(exc, uri)
        if full is None:
            raise
        reason, where = full
        raise NoSpace(f"{reason}: {where}; free space there (`trainpipe clean --models` removes "
                      "old outputs and their models), then run again: the steps that finished "
                      "are reused, and runs left RUNNING are marked KILLED") from None


def _full_disk(exc: BaseException, uri: str) -> tuple[str, str] | None:
    """(reason, path) when a full disk or quota is among the causes of `exc`. The file whose
    write failed is preferred to the database that then could not record the failure."""
    found = None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(exc.errno).lower(), str(exc.filename2 or exc.filename or "?")
        if found is None and "database or disk is full" in str(exc):
            found = (os.strerror(errno.ENOSPC).lower(), str(sqlite_path(uri) or redact_uri(uri)))
        exc = exc.__cause__ or exc.__context__
    return found
