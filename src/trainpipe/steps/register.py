"""register: the new model becomes a version in the MLflow Model Registry, and a gate
decides whether it becomes the champion.

- The version gets the alias `challenger`.
- The gate, on test metrics: the bounds of `registry.gate.metrics` ({test_roc_auc: {min:
  0.85}}), and with `registry.gate.beat_champion` the current champion must be beaten by
  `registry.gate.min_delta` on the task's primary metric. The champion is scored here, on
  this run's test rows with its own pipeline and evaluate's metric code, so both numbers
  come from the same rows (a champion that was itself tested on exactly these rows, the
  same way, is not scored again: its recorded test metrics are those numbers). A champion
  that cannot score them (other columns, another task) is named, and the bounds decide
  alone.
- Passed: `champion` moves to the new version. Failed: it stays (the CLI exits 4 only
  with `registry.require_promotion`).
A model that already is a version of the name is that version (never registered twice).

Unlike the other steps, this one writes to MLflow (the registry is its output): through
registry.py, the one module that talks to the Model Registry. So it runs in the tracker
process, where MLflow is open already (pipeline.in_tracker).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from trainpipe import cluster
from trainpipe.catalog import Json
from trainpipe.errors import ConfigError
from trainpipe.redaction import shorten
from trainpipe.registry import CHALLENGER, CHAMPION, Move, Registry
from trainpipe.steps import Report
from trainpipe.steps.evaluate import PRIMARY, metrics_of, positive_class, predict_rows

ZONE = "models"
OUTPUTS = {"registration": Json("registration.json", parent="tags")}
IN_TRACKER = True  # runs where MLflow is open already (pipeline.in_tracker)
TAG_LIMIT = 5000  # characters of a reasons tag (MLflow takes 8000 on runs)
TEST_ROWS = "trainpipe.test_rows"  # a version tag: the digest of the rows it was tested on
# a version tag: what its recorded test metrics are about (scored_on)
SCORED_ON = "trainpipe.scored_on"


@dataclass(frozen=True)
class Criteria:
    """What the gate asks of a new version."""

    bounds: dict[str, dict[str, float]]  # test metric -> {"min": x, "max": y}
    beat_champion: bool
    min_delta: float
    primary: str  # the task's primary test metric, e.g. test_roc_auc
    higher_is_better: bool

    @classmethod
    def of(cls, cfg: DictConfig) -> Criteria:
        gate = cfg.registry.gate
        metric, higher = PRIMARY[cfg.dataset.task]
        bounds = OmegaConf.to_container(gate.metrics, resolve=True) if gate.metrics else {}
        return cls({m: {k: float(v) for k, v in b.items()} for m, b in bounds.items()},
                   bool(gate.beat_champion), float(gate.min_delta), f"test_{metric}", higher)


@dataclass(frozen=True)
class Decision:
    passed: bool
    line: str  # the one terminal line
    reasons: list[str] = field(default_factory=list)  # every check, passed or failed


def decide(name: str, version: int, scores: dict[str, float], criteria: Criteria,
           champion: int | None = None, champion_scores: dict[str, float] | None = None,
           problem: str | None = None, other_split: bool = False) -> Decision:
    """The gate. `scores`: the new version's test metrics; `champion`: the version holding
    the alias (None: none does); `champion_scores`: its test metrics on the same rows, or
    `problem`: why it could not score them; `other_split`: the champion was evaluated on
    other test rows when it was registered (so it may have trained on some of these)."""
    reasons, failed = _bounds(scores, criteria.bounds)
    primary = criteria.primary
    compared = None
    if champion == version:
        reasons.append(f"version {version} is the champion already")
    elif champion is None:
        reasons.append("no champion yet: the bounds decide")
    elif not criteria.beat_champion:
        reasons.append(f"champion version {champion} not compared "
                       "(registry.gate.beat_champion=false): the bounds decide")
    elif problem is not None or champion_scores is None:
        reasons.append(f"champion version {champion} cannot score these rows "
                       f"({problem or 'no score'}): the bounds decide")
    elif primary not in scores or primary not in champion_scores:
        failed.append(f"no {primary} to compare with champion version {champion}")
        reasons.append(failed[-1])
    else:
        new, old = scores[primary], champion_scores[primary]
        delta = criteria.min_delta
        if criteria.higher_is_better:
            ok, text = new >= old + delta, f"{new:.4f} < {old:.4f}" + (
                f" + {delta:g}" if delta else "")
        else:
            ok, text = new <= old - delta, f"{new:.4f} > {old:.4f}" + (
                f" - {delta:g}" if delta else "")
        compared = f"{primary} {new:.4f} vs {old:.4f} (version {champion})"
        if other_split:
            reasons.append(f"champion version {champion} came from another split (other "
                           "test rows when it was registered: another seed, split or data); "
                           "it may have trained on some of these rows, which flatters it")
        if ok:
            reasons.append(f"{compared}: beats the champion"
                           + (f" by at least {delta:g}" if delta else ""))
        else:
            failed.append(f"{primary} {text}")
            reasons.append(f"{primary} {text} (champion version {champion}): does not beat it")
    passed = not failed
    caveat = (f" (champion version {champion} came from another split: it may have trained "
              "on some of these rows)" if other_split and champion_scores else "")
    if champion == version:
        line = f"version {version} is the champion already" + (
            f"; it fails the gate now: {'; '.join(failed)}" if failed else "")
    elif not passed:
        line = (f"kept champion version {champion}: " if champion is not None
                else f"version {version} not promoted (no champion yet): ") + "; ".join(
                    failed) + caveat
    else:
        line = f"promoted version {version} to champion: " + (
            compared or _basis(scores, criteria, champion, problem)) + caveat
    return Decision(passed, line, reasons)


def _bounds(scores: dict[str, float], bounds: dict[str, dict[str, float]]
            ) -> tuple[list[str], list[str]]:
    reasons, failed = [], []
    for metric, bound in bounds.items():
        value = scores.get(metric)
        if value is None:
            failed.append(f"no {metric} in the test metrics")
            reasons.append(failed[-1])
            continue
        for side, limit in bound.items():
            ok = value >= limit if side == "min" else value <= limit
            sign = (">=" if ok else "<") if side == "min" else ("<=" if ok else ">")
            text = f"{metric} {value:.4f} {sign} {side} {limit:g}"
            reasons.append(text)
            if not ok:
                failed.append(text)
    return reasons, failed


def _basis(scores: dict[str, float], criteria: Criteria, champion: int | None,
           problem: str | None) -> str:
    """Why a version passed without beating a champion."""
    met = [r for r in _bounds(scores, criteria.bounds)[0]]
    value = scores.get(criteria.primary)
    bounds = ("bounds met: " + ", ".join(met) if met
              else f"{criteria.primary} {value:.4f}, no bounds set" if value is not None
              else "no bounds set")
    if champion is None:
        return f"no champion before; {bounds}"
    if problem is not None:
        return f"champion version {champion} cannot score these rows ({problem}); {bounds}"
    return f"{bounds}; champion version {champion} not compared (beat_champion=false)"


def check(cfg: DictConfig, sources: dict | None = None) -> None:
    """Before any step runs: every bound names a test metric the task reports."""
    names = metric_names(cfg.dataset.task)
    for metric in cfg.registry.gate.metrics or {}:
        if metric not in names:
            from trainpipe.config import did_you_mean

            raise ConfigError(
                f"registry.gate.metrics.{metric}: not a test metric of a {cfg.dataset.task} "
                f"task{did_you_mean(metric, names)}; the metrics: {', '.join(names)}")


@cache
def metric_names(task: str) -> tuple[str, ...]:
    """The test metrics evaluate reports for `task` (what a bound may name), from
    evaluate's own metric code on a few made-up rows."""
    import numpy as np

    if task == "regression":
        y, pred, proba, classes, positive = [1.0, 2.0, 3.0], [1.1, 1.9, 3.2], None, None, None
    else:
        k = 2 if task == "binary" else 3
        y = list(range(k)) * 2
        proba = np.full((2 * k, k), 0.1 / (k - 1))
        proba[np.arange(2 * k), y] = 0.9
        pred, classes, positive = y, list(range(k)), (1 if task == "binary" else None)
    return tuple(f"test_{m}" for m in metrics_of(task, y, pred, proba, classes, positive))


def run(cfg: DictConfig, model_uri: str, metrics: dict[str, float],
        splits: dict[str, pd.DataFrame], pipeline_run_id: str) -> tuple[dict, Report]:
    name, criteria = str(cfg.registry.name), Criteria.of(cfg)
    registry = Registry(cfg)
    by_run = f"pipeline run {pipeline_run_id}"
    test_rows = rows_digest(splits["test"])
    # The champion first: a champion out of reach stops the step before it registers.
    champion = registry.holder(name, CHAMPION)
    champion_scores, problem = None, None
    key = scored_on(cfg, test_rows)
    if champion is not None and champion.source != model_uri and criteria.beat_champion:
        champion_scores = _recorded(registry, champion, key, criteria)
        if champion_scores is None:
            champion_scores, problem = score(registry, champion, cfg, splits["test"])
    version, made = registry.register(name, model_uri, {
        "trainpipe.dataset": cfg.dataset.name, "trainpipe.task": cfg.dataset.task,
        "trainpipe.target": cfg.dataset.target, "trainpipe.model": cfg.model.name,
        "trainpipe.registered_by": by_run, TEST_ROWS: test_rows, SCORED_ON: key})
    registry.move(version, CHALLENGER, Move(f"registered by {by_run}"))
    scores = {k: float(v) for k, v in metrics.items() if k.startswith("test_")}
    decision = decide(name, version.version, scores, criteria,
                      champion.version if champion else None, champion_scores, problem,
                      other_split=champion is not None
                      and champion.tags.get(TEST_ROWS) not in (None, test_rows))
    after = champion.version if champion else None
    if decision.passed and after != version.version:
        registry.crown(version, champion, f"gate passed in {by_run}: {decision.line}")
        after = version.version
    verdict = "passed" if decision.passed else "failed"
    reasons = shorten("; ".join(decision.reasons), TAG_LIMIT)
    registry.set_tags(version, {"trainpipe.gate": verdict, "trainpipe.gate.decision":
                                decision.line, "trainpipe.gate.reasons": reasons,
                                "trainpipe.gate.run": pipeline_run_id})
    tags = {"trainpipe.gate": verdict, "trainpipe.gate.decision": decision.line,
            "trainpipe.gate.reasons": reasons, "trainpipe.registered_model": name,
            "trainpipe.registered_version": str(version.version),
            "trainpipe.champion_version": str(after) if after else ""}
    registration = {
        "name": name, "version": version.version, "model_uri": model_uri,
        "registered_now": made, "decision": verdict, "line": decision.line,
        "reasons": decision.reasons,
        "criteria": {"metrics": criteria.bounds, "beat_champion": criteria.beat_champion,
                     "min_delta": criteria.min_delta, "primary": criteria.primary,
                     "higher_is_better": criteria.higher_is_better},
        "champion_before": champion.version if champion else None, "champion_after": after,
        "champion_problem": problem,
        "scores": {"new": scores, "champion": champion_scores},
        "test_rows": len(splits["test"]), "tags": tags}
    return {"registration": registration}, Report(
        summary=decision.line, tags=tags,
        params={"registered_model": name, "registered_version": version.version},
        metrics={f"champion_{k}": v for k, v in (champion_scores or {}).items()},
        artifacts={"gate_report.json": json.dumps(registration, indent=2).encode(),
                   "gate_report.md": to_markdown(registration).encode()})


def rows_digest(df: pd.DataFrame) -> str:
    """What identifies a split's rows (values and order), for telling splits apart."""
    import hashlib

    parts = cluster.per_partition(_row_hashes, df) if cluster.is_dask(df) else [_row_hashes(df)]
    sha = hashlib.sha256()
    for hashes in parts:  # the same digest for the same rows, however they are partitioned
        sha.update(hashes.tobytes())
    return sha.hexdigest()[:16]


def _row_hashes(df: pd.DataFrame):
    return pd.util.hash_pandas_object(df, index=False).to_numpy()


def scored_on(cfg: DictConfig, test_rows: str) -> str:
    """What a version's recorded test metrics are about: the test rows, the task and the
    configured positive class, measured by this trainpipe. Two versions with the same key
    were scored on the same rows the same way."""
    import hashlib

    import trainpipe

    about = [test_rows, cfg.dataset.task, cfg.dataset.target,
             str(cfg.dataset.get("positive_class")), trainpipe.__version__]
    return hashlib.sha256("\0".join(about).encode()).hexdigest()[:16]


def _recorded(registry, champion, key: str, criteria: Criteria) -> dict[str, float] | None:
    """The champion's test metrics as its own run recorded them, when they are about these
    very rows (the same `scored_on`): scoring it again would give the same numbers."""
    if champion.tags.get(SCORED_ON) != key:
        return None
    recorded = registry.test_metrics(champion)
    return recorded if criteria.primary in recorded else None


def score(registry, champion, cfg: DictConfig, test: pd.DataFrame
          ) -> tuple[dict[str, float] | None, str | None]:
    """The champion's test metrics on `test` (raw rows, target included), or why it cannot
    score them. Errors reaching the store (a model that will not download) are raised."""
    task, target = cfg.dataset.task, cfg.dataset.target
    trained_for = champion.tags.get("trainpipe.task")
    if trained_for and trained_for != task:
        return None, f"it was trained for a {trained_for} task, this one is {task}"
    try:
        model = registry.load(champion)
    except ValueError as exc:
        return None, str(exc)
    if (task == "regression") == hasattr(model, "predict_proba"):
        kind = "a classifier" if hasattr(model, "predict_proba") else "no classifier"
        return None, f"it is {kind}, this is a {task} task"
    columns = list(getattr(model, "feature_names_in_", []))
    missing = [c for c in columns if c not in test.columns]
    if missing:
        return None, (f"it needs columns these rows lack: {', '.join(missing[:10])}"
                      + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    try:
        y, pred, proba = predict_rows(model, test, target, task, columns or None)
        classes = getattr(model, "classes_", None)
        scores = metrics_of(task, y, pred, proba, classes, positive_class(cfg.dataset, classes))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, ConfigError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return None, f"scoring failed: {shorten(text, 300)}"
    return {f"test_{k}": float(v) for k, v in scores.items()}, None


def to_markdown(registration: dict) -> str:
    r = registration
    lines = [f"# Gate report: {r['name']} version {r['version']}", "",
             f"**{r['decision'].upper()}**: {r['line']}", "",
             f"- model: `{r['model_uri']}`"
             + ("" if r["registered_now"] else " (already a version: not registered again)"),
             f"- champion before: {_v(r['champion_before'])}; after: {_v(r['champion_after'])}",
             f"- scored on {r['test_rows']:,} test rows (this run's test split)"]
    if r["champion_problem"]:
        lines.append(f"- champion version {r['champion_before']} cannot score these rows: "
                     f"{r['champion_problem']}")
    c = r["criteria"]
    bounds = ", ".join(f"{m} {k} {v:g}" for m, b in c["metrics"].items() for k, v in b.items())
    lines += ["", "## Criteria", "", f"- bounds: {bounds or 'none'}",
              f"- beat the champion: {'yes' if c['beat_champion'] else 'no'} on {c['primary']} "
              f"({'higher' if c['higher_is_better'] else 'lower'} is better) by at least "
              f"{c['min_delta']:g}", "", "## Checks", ""]
    lines += [f"- {reason}" for reason in r["reasons"]]
    new, champion = r["scores"]["new"], r["scores"]["champion"] or {}
    lines += ["", "## Test metrics (same rows)", "",
              f"| metric | version {r['version']} | champion {_v(r['champion_before'])} |",
              "|---|---:|---:|"]
    for metric in sorted(set(new) | set(champion)):
        lines.append(f"| {metric} | {_n(new.get(metric))} | {_n(champion.get(metric))} |")
    return "\n".join(lines) + "\n"


def _v(version) -> str:
    return f"version {version}" if version is not None else "none"


def _n(value) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4f}"
