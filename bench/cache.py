"""How fast is a repeated `trainpipe run` when every step is cached?

Times a full run (`trainpipe run --force`, every step redone) against the same command
without --force right after it (every step cached), alternating, each a fresh process,
after one warm-up run that creates the store (lake + SQLite MLflow store in
bench/work/cache/). Then shows where the cached run's time goes:
  - the per-step seconds the CLI prints;
  - phases of the cached run, from wall-clock timers wrapped around trainpipe's functions
    in-process (HARNESS below), also with the background warm-up thread switched off;
  - `python -X importtime` of the cached run, summed per top-level package;
  - fresh-interpreter imports, and the time to open the MLflow store.
Last, one full/cached pair on a copy of the data with every row repeated `--factor` times
(bench/hotel_data.py writes it to bench/work/data/), in the same store.

    python bench/cache.py [--data PATH] [--repeats 5] [--factor 100] [--src DIR]

Prints a markdown report; the raw numbers go to bench/work/cache.json.
Target: median cached/full ratio <= 0.10.
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
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hotel_data import WORK, git_state, machine, parse_args, rows, run_env, scaled_copy

SCRATCH = WORK / "cache"
STEPS = ("ingest", "validate", "split", "features", "train", "evaluate")
TARGET_RATIO = 0.10
SRC: Path | None = None  # --src: a folder holding the trainpipe package to measure
# A step's line in the CLI output: "  ✓ train       2.35s  ..." or "  = train  0.02s  cached"
STEP_LINE = re.compile(r"^\s*([✓=✗■]) (\w+)\s+([\d.]+)s\b", re.MULTILINE)
IMPORTS = {
    "python -c pass": "pass",
    "import trainpipe.cli": "import trainpipe.cli",
    "import pandas": "import pandas",
    "import mlflow": "import mlflow",
    "import trainpipe.pipeline (+ mlflow, pandas, steps)": "import trainpipe.pipeline",
}
# Opening the SQLite store in a fresh interpreter, after `import mlflow`: the lazy import of
# MLflow's SQLAlchemy store, then the first and a second client query. argv[1]: the URI.
STORE_OPEN = """
import json, sys, time
import mlflow
t0 = time.perf_counter()
import mlflow.store.tracking.sqlalchemy_store
t1 = time.perf_counter()
mlflow.MlflowClient(sys.argv[1]).search_experiments()
t2 = time.perf_counter()
mlflow.MlflowClient(sys.argv[1]).search_experiments()
t3 = time.perf_counter()
print(json.dumps({"import SQLAlchemy store": t1 - t0, "first search_experiments": t2 - t1,
                  "second search_experiments": t3 - t2}))
"""
# `trainpipe run` in-process with wall-clock timers around trainpipe's functions (no
# profiler). argv[1]: "warm-up" or "no-warm-up" (trainpipe.tracking.warm_up made a no-op);
# the rest: trainpipe's arguments. Prints "PHASES {json}" to stderr from the last atexit
# hook: seconds per phase, and monotonic timestamps (same clock as the parent's).
HARNESS = """
import atexit, json, sys, time
started = time.perf_counter()
spent, stamps = {}, {}
atexit.register(lambda: print("PHASES " + json.dumps(
    {"started": started, "stamps": stamps | {"last atexit": time.perf_counter()},
     "spent": spent}), file=sys.stderr, flush=True))

def wrap(owner, name, label):
    func = getattr(owner, name)
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, timed)

t = time.perf_counter()
import trainpipe.cli as cli
spent["import trainpipe.cli"] = time.perf_counter() - t
t = time.perf_counter()
import trainpipe.pipeline as pipeline
spent["import trainpipe.pipeline (mlflow, pandas, steps)"] = time.perf_counter() - t
from trainpipe import config, tracking
from trainpipe.steps import ingest
wrap(config, "compose", "config.compose (hydra)")
wrap(pipeline, "run", "pipeline.run")
wrap(tracking.Tracking, "__init__", "Tracking.__init__ (MLflow SQLAlchemy store)")
wrap(tracking, "warm_up", "warm_up() call (starts the thread)")
wrap(ingest, "read_sources", "ingest.read_sources (read + sha256)")
wrap(pipeline, "fingerprints", "pipeline.fingerprints")
wrap(pipeline, "_cached", "pipeline._cached (manifests)")
wrap(tracking.mlflow, "set_experiment", "mlflow.set_experiment")
wrap(tracking.Tracking, "_end_stale_runs", "Tracking._end_stale_runs")
wrap(tracking, "_git_tags", "tracking._git_tags (git subprocesses)")
wrap(tracking, "_environment", "tracking._environment (package versions)")
wrap(tracking.Tracking, "_log_files", "Tracking._log_files (config.yaml, environment.json)")
wrap(tracking.Tracking, "log_sources", "Tracking.log_sources")
wrap(pipeline, "_run_step", "6 x pipeline._run_step (child runs)")
wrap(cli, "_summary", "cli._summary")
if sys.argv[1] == "no-warm-up":
    tracking.warm_up = lambda: None
sys.argv = ["trainpipe", *sys.argv[2:]]
try:
    cli.main()
finally:
    stamps["main returned"] = time.perf_counter()
"""
# Phases inside pipeline.run (the rest of it is the parent run's own MLflow calls).
IN_RUN = ("Tracking.__init__ (MLflow SQLAlchemy store)", "warm_up() call (starts the thread)",
          "ingest.read_sources (read + sha256)", "pipeline.fingerprints",
          "pipeline._cached (manifests)", "mlflow.set_experiment", "Tracking._end_stale_runs",
          "tracking._git_tags (git subprocesses)", "tracking._environment (package versions)",
          "Tracking._log_files (config.yaml, environment.json)", "Tracking.log_sources",
          "6 x pipeline._run_step (child runs)")


class RunFailed(Exception):
    """A benchmarked command exited non-zero, or did not run/cache the steps it should."""


def timed(cmd: list[str]) -> tuple[float, str, str, float]:
    """Wall seconds of one fresh process run in the scratch folder, its stdout and stderr,
    and the monotonic time it ended."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=SCRATCH, env=run_env(SRC), capture_output=True, text=True)
    end = time.perf_counter()
    if proc.returncode != 0:
        raise RunFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return end - start, proc.stdout, proc.stderr, end


def store_uri() -> str:
    return f"sqlite:///{SCRATCH / 'mlflow.db'}"


def run_args(data: Path, force: bool) -> list[str]:
    return ["run", *(["--force"] if force else []), f"dataset.source={data}",
            f"lake.root={SCRATCH / 'lake'}", f"tracking.uri={store_uri()}"]


def trainpipe(data: Path, force: bool) -> tuple[float, dict[str, float]]:
    """One `trainpipe run`: wall seconds and the CLI's per-step seconds. Fails unless every
    step was redone (force) or every step was cached (no force)."""
    exe = Path(sys.executable).with_name("trainpipe")
    seconds, stdout, _, _ = timed([str(exe) if exe.exists() else "trainpipe",
                                   *run_args(data, force)])
    marks = {name: mark for mark, name, _ in STEP_LINE.findall(stdout)}
    want = "✓" if force else "="
    if marks != dict.fromkeys(STEPS, want):
        raise RunFailed(f"expected every step {want!r}, got {marks}:\n{stdout}")
    return seconds, {name: float(s) for _, name, s in STEP_LINE.findall(stdout)}


def phases(data: Path, warm_up: bool) -> dict[str, float]:
    """Seconds per phase of one cached run under HARNESS; the phases add up to the wall."""
    start = time.perf_counter()
    wall, stdout, stderr, end = timed([sys.executable, "-c", HARNESS,
                                       "warm-up" if warm_up else "no-warm-up",
                                       *run_args(data, False)])
    if stdout.count(" cached") < len(STEPS):
        raise RunFailed(f"harness run was not fully cached:\n{stdout}")
    found = json.loads(stderr.split("PHASES ", 1)[1])
    spent, stamps = found["spent"], found["stamps"]
    out = {"interpreter start-up (until the first line runs)": found["started"] - start,
           "import trainpipe.cli": spent["import trainpipe.cli"],
           "import trainpipe.pipeline (mlflow, pandas, steps)":
               spent["import trainpipe.pipeline (mlflow, pandas, steps)"],
           "config.compose (hydra)": spent["config.compose (hydra)"]}
    out |= {label: spent.get(label, 0.0) for label in IN_RUN}
    out["rest of pipeline.run (parent run: create/start/end, params, tags, metrics)"] = (
        spent["pipeline.run"] - sum(spent.get(label, 0.0) for label in IN_RUN))
    out["cli._summary"] = spent["cli._summary"]
    out["exit: atexit hooks (MLflow end_run, logging)"] = (
        stamps["last atexit"] - stamps["main returned"])
    out["interpreter teardown after atexit"] = end - stamps["last atexit"]
    out["other (typer, printing, gc.freeze, between the phases)"] = wall - sum(out.values())
    out["total wall"] = wall
    return out


def import_costs(data: Path, warm_up: bool) -> dict[str, Any]:
    """`python -X importtime` of a cached run (under HARNESS, with or without the warm-up
    thread): self time summed per top-level package. importtime adds its own overhead,
    so only the proportions count."""
    _, _, stderr, _ = timed([sys.executable, "-X", "importtime", "-c", HARNESS,
                             "warm-up" if warm_up else "no-warm-up", *run_args(data, False)])
    per_package: dict[str, float] = defaultdict(float)
    modules = 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s+(\S.*)$", line)
        if m:
            modules += 1
            per_package[m.group(2).strip().split(".")[0]] += int(m.group(1)) / 1e6
    top = dict(sorted(per_package.items(), key=lambda kv: -kv[1]))
    return {"modules": modules, "seconds": sum(top.values()), "per_package": top}


def import_seconds(repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of `python -c "<import>"` (interpreter start included)."""
    return {label: statistics.median(timed([sys.executable, "-c", code])[0]
                                     for _ in range(repeats))
            for label, code in IMPORTS.items()}


def store_open(repeats: int = 3) -> dict[str, float]:
    runs = [json.loads(timed([sys.executable, "-c", STORE_OPEN, store_uri()])[1])
            for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def code_under_test() -> dict[str, str]:
    """Which trainpipe the runs import, and the repo's commit and uncommitted src/ edits."""
    return {"trainpipe": timed([sys.executable, "-c",
                                "import trainpipe; print(trainpipe.__file__)"])[1].strip(),
            **git_state()}


def median_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(d[key] for d in dicts) for key in dicts[0]}


def report(r: dict[str, Any]) -> str:
    s, code = r["summary"], r["code"]
    verdict = "meets" if s["ratio_median"] <= TARGET_RATIO else "misses"
    edits = "has uncommitted src/ edits" if code["src_changes"] else "has no src/ edits"
    fmt = ", ".join
    lines = [
        f"## Cached re-run vs full run ({r['repeats']} pairs, {r['rows']:,} rows)", "",
        f"trainpipe imported from {code['trainpipe']} (repo HEAD {code['git_commit']}; "
        f"working tree {edits}); load average {r['machine']['loadavg_start'][0]:.2f} → "
        f"{r['machine']['loadavg_end'][0]:.2f}", "",
        "| | median s | min s |", "|---|---:|---:|",
        f"| full run (`--force`) | {s['full_median']:.2f} | {s['full_min']:.2f} |",
        f"| cached run | {s['cached_median']:.2f} | {s['cached_min']:.2f} |",
        f"| ratio cached/full (per pair) | {s['ratio_median']:.3f} | {s['ratio_min']:.3f} |", "",
        f"Median ratio {s['ratio_median']:.3f} {verdict} the target (<= {TARGET_RATIO}).", "",
        "full s:   " + fmt(f"{x:.2f}" for x in r["full_seconds"]),
        "cached s: " + fmt(f"{x:.2f}" for x in r["cached_seconds"]), "",
        "## Per-step seconds printed by the CLI (median)", "",
        "| step | full | cached |", "|---|---:|---:|"]
    full, cached = median_of(r["full_steps"]), median_of(r["cached_steps"])
    lines += [f"| {step} | {full[step]:.2f} | {cached[step]:.2f} |" for step in STEPS]
    lines += [f"| sum of the steps | {sum(full.values()):.2f} | {sum(cached.values()):.2f} |",
              f"| outside the steps | {s['full_median'] - sum(full.values()):.2f} | "
              f"{s['cached_median'] - sum(cached.values()):.2f} |", "",
              f"## Cached run by phase (in-process timers, median of {r['repeats']})", "",
              "| phase | s, as is | s, warm-up thread off |", "|---|---:|---:|"]
    on, off = median_of(r["phases_warm_up"]), median_of(r["phases_no_warm_up"])
    lines += [f"| {k} | {on[k]:.3f} | {off[k]:.3f} |" for k in on]
    diffs = [a["total wall"] - b["total wall"]
             for a, b in zip(r["phases_warm_up"], r["phases_no_warm_up"], strict=True)]
    lines += ["", f"Warm-up thread off (alternating pairs): median saving "
              f"{statistics.median(diffs):.2f} s per cached run "
              f"(per pair: {fmt(f'{d:.2f}' for d in diffs)}).", "",
              "## Imports", "",
              "`python -X importtime` of a cached run: self time summed per top-level package "
              "(importtime adds overhead; only the proportions count).", "",
              "| package | s, as is | s, warm-up thread off |", "|---|---:|---:|"]
    imp, imp_off = r["imports"], r["imports_no_warm_up"]
    lines += [f"| {p} | {sec:.3f} | {imp_off['per_package'].get(p, 0.0):.3f} |"
              for p, sec in list(imp["per_package"].items())[:15]]
    lines += [f"| all ({imp['modules']:,} / {imp_off['modules']:,} modules) | "
              f"{imp['seconds']:.2f} | {imp_off['seconds']:.2f} |"]
    lines += ["", "Fresh-interpreter wall seconds (median of 3):", "", "| command | s |",
              "|---|---:|"]
    lines += [f"| `{label}` | {sec:.2f} |" for label, sec in r["import_seconds"].items()]
    lines += [f"| after `import mlflow`: {k} | {v:.3f} |" for k, v in r["store_open"].items()]
    if r.get("big"):
        b = r["big"]
        lines += ["", f"## Scaled data: {b['rows']:,} rows ({b['factor']}x), one pair", "",
                  "| | full | cached |", "|---|---:|---:|",
                  f"| wall s | {b['full_seconds']:.2f} | {b['cached_seconds']:.2f} |"]
        lines += [f"| {step} | {b['full_steps'][step]:.2f} | {b['cached_steps'][step]:.2f} |"
                  for step in STEPS]
        lines += ["", f"Ratio cached/full: {b['cached_seconds'] / b['full_seconds']:.3f}.",
                  "", "Cached run by phase (one harness run):", "", "| phase | s |",
                  "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in b["phases"].items()]
    return "\n".join(lines)


def fresh_scratch() -> None:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs")
    parser.add_argument("--factor", type=int, default=100,
                        help="rows repeated this many times for the scaled pair (0: skip it)")
    args = parse_args(parser)
    global SRC
    SRC, data = args.src, args.data

    fresh_scratch()
    code = code_under_test()
    load_start = os.getloadavg()
    trainpipe(data, force=True)  # warm-up: creates the store and the lake
    full_s, cached_s, full_steps, cached_steps = [], [], [], []
    for i in range(args.repeats):
        for force, secs, steps in ((True, full_s, full_steps), (False, cached_s, cached_steps)):
            seconds, per_step = trainpipe(data, force)
            secs.append(seconds)
            steps.append(per_step)
        print(f"pair {i + 1}/{args.repeats}: full {full_s[-1]:.2f}s  cached {cached_s[-1]:.2f}s",
              file=sys.stderr)
    ratios = [c / f for c, f in zip(cached_s, full_s, strict=True)]
    with_thread, without = [], []
    for _ in range(args.repeats):
        with_thread.append(phases(data, warm_up=True))
        without.append(phases(data, warm_up=False))
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "trainpipe " + " ".join(run_args(data, True)),
        "data": str(data), "rows": rows(data), "code": code, "repeats": args.repeats,
        "full_seconds": full_s, "cached_seconds": cached_s, "ratios": ratios,
        "summary": {"full_median": statistics.median(full_s), "full_min": min(full_s),
                    "cached_median": statistics.median(cached_s), "cached_min": min(cached_s),
                    "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                    "target_ratio": TARGET_RATIO},
        "full_steps": full_steps, "cached_steps": cached_steps,
        "phases_warm_up": with_thread, "phases_no_warm_up": without,
        "imports": import_costs(data, warm_up=True),
        "imports_no_warm_up": import_costs(data, warm_up=False),
        "import_seconds": import_seconds(),
        "store_open": store_open(),
    }
    if args.factor > 0:
        big = scaled_copy(data, args.factor)
        print(f"scaled pair on {big} ...", file=sys.stderr)
        full, full_steps_big = trainpipe(big, force=True)
        cached, cached_steps_big = trainpipe(big, force=False)
        results["big"] = {"data": str(big), "factor": args.factor, "rows": rows(big),
                          "full_seconds": full, "cached_seconds": cached,
                          "full_steps": full_steps_big, "cached_steps": cached_steps_big,
                          "phases": phases(big, warm_up=True)}
    results["machine"] = machine(load_start)
    (WORK / "cache.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nraw numbers: {WORK / 'cache.json'}")


if __name__ == "__main__":
    try:
        main()
    except RunFailed as exc:
        sys.exit(f"failed: {exc}")
