"""Shared fixtures: a scratch working folder, small data for each task, and a helper that
runs the real `trainpipe` command in a subprocess."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import chdir, closing, suppress
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig

from trainpipe import config, demo

REPO = Path(__file__).resolve().parents[1]
# The shared hotel data: beside the repository (as in CI), or above it (a git worktree)
HOTEL = next((folder / "shared" / "datasets" / "hotel_bookings" for folder in REPO.parents
              if (folder / "shared" / "datasets" / "hotel_bookings").is_dir()),
             REPO.parent / "shared" / "datasets" / "hotel_bookings")
FAST = ["model.params.n_estimators=20"]  # small forests keep end-to-end tests quick


def pytest_configure(config):
    """The suite's warm trackers (trainpipe.warm) live in a folder of its own and end with
    it: none is left running after the tests, and none of the user's is used."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made the folder
        return
    import tempfile

    config._warm_folder = tempfile.mkdtemp(prefix="trainpipe-tests-run-")
    os.environ["XDG_RUNTIME_DIR"] = config._warm_folder


def pytest_unconfigure(config):
    folder = getattr(config, "_warm_folder", None)
    if folder is None:
        return
    for lock in Path(folder).glob("*/*.lock"):
        with suppress(ValueError, OSError):
            os.kill(int(lock.read_text()), signal.SIGTERM)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def nothing_written_to_the_repository():
    """Every test works in a folder of its own: a lake or store appearing in the repository
    means one ran in the wrong folder (and may have passed on a previous run's outputs)."""
    def present() -> set[str]:
        return {n for n in ("lake", "mlflow.db", "mlruns", "mlartifacts") if (REPO / n).exists()}

    before = present()
    yield
    assert present() <= before, f"tests wrote {sorted(present() - before)} into {REPO}"


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch):
    """MLflow exports MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID when a test sets them
    in-process; every test starts without them."""
    for name in [n for n in os.environ if n.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)


# Made by trainpipe's own code, in a process of its own (this one's MLflow state untouched)
MAKE_STORE = """
from mlflow import MlflowClient
from trainpipe.tracking import create_sqlite_stores_atomically
create_sqlite_stores_atomically()
MlflowClient("sqlite:///mlflow.db").search_experiments()
"""


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow store, made once per session (per xdist worker): MLflow's migrations
    take seconds, and a test's working folder gets a copy instead of running them again."""
    folder = tmp_path_factory.mktemp("empty-store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    made = subprocess.run([sys.executable, "-c", MAKE_STORE], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=240)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"]
    return folder / "mlflow.db"


def copy_store(template: Path, folder: Path) -> Path:
    """`template` as folder/mlflow.db, as trainpipe would have made it working in `folder`:
    the Default experiment's artifacts under folder/mlruns, made now."""
    store = folder / "mlflow.db"
    shutil.copyfile(template, store)
    now = int(time.time() * 1000)
    with closing(sqlite3.connect(store)) as db, db:
        changed = db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                             "last_update_time = ? WHERE experiment_id = 0",
                             (str(folder / "mlruns" / "0"), now, now)).rowcount
    assert changed == 1
    return store


@pytest.fixture
def workdir(tmp_path, monkeypatch, request) -> Path:
    """An empty working folder: ./lake is created inside it. It holds an empty MLflow store
    (./mlflow.db, a copy of `empty_store`) unless the test is marked `no_store`: a test of
    how the store is made, or that none is, starts without one."""
    monkeypatch.chdir(tmp_path)
    if request.node.get_closest_marker("no_store") is None:
        copy_store(request.getfixturevalue("empty_store"), tmp_path)
    return tmp_path


def write_demo_data(folder: Path) -> None:
    """3,000 demo hotel rows at the default source of a lake in `folder`."""
    raw = folder / "lake" / "raw" / "hotel_bookings"
    raw.mkdir(parents=True)
    demo.hotel_bookings(rows=3000, seed=1).to_csv(raw / "train.csv", index=False)


@pytest.fixture
def demo_lake(workdir) -> Path:
    """A lake whose raw zone holds 3,000 demo hotel rows at the default source."""
    write_demo_data(workdir)
    return workdir


@dataclass(frozen=True)
class Kept:
    """A working folder made once per worker and a pristine copy of it. `put_back()` makes
    the folder as it was made again, in the same place: the store records absolute paths
    (artifacts), and the train step's fingerprint names the store's absolute path, so a copy
    elsewhere would not be the same folder. Tests using it run one after another in their
    worker, each starting from `put_back()`."""
    folder: Path
    pristine: Path

    def put_back(self, monkeypatch) -> Path:
        forget_store_connections()
        shutil.rmtree(self.folder)
        shutil.copytree(self.pristine, self.folder, symlinks=True)
        monkeypatch.chdir(self.folder)
        return self.folder


def keep(tmp_path_factory, empty_store, name: str, make) -> Kept:
    """A working folder (an empty store, the demo lake) in which `make(folder)` ran once."""
    base = tmp_path_factory.mktemp(name)
    kept = Kept(base / "work", base / "pristine")
    kept.folder.mkdir()
    copy_store(empty_store, kept.folder)
    write_demo_data(kept.folder)
    with chdir(kept.folder):  # as a test would: MLflow puts artifacts under ./mlruns
        make(kept.folder)
    forget_store_connections()
    shutil.copytree(kept.folder, kept.pristine, symlinks=True)  # copy2: times too
    return kept


@dataclass(frozen=True)
class Finished:
    """The folder of a finished `trainpipe run *FAST` on the demo lake, what that run printed
    and the ids MLflow gave it."""
    folder: Path
    stdout: str
    run_id: str  # the pipeline (parent) run
    model_uri: str


@pytest.fixture(scope="session")
def finished_template(tmp_path_factory, empty_store) -> tuple[Kept, Finished]:
    """One full run (`trainpipe run *FAST` on the demo lake, as a user types it), made once
    per worker."""
    printed = []

    def run(folder: Path) -> None:
        result = trainpipe("run", *FAST, cwd=folder)
        assert result.returncode == 0, result.stdout + result.stderr
        printed.append(result.stdout)

    kept = keep(tmp_path_factory, empty_store, "finished", run)
    client = mlflow.MlflowClient(f"sqlite:///{kept.folder / 'mlflow.db'}")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("trainpipe").experiment_id],
        "tags.`trainpipe.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    return kept, Finished(kept.folder, printed[0], parent.info.run_id,
                          parent.data.tags["trainpipe.model_uri"])


def forget_store_connections() -> None:
    """Close the SQLite connections MLflow keeps open in this process (one engine per store
    URI, for its whole life): after a folder is put back from its copy, a kept connection
    would still read the replaced file."""
    from mlflow.store.model_registry.sqlalchemy_store import (
        SqlAlchemyStore as RegistryStore,
    )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for store in (TrackingStore, RegistryStore):
        for engine in store._engine_map.values():
            engine.dispose()


@pytest.fixture
def finished_lake(finished_template, monkeypatch) -> Finished:
    """The working folder after a finished `trainpipe run *FAST` on the demo lake: lake,
    store, artifacts and model. Every test gets it as the run left it (see Kept), and may
    change it."""
    kept, finished = finished_template
    kept.put_back(monkeypatch)
    return finished


def trainpipe(*args: str, cwd: Path, env: dict | None = None, timeout: float = 240,
              **kwargs) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full_env |= {"COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainpipe", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def runs(workdir: Path, experiment: str = "trainpipe") -> pd.DataFrame:
    """Every run in the working folder's embedded store."""
    client_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(client_uri)
    return mlflow.search_runs(experiment_names=[experiment], max_results=1000)


def compose(*overrides: str, config_dir: Path | None = None) -> DictConfig:
    return config.compose(list(overrides), str(config_dir) if config_dir else None)


def task_table(task: str, rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """A small table with a string category, a nullable float, a nullable datetime, a bool
    and a learnable target."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(0, 1, rows)
    x2 = rng.integers(0, 50, rows)
    colour = rng.choice(["red", "green", "blue"], rows)
    weight = np.where(rng.random(rows) < 0.1, np.nan, rng.normal(10, 2, rows))
    signal = x1 + 0.05 * x2 + (colour == "red")
    booked = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, rows), unit="D")
    booked = booked.where(rng.random(rows) >= 0.05)  # some NaT
    df = pd.DataFrame({"key": np.arange(rows), "x1": x1, "x2": x2, "colour": colour,
                       "weight": weight, "booked": booked, "member": rng.random(rows) < 0.5,
                       "notes": ["free text"] * rows})
    if task == "binary":
        df["label"] = np.where(signal > np.median(signal), "yes", "no")
    elif task == "multiclass":
        df["label"] = np.select([signal < 0.8, signal < 2.2], ["low", "mid"], "high")
    else:
        df["label"] = 3 * signal + rng.normal(0, 0.1, rows)
    return df


def task_dataset_yaml(task: str, source: Path) -> str:
    label = ("{type: float}" if task == "regression"
             else "{type: str, values: [low, mid, high, 'yes', 'no']}")
    positive = "positive_class: 'yes'\n" if task == "binary" else ""
    return f"""\
name: toy_{task}
source: {source}
task: {task}
target: label
{positive}id_column: key
columns:
  key:    {{type: int, min: 0}}
  x1:     {{type: float}}
  x2:     {{type: int, min: 0, max: 49}}
  colour: {{type: str, values: [red, green, blue]}}
  weight: {{type: float, nullable: true}}
  booked: {{type: datetime, nullable: true}}
  member: {{type: bool}}
  notes:  {{type: str, kind: drop}}
  label:  {label}
derived:
  x1_times_x2: x1 * x2
"""


@pytest.fixture
def task_config(workdir):
    """Make a dataset YAML (in a user config dir) and its CSV for a task; return the dir."""

    def make(task: str) -> Path:
        conf = workdir / "conf" / "dataset"
        conf.mkdir(parents=True, exist_ok=True)
        source = workdir / f"{task}.csv"
        task_table(task).to_csv(source, index=False)
        (conf / f"toy_{task}.yaml").write_text(task_dataset_yaml(task, source))
        return workdir / "conf"

    return make
