"""evaluate: metrics on the validation and test splits, and plots of the test split."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from trainpipe import cluster
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
        y, pred, proba = predictions[split] = predict_rows(estimator, features[split], target,
                                                           task)
        scores = metrics_of(task, y, pred, proba, getattr(estimator, "classes_", None), positive)
        metrics |= {f"{split}_{k}": float(v) for k, v in scores.items()}
    plots = (lambda: _plots(task, estimator, *predictions["test"], positive,
                            f"{cfg.model.name} · {cfg.dataset.name}",
                            f"test split ({len(predictions['test'][0]):,} rows)")
             ) if cfg.evaluate.plots else None
    headline = f"test_{PRIMARY[task][0]}"
    summary = f"{headline} {metrics[headline]:.4f}"
    tags = {}
    if task == "binary":
        summary += f" (positive class {_plain(positive)!r})"
        tags["trainpipe.positive_class"] = str(positive)
    return {"metrics": metrics}, Report(summary=summary, metrics=metrics, later=plots,
                                        tags=tags)


def warm_up() -> None:
    """Import the plotting backend in the background while earlier steps run (the fit
    leaves the interpreter idle)."""
    import threading

    def work() -> None:
        import matplotlib.backends.backend_agg  # noqa: F401

    # Not a daemon: a run that fails early exits after the import, not during it (an
    # interpreter torn down under a thread loading C++ extensions can abort).
    threading.Thread(target=work, name="trainpipe-warm-up").start()


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


def predict_rows(model, rows, target: str, task: str, columns: list[str] | None = None):
    """True values, predicted labels (values) and class probabilities of a table's rows
    (the model reads `columns`, default all but the target). A Dask table is predicted
    partition by partition on the workers; the three arrays come back whole, so every
    metric is exact."""
    if cluster.is_dask(rows):
        parts = cluster.per_partition(_predict_part, rows, model, target, task, columns)
        y = np.concatenate([p[0] for p in parts])
        pred = np.concatenate([p[1] for p in parts])
        proba = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        return y, pred, proba
    x = rows[columns] if columns else rows.drop(columns=[target])
    pred, proba = predict(model, x, task)
    return rows[target].to_numpy(), np.asarray(pred), proba


def _predict_part(part, model, target: str, task: str, columns: list[str] | None):
    return predict_rows(model, part, target, task, columns)


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


def _plots(task: str, estimator, y, pred, proba, positive, about: str,
           split: str) -> dict[str, bytes]:
    """PNG plots of one split, drawn straight on matplotlib Figures (no pyplot, no global
    state), each titled with what it shows, `about` (model · dataset) and the `split`: a
    plot seen alone (downloaded, in MLflow's artifact view) still says where it comes from.

    Classification: ROC, precision-recall, calibration (one curve per class beyond two),
    confusion matrix; regression: predicted vs actual, residuals; both: feature importance
    when the estimator has it."""
    from sklearn import metrics as m

    y = np.asarray(y)
    plots = {}

    def draw(name: str, what: str, fn, size=PLOT_SIZE) -> None:
        plots[name] = _png(fn, f"{what}\n{about} · {split}", size)

    if task == "regression":
        pred = np.asarray(pred, dtype=float)
        draw("predicted_vs_actual.png", "Predicted vs actual",
             lambda ax: _predicted_vs_actual(ax, y, pred))
        draw("residuals.png", "Residuals", lambda ax: _residuals(ax, y, pred))
    else:
        classes = list(estimator.classes_)
        curves = _one_vs_rest(y, proba, classes, positive)
        draw("roc_curve.png", "ROC curve", lambda ax: _roc(ax, curves))
        draw("precision_recall_curve.png", "Precision-recall curve", lambda ax: _pr(ax, curves))
        draw("calibration.png", "Calibration", lambda ax: _calibration(ax, curves))
        matrix = m.confusion_matrix(y, pred, labels=classes)
        side = min(4.8 + 0.35 * max(len(classes) - 4, 0), 10)
        draw("confusion_matrix.png", "Confusion matrix",
             lambda ax: _confusion(ax, matrix, classes), size=(side + 1.2, side))
    importance = _importance(estimator)
    if importance is not None:
        top = importance.sort_values().tail(TOP_FEATURES)
        shown = f"top {TOP_FEATURES} of {len(importance)}" if len(importance) > len(top) else (
            f"{len(top)} features")
        # the fitted model's, not the split's
        plots["feature_importance.png"] = _png(
            lambda ax: _bars(ax, top, importance.name), f"Feature importance ({shown})\n{about}",
            (7.2, max(3.6, 1.4 + 0.27 * len(top))))
    return plots


PLOT_SIZE = (6.4, 4.8)  # inches at PLOT_DPI: 640 x 480 pixels, readable at full size
PLOT_DPI = 100
TOP_FEATURES = 20
MAX_CURVES = 10  # classes drawn one-vs-rest: the most frequent ones


def _png(fn, title: str, size: tuple[float, float]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    ax.grid(alpha=0.25)
    fn(ax)
    ax.set_title(title, fontsize=11, loc="left")
    buf = io.BytesIO()
    # the title also as the PNG's own Title: what a file browser or a test can read
    fig.savefig(buf, format="png", dpi=PLOT_DPI,
                metadata={"Title": title.replace("\n", " · "), "Software": "trainpipe"})
    return buf.getvalue()


def _one_vs_rest(y, proba, classes, positive) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, is this class, its probability) per curve: the positive class alone for a
    binary task, else each class against the rest (the most frequent MAX_CURVES)."""
    if positive is not None:
        return [(str(_plain(positive)), y == positive, proba[:, classes.index(positive)])]
    counts = pd.Series(y).value_counts()
    shown = [c for c in counts.index if c in classes][:MAX_CURVES]
    return [(str(_plain(c)), y == c, proba[:, classes.index(c)]) for c in shown]


def _roc(ax, curves) -> None:
    from sklearn import metrics as m

    for label, truth, score in curves:
        if truth.all() or not truth.any():
            continue  # a class absent from the split has no curve
        fpr, tpr, _ = m.roc_curve(truth, score)
        ax.plot(fpr, tpr, label=f"{_legend(label, curves)}: AUC {m.auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=9)


def _pr(ax, curves) -> None:
    from sklearn import metrics as m

    for label, truth, score in curves:
        if not truth.any():
            continue
        precision, recall, _ = m.precision_recall_curve(truth, score)
        ap = m.average_precision_score(truth, score)
        line = ax.plot(recall, precision, label=f"{_legend(label, curves)}: AP {ap:.3f}")
        ax.axhline(truth.mean(), ls=":", color=line[0].get_color(), lw=1)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=9, title="dotted: share of the class",
              title_fontsize=8)


def _calibration(ax, curves) -> None:
    from sklearn.calibration import calibration_curve

    for label, truth, score in curves:
        if truth.all() or not truth.any():
            continue
        observed, predicted = calibration_curve(truth, score, n_bins=10, strategy="quantile")
        ax.plot(predicted, observed, marker="o", ms=4, label=_legend(label, curves))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    ax.set(xlabel="predicted probability (deciles)", ylabel="observed frequency",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=9)


def _legend(label: str, curves) -> str:
    """A curve's name: the positive class (binary), or its class against the rest."""
    return f"positive class {label}" if len(curves) == 1 else f"class {label}"


def _confusion(ax, matrix: np.ndarray, classes) -> None:
    image = ax.imshow(matrix, cmap="Blues")
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label="rows")
    ticks = range(len(classes))
    labels = [str(_plain(c)) for c in classes]
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="actual")
    ax.set_xticklabels(labels, rotation=45 if max(map(len, labels)) > 4 else 0, ha="right"
                       if max(map(len, labels)) > 4 else "center")
    ax.set_yticklabels(labels)
    ax.grid(False)
    total = matrix.sum() or 1
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, f"{count:,}\n{count / total:.1%}", ha="center", va="center", fontsize=9,
                color="white" if count > matrix.max() / 2 else "black")


def _predicted_vs_actual(ax, y, pred) -> None:
    y = y.astype(float)
    ax.scatter(y, pred, s=6, alpha=0.35, edgecolors="none")
    low, high = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([low, high], [low, high], ls=":", color="grey", label="predicted = actual")
    ax.set(xlabel="actual", ylabel="predicted")
    ax.legend(loc="upper left", fontsize=9)


def _residuals(ax, y, pred) -> None:
    residual = y.astype(float) - pred
    ax.scatter(pred, residual, s=6, alpha=0.35, edgecolors="none")
    ax.axhline(0, color="grey", ls=":")
    ax.set(xlabel="predicted", ylabel="actual - predicted")


def _bars(ax, top: pd.Series, meaning: str) -> None:
    ax.barh([str(i) for i in top.index], top.to_numpy())
    ax.set(xlabel=meaning)
    ax.tick_params(axis="y", labelsize=9)
    ax.grid(axis="y", alpha=0)


def _importance(estimator) -> pd.Series | None:
    """Each feature's importance, named (the Series' name) by what the numbers are."""
    names = getattr(estimator, "feature_names_in_", None)
    if hasattr(estimator, "feature_importances_"):
        values = np.asarray(estimator.feature_importances_, dtype=float)
        meaning = "importance (the estimator's feature_importances_)"
    elif hasattr(estimator, "coef_"):
        values = np.abs(np.atleast_2d(estimator.coef_)).mean(axis=0)
        meaning = "|coefficient| (of the transformed feature)"
    else:
        return None
    if names is None:
        names = [f"f{i}" for i in range(len(values))]
    return pd.Series(values, index=list(names), name=meaning)
