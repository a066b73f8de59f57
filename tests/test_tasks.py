"""Binary, multiclass and regression datasets train end to end from one YAML file each."""

import mlflow
import mlflow.sklearn
import pytest

from tests.conftest import runs, task_table, trainpipe

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


@pytest.mark.parametrize("task,metric,floor", [
    ("binary", "test_roc_auc", 0.8),
    ("multiclass", "test_f1_score", 0.5),
    ("regression", "test_r2_score", 0.8),
])
def test_each_task_end_to_end(task_config, task, metric, floor):
    conf = task_config(task)
    workdir = conf.parent
    result = trainpipe("run", "--config-dir", str(conf), f"dataset=toy_{task}",
                       "model=lightgbm", "model.params.n_estimators=50", cwd=workdir)
    assert result.returncode == 0, result.stderr
    parent = runs(workdir).query("`tags.trainpipe.kind` == 'pipeline'").iloc[0]
    assert parent[f"metrics.{metric}"] > floor
    model = mlflow.pyfunc.load_model(parent["tags.trainpipe.model_uri"])
    rows = task_table(task, rows=5, seed=11).drop(columns=["label"])
    rows.loc[0, "colour"] = "purple"  # unseen category
    assert len(model.predict(rows)) == 5
    pipeline = mlflow.sklearn.load_model(parent["tags.trainpipe.model_uri"])
    features = set(pipeline[-1].feature_name_)  # ordinal encoding: one column each
    assert {"booked", "member", "colour", "x1_times_x2"} <= features
    assert not {"key", "notes", "label"} & features


def test_the_positive_class_is_the_one_named(task_config):
    """Labels that are not 0/1 or false/true: the metrics are about the class the dataset
    file names, never about whichever label sorts last."""
    conf = task_config("binary")
    workdir = conf.parent
    path = conf / "dataset" / "toy_binary.yaml"
    text = path.read_text()
    path.write_text(text.replace("positive_class: 'yes'\n", ""))
    result = trainpipe("run", "--config-dir", str(conf), "dataset=toy_binary", cwd=workdir)
    assert result.returncode == 2
    assert "dataset.positive_class: the binary target 'label' has the labels" in result.stderr
    assert not (workdir / "mlflow.db").exists() or runs(workdir).empty

    path.write_text(text.replace("positive_class: 'yes'", "positive_class: 'no'"))
    result = trainpipe("run", "--config-dir", str(conf), "dataset=toy_binary",
                       "model.params.n_estimators=30", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "(positive class 'no')" in result.stdout
    parent = runs(workdir).query("`tags.trainpipe.kind` == 'pipeline'").iloc[0]
    table = task_table("binary")
    # recall of 'no' is tp / (tp + fn) with 'no' as positive: the confusion counts agree
    tp, fn = parent["metrics.test_tp"], parent["metrics.test_fn"]
    assert parent["metrics.test_recall"] == pytest.approx(tp / (tp + fn))
    assert tp + fn == pytest.approx(0.15 * (table["label"] == "no").sum(), abs=2)
    assert parent["metrics.test_roc_auc"] > 0.8  # the score of 'no', not of 'yes'


def test_a_dataset_without_an_id_column_trains(task_config):
    conf = task_config("regression")
    path = conf / "dataset" / "toy_regression.yaml"
    path.write_text(path.read_text().replace("id_column: key\n", ""))  # it is optional
    result = trainpipe("run", "--config-dir", str(conf), "dataset=toy_regression",
                       "model.params.n_estimators=10", "--to", "features", cwd=conf.parent)
    assert result.returncode == 0, result.stderr
