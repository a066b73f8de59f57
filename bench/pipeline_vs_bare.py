"""How much does `trainpipe run` cost over doing the same work by hand?

Times `trainpipe run --force model=random_forest` (lake + SQLite MLflow store in
bench/work/, store already created by a warm-up run; every step redone and recorded: the
runs, the model, the plots, the registry gate, the run report) against
bench/bare_forest.py (the same read, split and forest fit, no tracking), alternating the
two, each as a fresh process. Each round also times the same run with a tracker of its own
(TRAINPIPE_WARM_TRACKER=0: what a first run pays, before the warm tracker is up). Then
records each default model's test ROC AUC and where trainpipe's time goes.

    python bench/pipeline_vs_bare.py [--data PATH] [--repeats 5] [--src DIR]

It measures the trainpipe the venv imports (the working tree, edits included), or the
package under `--src DIR` (e.g. a `git archive` of a commit's src/). Prints a markdown
report; the raw numbers go to bench/work/pipeline_vs_bare.json.
Target: median trainpipe/bare ratio <= 1.6.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hotel_data import BENCH, WORK, git_state, machine, parse_args, run_env

MODELS = ("random_forest", "lightgbm", "logistic_regression")
STEPS = ("ingest", "validate", "split", "features", "train", "evaluate", "register")
TARGET_RATIO = 1.6
SRC: Path | None = None  # --src: a folder holding the trainpipe package to measure
# Imports timed in a fresh interpreter: what `trainpipe run` loads vs what the bare script does.
IMPORTS = {
    "python -c pass": "pass",
    "import trainpipe.cli": "import trainpipe.cli",
    "import mlflow": "import mlflow",
    "import trainpipe.pipeline (+ mlflow, steps)": "import trainpipe.pipeline",
    "bare imports (pandas, sklearn, joblib)": (
        "import joblib, pandas, sklearn.ensemble, sklearn.metrics, sklearn.model_selection"),
}
COLD = {"TRAINPIPE_WARM_TRACKER": "0"}  # the run starts its own tracker (trainpipe.warm)
# A finished step's line in the CLI output: "  ✓ train       2.35s  RandomForest..."
STEP_LINE = re.compile(r"^\s*✓ (\w+)\s+([\d.]+)s\b", re.MULTILINE)


class RunFailed(Exception):
    """A benchmarked command exited non-zero."""


def trainpipe_cmd(data: Path, model: str) -> list[str]:
    exe = Path(sys.executable).with_name("trainpipe")
    # --force: every timed run does the whole work (re-runs would otherwise be cached)
    return [str(exe) if exe.exists() else "trainpipe", "run", "--force", f"dataset.source={data}",
            f"model={model}", f"lake.root={WORK / 'lake'}",
            f"tracking.uri=sqlite:///{WORK / 'mlflow.db'}"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds of one fresh process run in the scratch folder, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=WORK, env=run_env(SRC) | (env or {}), capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RunFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def code_under_test() -> dict[str, str]:
    """Which trainpipe the runs import, and the repo's commit and uncommitted src/ edits."""
    return {"trainpipe": timed([sys.executable, "-c",
                                "import trainpipe; print(trainpipe.__file__)"])[1].strip(),
            **git_state()}


def step_seconds(stdout: str) -> dict[str, float]:
    return {name: float(s) for name, s in STEP_LINE.findall(stdout)}


def import_seconds(repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of `python -c "<import>"` (interpreter start included)."""
    return {label: statistics.median(timed([sys.executable, "-c", code])[0]
                                     for _ in range(repeats))
            for label, code in IMPORTS.items()}


def model_aucs(data: Path) -> dict[str, float | None]:
    """Run each default model once; read its test_roc_auc back from the MLflow store
    (None for a model whose run failed: the timings above are kept all the same)."""
    failed = set()
    for model in MODELS:
        try:
            timed(trainpipe_cmd(data, model))
        except RunFailed as exc:
            print(f"model {model} failed:\n{exc}", file=sys.stderr)
            failed.add(model)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{WORK / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["trainpipe"],
                              filter_string="tags.`trainpipe.kind` = 'pipeline'",
                              order_by=["attributes.start_time DESC"])
    aucs: dict[str, float | None] = {}
    for model in MODELS:
        latest = runs[runs["tags.trainpipe.model"] == model].iloc[0]
        aucs[model] = None if model in failed else float(latest["metrics.test_roc_auc"])
    return aucs


def fresh_scratch() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    for name in ("lake", "mlruns", "mlartifacts", "outputs"):
        shutil.rmtree(WORK / name, ignore_errors=True)
    (WORK / "mlflow.db").unlink(missing_ok=True)


def report(r: dict[str, Any]) -> str:
    s, med = r["summary"], statistics.median
    verdict = "meets" if s["ratio_median"] <= TARGET_RATIO else "misses"
    code = r["code"]
    edits = "has uncommitted src/ edits" if code["src_changes"] else "has no src/ edits"
    lines = [
        f"## trainpipe run vs bare script ({r['repeats']} rounds, random_forest)",
        "",
        f"trainpipe imported from {code['trainpipe']} (repo HEAD {code['git_commit']}; "
        f"working tree {edits})",
        "",
        "| | median s | min s |",
        "|---|---:|---:|",
        f"| `trainpipe run` | {s['trainpipe_median']:.2f} | {s['trainpipe_min']:.2f} |",
        f"| `trainpipe run`, tracker of its own (`TRAINPIPE_WARM_TRACKER=0`) "
        f"| {s['own_tracker_median']:.2f} | {min(r['own_tracker_seconds']):.2f} |",
        f"| bare script | {s['bare_median']:.2f} | {s['bare_min']:.2f} |",
        f"| ratio trainpipe/bare (per round) | {s['ratio_median']:.2f} | {s['ratio_min']:.2f} |",
        f"| ratio with a tracker of its own / bare | {s['own_tracker_ratio_median']:.2f} "
        f"| {min(r['own_tracker_ratios']):.2f} |",
        "",
        f"Median ratio {s['ratio_median']:.2f} {verdict} the target (<= {TARGET_RATIO}).",
        "",
        "trainpipe s: " + ", ".join(f"{x:.2f}" for x in r["trainpipe_seconds"]),
        "bare s:      " + ", ".join(f"{x:.2f}" for x in r["bare_seconds"]),
        "",
        "## trainpipe's time by step (median of the timed runs)",
        "",
        "As the CLI prints them: a step's seconds include its MLflow child run, its logging",
        "and its lake writes.",
        "",
        "| step | median s |",
        "|---|---:|",
    ]
    for step in STEPS:
        values = [run[step] for run in r["step_seconds"] if step in run]
        if values:
            lines.append(f"| {step} | {med(values):.2f} |")
    outside = [t - sum(run.values()) for t, run in zip(r["trainpipe_seconds"],
                                                      r["step_seconds"], strict=True)]
    lines += [f"| outside the steps (start-up, imports, config, parent run, report) "
              f"| {med(outside):.2f} |", "",
              "## Fresh-interpreter import times (median of 3)", "",
              "| command | s |", "|---|---:|"]
    lines += [f"| `{label}` | {sec:.2f} |" for label, sec in r["import_seconds"].items()]
    lines += ["", "## Test ROC AUC per default model", "", "| model | test_roc_auc |",
              "|---|---:|"]
    lines += [f"| {m} | {'run failed' if auc is None else f'{auc:.4f}'} |"
              for m, auc in r["test_roc_auc"].items()]
    lines.append(f"| bare script (forest, raw columns) | {med(r['bare_auc']):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs")
    args = parse_args(parser)
    global SRC
    SRC, data = args.src, args.data

    fresh_scratch()
    code = code_under_test()
    load_start = os.getloadavg()
    timed(trainpipe_cmd(data, "random_forest"))  # warm-up: creates the store and the lake
    bare_cmd = [sys.executable, str(BENCH / "bare_forest.py"), str(data)]
    pipe_s, cold_s, bare_s, steps, bare_auc = [], [], [], [], []
    for i in range(args.repeats):
        seconds, stdout = timed(trainpipe_cmd(data, "random_forest"))
        pipe_s.append(seconds)
        steps.append(step_seconds(stdout))
        # the same run with a tracker of its own, as a first run or TRAINPIPE_WARM_TRACKER=0
        cold_s.append(timed(trainpipe_cmd(data, "random_forest"), COLD)[0])
        seconds, stdout = timed(bare_cmd)
        bare_s.append(seconds)
        bare_auc.append(float(stdout.split()[-1]))
        print(f"round {i + 1}/{args.repeats}: trainpipe {pipe_s[-1]:.2f}s  own tracker "
              f"{cold_s[-1]:.2f}s  bare {bare_s[-1]:.2f}s", file=sys.stderr)
    ratios = [p / b for p, b in zip(pipe_s, bare_s, strict=True)]
    cold_ratios = [c / b for c, b in zip(cold_s, bare_s, strict=True)]

    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(load_start),
        "command": " ".join(trainpipe_cmd(data, "random_forest")),
        "data": str(data),
        "code": code,
        "repeats": args.repeats,
        "trainpipe_seconds": pipe_s,
        "own_tracker_seconds": cold_s,
        "bare_seconds": bare_s,
        "ratios": ratios,
        "own_tracker_ratios": cold_ratios,
        "summary": {"trainpipe_median": statistics.median(pipe_s), "trainpipe_min": min(pipe_s),
                    "own_tracker_median": statistics.median(cold_s),
                    "own_tracker_ratio_median": statistics.median(cold_ratios),
                    "bare_median": statistics.median(bare_s), "bare_min": min(bare_s),
                    "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                    "target_ratio": TARGET_RATIO},
        "step_seconds": steps,
        "bare_auc": bare_auc,
        "import_seconds": import_seconds(),
        "test_roc_auc": model_aucs(data),
    }
    (WORK / "pipeline_vs_bare.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nraw numbers: {WORK / 'pipeline_vs_bare.json'}")


if __name__ == "__main__":
    try:
        main()
    except RunFailed as exc:
        sys.exit(f"failed: {exc}")
