import os

import pytest

from tests.conftest import compose, trainpipe
from trainpipe.config import expand_sweeps, split_overrides
from trainpipe.errors import ConfigError


def test_defaults_compose_to_the_hotel_forest(workdir):
    cfg = compose()
    assert cfg.dataset.name == "hotel_bookings"
    assert cfg.model._target_ == "sklearn.ensemble.RandomForestClassifier"
    assert cfg.model.params.n_estimators == 200 and cfg.model.params.max_depth == 15
    assert cfg.dataset.source == "./lake/raw/hotel_bookings/train.csv"
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
    assert len(cfg.dataset.columns) == 19


def test_overrides_and_seed_reach_the_estimator():
    cfg = compose("model=lightgbm", "seed=7", "lake.root=s3://b/lake")
    assert cfg.model._target_ == "lightgbm.LGBMClassifier"
    assert cfg.model.params.random_state == 7
    assert cfg.dataset.source == "s3://b/lake/raw/hotel_bookings/train.csv"


def test_model_follows_the_task(task_config):
    cfg = compose("dataset=toy_regression", config_dir=task_config("regression"))
    assert cfg.model._target_ == "sklearn.ensemble.RandomForestRegressor"


def test_unknown_group_option_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset"):
        compose("dataset=nope")


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_key"):
        compose("no_such_key=1")


def test_a_missing_environment_variable_names_the_key(monkeypatch):
    monkeypatch.delenv("TRAINPIPE_LAKE_ROOT", raising=False)
    with pytest.raises(ConfigError) as caught:
        compose("lake=s3")
    assert str(caught.value) == ("lake.root: the environment variable TRAINPIPE_LAKE_ROOT is "
                                 "not set; export it, or pass lake.root=... on the command line")
    assert compose("lake=s3", "lake.root=s3://b/lake").lake.root == "s3://b/lake"


def test_overrides_split_like_mlflow_run_passes_them():
    assert split_overrides(["model=lightgbm seed=3", "", "x='a b'"]) == [
        "model=lightgbm", "seed=3", "x=a b"]


def test_sweeps_expand_to_the_product():
    jobs = expand_sweeps(["seed=1,2", "model=random_forest,lightgbm", "split.val_size=0.2"])
    assert len(jobs) == 4
    assert ["seed=1", "model=lightgbm", "split.val_size=0.2"] in jobs


def test_unquoted_yes_no_in_a_str_column_is_explained(task_config, tmp_path):
    conf = task_config("binary")
    path = conf / "dataset" / "toy_binary.yaml"
    path.write_text(path.read_text().replace("'yes', 'no'", "yes, no"))
    with pytest.raises(ConfigError, match=r"dataset.columns.label.values.*quote them"):
        compose("dataset=toy_binary", config_dir=conf)


def test_a_dataset_key_the_file_leaves_out_is_set_without_a_plus(task_config):
    """A dataset file written by hand or by `dataset init` may leave out optional keys;
    `dataset.scoring_source=...` sets one as the README writes it (Hydra alone asks for
    `+dataset.scoring_source=...`)."""
    conf = task_config("binary")
    written = (conf / "dataset/toy_binary.yaml").read_text()
    assert "scoring_source" not in written
    cfg = compose("dataset=toy_binary", "dataset.scoring_source=/data/new.csv",
                  config_dir=conf)
    assert cfg.dataset.scoring_source == "/data/new.csv"
    with pytest.raises(ConfigError, match=r"did you mean 'scoring_source'"):
        compose("dataset=toy_binary", "dataset.scoring_sorce=/data/new.csv", config_dir=conf)


KEPT_ALONE = """
import sys
from trainpipe import config
cfg = config.compose(["model=lightgbm", "seed=3"])
print(cfg.model.name, cfg.seed, cfg.model.params.random_state, "hydra" in sys.modules)
"""


def test_a_composed_config_is_kept_and_the_same_without_hydra(tmp_path, monkeypatch):
    """Composed once, a config comes from the user's cache next time: Hydra is not even
    imported, and the config is the one Hydra composes, resolved afresh."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from trainpipe import config

    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", KEPT_ALONE], env=env, text=True,
                                    capture_output=True, timeout=120) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split() == ["lightgbm", "3", "3", "True"]
    assert second.stdout.split() == ["lightgbm", "3", "3", "False"]
    assert len(list((tmp_path / "trainpipe" / "composed").glob("*.json"))) == 1

    monkeypatch.setattr(config, "COMPOSED", tmp_path / "trainpipe" / "composed")
    fresh = OmegaConf.to_container(
        config._hydra_compose(["model=lightgbm", "seed=3"], None), resolve=True)
    assert OmegaConf.to_container(config.compose(["model=lightgbm", "seed=3"]),
                                  resolve=True) == fresh


def test_a_kept_config_follows_its_files_and_the_environment(task_config, tmp_path,
                                                             monkeypatch):
    """An edited dataset file is composed again; environment variables are read each time
    (the kept config holds `${env_or:...}`, not its value)."""
    from trainpipe import config

    monkeypatch.setattr(config, "COMPOSED", tmp_path / "composed")
    conf = task_config("binary")
    file = conf / "dataset" / "toy_binary.yaml"
    assert compose("dataset=toy_binary", config_dir=conf).dataset.positive_class == "yes"
    file.write_text(file.read_text().replace("positive_class: 'yes'", "positive_class: 'no'"))
    assert compose("dataset=toy_binary", config_dir=conf).dataset.positive_class == "no"
    assert len(list((tmp_path / "composed").glob("*.json"))) == 2

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///one.db")
    assert compose().tracking.uri == "sqlite:///one.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///two.db")
    assert compose().tracking.uri == "sqlite:///two.db"


def test_the_kept_configs_used_last_stay(tmp_path, monkeypatch):
    """Beyond KEEP_COMPOSED configs the least recently used go: a config used by every run
    stays however many others come and go (the suite found the oldest going instead)."""
    from trainpipe import config

    monkeypatch.setattr(config, "COMPOSED", tmp_path / "composed")
    monkeypatch.setattr(config, "KEEP_COMPOSED", 2)
    compose("seed=1")
    compose("seed=2")
    first, second = sorted((tmp_path / "composed").glob("*.json"), key=lambda p: p.stat().st_mtime)
    os.utime(first, (1000, 1000))  # seed=1 kept first, seed=2 after it
    os.utime(second, (2000, 2000))
    kept = {p.read_text() for p in (first, second)}
    used = first.read_text()
    compose("seed=1" if '"seed": 1' in used else "seed=2")  # the older one, used again
    compose("seed=3")
    left = {p.read_text() for p in (tmp_path / "composed").glob("*.json")}
    assert len(left) == 2 and used in left and not (kept - {used}) & left


def test_an_empty_mlflow_tracking_uri_means_unset(tmp_path, monkeypatch):
    """`MLFLOW_TRACKING_URI=` is no URI: the default applies, as MLflow reads it, for the
    local store and the server alike; the kept config still holds the variable, not its
    value, so a later run reads it again."""
    import json

    from trainpipe import config

    monkeypatch.setattr(config, "COMPOSED", tmp_path / "composed")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert compose().tracking.uri == "sqlite:///mlflow.db"
    assert compose("tracking=server").tracking.uri == "http://127.0.0.1:5000"
    kept = [json.loads(p.read_text()) for p in (tmp_path / "composed").glob("*.json")]
    assert len(kept) == 2 and all("MLFLOW_TRACKING_URI" in k["tracking"]["uri"] for k in kept)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///set.db")
    assert compose().tracking.uri == compose("tracking=server").tracking.uri == (
        "sqlite:///set.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose().tracking.uri == "sqlite:///mlflow.db"
    # what a user sees (it said: tracking.uri='': must be an MLflow tracking URI ...)
    shown = trainpipe("run", "--cfg", "job", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert shown.returncode == 0, shown.stderr
    assert "tracking:\n  uri: sqlite:///mlflow.db\n" in shown.stdout
