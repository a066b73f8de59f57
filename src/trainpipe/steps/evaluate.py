"""evaluate: metrics on the validation and test splits, and plots of the test split."""

import io

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from trainpipe.catalog import Json
from trainpipe.errors import ConfigError
from trainpipe.steps import Report

ZONE = "models"
OUTPUTS = {"metrics": Json("metrics.json", parent="metrics")}
# Each task's primary metric (the headline, the registry gate, the tuning objective) and
# whether more is better.
PRIMARY = {"binary": ("roc_auc", True), "multiclass": ("f1_score", True),
           "regression": ("root_mean_squared_error", False)}


def run(cfg: DictConfig, model, features: dict[str, pd.DataFrame]) -> tuple[dict, Report]:
    task, target = cfg.dataset.task, cfg.dataset.target
    estimator = model[-1]  # the features are already transformed in the feature zone
    positive = positive_class(cfg.dataset, getattr(estimator, "classes_", None))
    metrics, predictions = {}, {}
    for split in ("val", "test"):
        x, y = features[split].drop(columns=[target]), features[split][target]
        pred, proba = predict(estimator, x, task)
        predictions[split] = (y, pred, proba)
        scores = metrics_of(task, y, pred, proba, getattr(estimator, "classes_", None), positive)
        metrics |= {f"{split}_{k}": float(v) for k, v in scores.items()}
    artifacts = (_plots(task, estimator, *predictions["test"], positive)
                 if cfg.evaluate.plots else {})
    headline = f"test_{PRIMARY[task][0]}"
    summary = f"{headline} {metrics[headline]:.4f}"
    tags = {}
    if task == "binary":
        summary += f" (positive class {_plain(positive)!r})"
        tags["trainpipe.positive_class"] = str(positive)
    return {"metrics": metrics}, Report(summary=summary, metrics=metrics, artifacts=artifacts,
                                        tags=tags)


def warm_up() -> None:
    """Import the plotting backend in the background while earlier steps run (the fit
    leaves the interpreter idle)."""
    import threading

    def work() -> None:
        import matplotlib.backends.backend_agg  # noqa: F401

    threading.Thread(target=work, name="trainpipe-warm-up", daemon=True).start()


def positive_class(dataset: DictConfig, classes) -> object:
    """The label a binary task's metrics are about: `dataset.positive_class`, or 1 / True
    when the labels are 0/1 or false/true; any other pair must be named in the config."""
    if dataset.task != "binary" or classes is None:
        return None
    labels = list(classes)
    chosen = dataset.get("positive_class")
    if chosen is not None:
        for label in labels:  # the config's 1 names the label 1, its "yes" the label "yes"
            if str(label) == str(chosen):
                return label
        raise ConfigError(f"dataset.positive_class: {chosen!r} is not one of the target's "
                          f"labels {[_plain(v) for v in labels]}")
    as_text = {str(v).lower() for v in labels}
    if as_text in ({"0", "1"}, {"false", "true"}, {"0.0", "1.0"}):
        return next(v for v in labels if str(v).lower() in ("1", "true", "1.0"))
    raise ConfigError(f"dataset.positive_class: the binary target {dataset.target!r} has the "
                      f"labels {[_plain(v) for v in labels]}; say which one the metrics (recall, "
                      "precision, ROC) are about, e.g. dataset.positive_class="
                      f"{_plain(labels[-1])}")


def predict(estimator, x, task):
    """Predicted labels (values) and class probabilities (None for regression)."""
    if task == "regression":
        return estimator.predict(x), None
    proba = estimator.predict_proba(x)
    labels = estimator.classes_[np.argmax(proba, axis=1)]
    return labels, proba


def metrics_of(task: str, y, pred, proba, classes, positive=None) -> dict[str, float]:
    """Every metric of a task, from true values, predictions and probabilities."""
    from sklearn import metrics as m

    if task == "regression":
        return {"root_mean_squared_error": m.root_mean_squared_error(y, pred),
                "mean_absolute_error": m.mean_absolute_error(y, pred),
                "r2_score": m.r2_score(y, pred)}
    # The estimator's classes, not the split's: a small split may lack a rare class.
    log_loss = m.log_loss(y, proba, labels=classes)
    if task == "multiclass":
        return {"accuracy_score": m.accuracy_score(y, pred),
                "f1_score": m.f1_score(y, pred, average="macro"),
                "log_loss": log_loss}
    classes = list(classes)
    negative = next(c for c in classes if c != positive)
    tn, fp, fn, tp = m.confusion_matrix(y, pred, labels=[negative, positive]).ravel()
    score = proba[:, classes.index(positive)]
    return {"roc_auc": m.roc_auc_score(np.asarray(y) == positive, score),
            "log_loss": log_loss,
            "accuracy_score": m.accuracy_score(y, pred),
            "precision": m.precision_score(y, pred, pos_label=positive, zero_division=0),
            "recall": m.recall_score(y, pred, pos_label=positive, zero_division=0),
            "f1_score": m.f1_score(y, pred, pos_label=positive, zero_division=0),
            "tn": tn, "fp": fp, "fn": fn, "tp": tp}


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _plots(task: str, estimator, y, pred, proba, positive) -> dict[str, bytes]:
    """PNG plots drawn straight on matplotlib Figures (no pyplot, no global state)."""
    from matplotlib.figure import Figure
    from sklearn import metrics as m

    plots = {}

    def draw(name, fn, size=(4.5, 3.6)):
        fig = Figure(figsize=size, layout="tight")
        fn(fig.subplots())
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=72)
        plots[name] = buf.getvalue()

    if task == "binary":
        score = proba[:, list(estimator.classes_).index(positive)]
        fpr, tpr, _ = m.roc_curve(y, score, pos_label=positive)
        precision, recall, _ = m.precision_recall_curve(y, score, pos_label=positive)
        auc = m.auc(fpr, tpr)

        def roc(ax):
            ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
            ax.plot([0, 1], [0, 1], ls=":", color="grey")
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
            ax.legend(loc="lower right")

        def pr(ax):
            ax.plot(recall, precision)
            ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")

        draw("roc_curve.png", roc)
        draw("precision_recall_curve.png", pr)
    if task == "regression":
        def residuals(ax):
            ax.scatter(pred, np.asarray(y) - pred, s=4, alpha=0.4)
            ax.axhline(0, color="grey")
            ax.set(xlabel="predicted", ylabel="actual - predicted", title="Residuals")

        draw("residuals.png", residuals)
    else:
        labels = estimator.classes_
        matrix = m.confusion_matrix(y, pred, labels=labels)

        def confusion(ax):
            ax.imshow(matrix, cmap="Blues")
            ticks = range(len(labels))
            ax.set(xticks=ticks, yticks=ticks, xticklabels=labels, yticklabels=labels,
                   xlabel="predicted", ylabel="actual", title="Confusion matrix")
            for (i, j), count in np.ndenumerate(matrix):
                ax.text(j, i, str(count), ha="center", va="center",
                        color="white" if count > matrix.max() / 2 else "black")

        draw("confusion_matrix.png", confusion)
    importance = _importance(estimator)
    if importance is not None:
        top = importance.sort_values().tail(20)

        def bars(ax):
            ax.barh(top.index, top.to_numpy())
            ax.set(title="Feature importance", xlabel="importance")
            ax.tick_params(axis="y", labelsize=7)

        draw("feature_importance.png", bars, size=(5, 4.5))
    return plots


def _importance(estimator) -> pd.Series | None:
    names = getattr(estimator, "feature_names_in_", None)
    if hasattr(estimator, "feature_importances_"):
        values = np.asarray(estimator.feature_importances_, dtype=float)
    elif hasattr(estimator, "coef_"):
        values = np.abs(np.atleast_2d(estimator.coef_)).mean(axis=0)
    else:
        return None
    if names is None:
        names = [f"f{i}" for i in range(len(values))]
    return pd.Series(values, index=list(names))
