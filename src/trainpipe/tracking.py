"""MLflow wiring: one parent run per pipeline run, one child run per step.

Runs always end in a true state: FINISHED on success, FAILED on an error, KILLED on
Ctrl-C or SIGTERM. Everything written here passes through redaction first.
"""

import json
import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from omegaconf import DictConfig, OmegaConf

import trainpipe
from trainpipe.config import tracking_uri
from trainpipe.errors import Interrupted
from trainpipe.redaction import redact_text, redact_uri
from trainpipe.steps import Report

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch
PACKAGES = ("mlflow", "scikit-learn", "pandas", "numpy", "pyarrow", "cloudpickle", "lightgbm",
            "pandera", "hydra-core")
# What a logged model needs to load: the estimator's package is added to these.
MODEL_REQUIREMENTS = ("mlflow", "scikit-learn", "pandas", "numpy", "cloudpickle")
MODULE_PACKAGES = {"sklearn": "scikit-learn", "lightgbm": "lightgbm", "xgboost": "xgboost"}


def quiet_mlflow() -> None:
    """trainpipe reports for itself; MLflow's hints about int columns, pickle formats and
    table creation would bury the summary."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")


class Tracking:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.experiment = str(cfg.tracking.experiment)
        from trainpipe.supervise import check_tracking_server

        check_tracking_server(self.uri)  # fail fast (not after MLflow's minutes of retries)
        quiet_mlflow()
        # MLflow prints "View run ... at <tracking URI>" (password included) per run
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if self.uri.startswith(("http://", "https://")):  # bound MLflow's minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)

    @contextmanager
    def pipeline_run(self, cfg: DictConfig, overrides: list[str],
                     steps: list[str]) -> Iterator[str]:
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
        tags |= _source_tags() | _git_tags() | _process_tags()
        with self._ended_run(f"{cfg.dataset.name}-{cfg.model.name}", tags, resume) as run_id:
            params = flat_params(cfg)
            for i in range(0, len(params), BATCH):
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in params[i:i + BATCH]])
            self._log_files(run_id, {
                "config.yaml": OmegaConf.to_yaml(redact_config(cfg)).encode(),
                "environment.json": json.dumps(_environment(), indent=2).encode()})
            yield run_id

    @contextmanager
    def command_run(self, name: str, tags: dict[str, str]) -> Iterator[str]:
        """The run of a command outside the pipeline (`trainpipe predict`), in the configured
        experiment; it ends FINISHED, FAILED or KILLED like every run."""
        self.experiment_id = mlflow.set_experiment(self.experiment).experiment_id
        tags = {"trainpipe.version": trainpipe.__version__, **tags}
        with self._ended_run(name, tags | _source_tags() | _process_tags()) as run_id:
            yield run_id

    @contextmanager
    def step_run(self, name: str, fingerprint: str) -> Iterator[str]:
        tags = {"trainpipe.step": name, "trainpipe.fingerprint": fingerprint, **_process_tags()}
        tags["mlflow.parentRunId"] = mlflow.active_run().info.run_id
        with self._ended_run(name, tags | _source_tags()) as run_id:
            yield run_id

    @contextmanager
    def _ended_run(self, name: str, tags: dict[str, str],
                   resume: str | None = None) -> Iterator[str]:
        """Start (or resume) a run and end it FINISHED, FAILED or KILLED, whatever happens.
        Runs are created with trainpipe's own source tags: MLflow's fluent start_run would
        also probe the git repository through GitPython (about 0.4 s)."""
        if resume:
            run_id = resume
            self.set_tags(run_id, tags)
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name,
                                            tags=tags).info.run_id
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        try:
            yield run_id
        except (KeyboardInterrupt, Interrupted):
            mlflow.end_run("KILLED")
            raise
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run("FINISHED")

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
            if pid and pid != os.getpid() and not _alive(pid):
                self.client.set_terminated(run.info.run_id, "KILLED")

    def record(self, run_id: str, report: Report) -> None:
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), 0, 0) for k, v in report.metrics.items()],
            params=[Param(k, _param_value(v)) for k, v in report.params.items()],
            tags=[RunTag(k, redact_text(str(v))) for k, v in report.tags.items()],
            synchronous=True,
        )
        self._log_files(run_id, report.artifacts)

    def artifact_uri(self, run_id: str) -> str:
        return redact_uri(self.client.get_run(run_id).info.artifact_uri)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, redact_text(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float],
                    model_uri: str | None = None) -> None:
        """Metrics on a run; with `model_uri` (models:/m-...), also on that logged model, so
        MLflow's Models page shows them beside it."""
        model_id = model_uri.rsplit("/", 1)[-1] if model_uri else None
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0, model_id=model_id)
                                               for k, v in metrics.items()])

    def log_sources(self, run_id: str, cfg: DictConfig, sources: dict) -> None:
        """The input data as MLflow dataset inputs: name, digest, source, size."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from trainpipe.lake import absolute

        inputs = []
        for role, source in sources.items():
            url = redact_uri(absolute(source.url))
            try:
                with warnings.catch_warnings():  # "can be interpreted in multiple ways"
                    warnings.simplefilter("ignore")
                    resolved = resolve_dataset_source(url)
                source_type, source_json = resolved._get_source_type(), resolved.to_json()
            except Exception:  # noqa: BLE001 - a URL scheme MLflow has no source type for
                source_type, source_json = "url", json.dumps({"url": url})
            profile = {"sha256": source.digest, "bytes": source.size,
                       "format": source.format}
            dataset = Dataset(cfg.dataset.name, source.digest[:32], source_type, source_json,
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

    def log_model(self, model, example) -> str:
        """Log the inference pipeline to the active (train) run; return its model URI. It is
        named after the dataset and the model (`hotel_bookings-lightgbm`) and carries the
        estimator's parameters."""
        import mlflow.sklearn
        from mlflow.models import infer_signature

        estimator = model[-1]
        packages = [*MODEL_REQUIREMENTS]
        extra = MODULE_PACKAGES.get(type(estimator).__module__.split(".")[0])
        if extra and extra not in packages:
            packages.append(extra)
        params = OmegaConf.to_container(self.cfg.model.get("params") or {}, resolve=True)
        _predict_on_one_thread(estimator)
        info = mlflow.sklearn.log_model(
            model,
            name=f"{self.cfg.dataset.name}-{self.cfg.model.name}",
            params={k: _param_value(v) for k, v in params.items()},
            tags={"trainpipe.dataset": self.cfg.dataset.name,
                  "trainpipe.model": self.cfg.model.name,
                  "trainpipe.estimator": f"{type(estimator).__module__}."
                                         f"{type(estimator).__name__}"},
            signature=infer_signature(example, model.predict(example)),
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


def _predict_on_one_thread(estimator) -> None:
    """A model predicts on one thread once fitted (`n_jobs` applies to the fit). Served, it
    predicts a few rows per request, and a pool of threads started for every predict
    (`n_jobs=-1`) costs more than the prediction: one row through a 200-tree forest takes
    ~35 ms that way, ~6 ms on one thread (bench/RESULTS.md, serve)."""
    if "n_jobs" in estimator.get_params():
        estimator.set_params(n_jobs=1)


def warm_up() -> threading.Thread:
    """Load, in a background thread, what logging the model and plots will need. The
    work overlaps the steps (the forest fit leaves the interpreter idle), never adds to them."""

    def work() -> None:
        import matplotlib.backends.backend_agg  # noqa: F401
        import mlflow.sklearn  # noqa: F401

        try:  # MLflow maps modules to packages (reads every installed dist) to check reqs
            from mlflow.utils import requirements_utils

            requirements_utils._init_modules_to_packages_map()
        except Exception:  # noqa: BLE001 - a private helper; without it MLflow just does it later
            pass

    thread = threading.Thread(target=work, name="trainpipe-warm-up", daemon=True)
    thread.start()
    return thread


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


def _process_tags() -> dict[str, str]:
    return {"trainpipe.host": socket.gethostname(), "trainpipe.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _git_tags() -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"mlflow.source.git.commit": commit, "trainpipe.git_commit": commit,
            "trainpipe.git_dirty": str(dirty).lower()}
