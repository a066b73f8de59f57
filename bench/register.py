"""How long does the register step take on a full run, champion loading and scoring included?

In a scratch folder (bench/work/register/: a lake and a SQLite store), one warm-up
`trainpipe run` on the hotel data registers version 1 (the champion). Then `--repeats` times
`trainpipe run --force`, each a fresh process: every step is redone, so each run registers a
new version (a new forest), and the gate loads the current champion (the previous ~60 MB
forest) from the store and scores it on the run's 6,315 test rows. The register step's
seconds are the ones the CLI prints for it (its child run, the registry calls, the champion's
load and scoring, the gate report and publishing its output).

Then, in one fresh interpreter, where the step's time goes: the register step's function
with timers around the registry calls, the champion's load, its prediction and evaluate's
metric code; and, for comparison, `mlflow.models.evaluate` of the same champion on the same
rows (what the issue measured at 4-7 s).

    python bench/register.py [--data PATH] [--repeats 5] [--stack] [--src DIR]

With --stack, the same forced runs also on a stack of their own (as bench/stack_vs_local.py
makes it: PostgreSQL, an MLflow server, artifacts and the lake on a moto S3 server), where
the champion comes through the server from S3.

Prints a markdown report; the raw numbers go to bench/work/register.json.
Target: the register step under 1 s on the hotel data.
"""

import argparse
import contextlib
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

from hotel_data import WORK, git_state, machine, parse_args, run_env

SCRATCH = WORK / "register"
TARGET_SECONDS = 1.0
REGISTER_LINE = re.compile(r"^\s*✓ register\s+([\d.]+)s\s+(.*)$", re.MULTILINE)
# One register step in-process, timed by phase. argv[1:]: trainpipe's overrides (data, lake,
# store). Prints "PHASES {json}".
HARNESS = """
import json, sys, time
import sklearn.ensemble, sklearn.metrics, sklearn.pipeline  # imported before a step runs
import mlflow, mlflow.sklearn
from trainpipe import config, pipeline, registry
from trainpipe.steps import ingest, register
from trainpipe.tracking import Tracking

cfg = config.compose(sys.argv[1:])
catalog = pipeline.catalog_for(cfg, ingest.read_sources(cfg))
inputs = {name: catalog.load(name, None) for name in ("model_uri", "metrics", "splits")}
Tracking(cfg)  # the pipeline has made one before the step runs
# The model of the last run is the champion: give the alias back to version 1, so the step
# loads and scores a champion, as in the measured runs.
registry.Registry(cfg).promote(cfg.registry.name, 1, "bench/register.py: a champion to score")
spent = {}
depth = [0]

def wrap(owner, name, label, inner=False):
    # time a call; calls made inside another timed call count only if `inner`
    func = getattr(owner, name)
    spent[label] = 0.0  # rows in the order wrapped
    def timed(*args, **kwargs):
        outer = depth[0] == 0
        depth[0] += 1
        t = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            depth[0] -= 1
            if outer or inner:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, timed)

wrap(registry.Registry, "__init__", "Registry(cfg): the MLflow client")
wrap(registry.Registry, "register", "register the version (or find it)")
wrap(register, "rows_digest", "digest of the test rows")
wrap(registry.Registry, "move", "challenger alias (+ who/when/why tags)")
wrap(registry.Registry, "holder", "champion look-up")
wrap(register, "score", "score the champion on the test rows, of which:")
wrap(registry.Registry, "load", "  load it (mlflow.sklearn.load_model)", inner=True)
wrap(register, "predict", "  predict the test rows", inner=True)
wrap(register, "metrics_of", "  evaluate's metric code", inner=True)
wrap(registry.Registry, "crown", "promote (champion alias + tags)")
wrap(registry.Registry, "set_tags", "version tags (the gate's decision)")
wrap(register, "to_markdown", "gate report")
t = time.perf_counter()
out, report = register.run(cfg, **inputs)
total = time.perf_counter() - t
spent["rest (decision, registration dict, JSON)"] = total - sum(
    v for k, v in spent.items() if not k.startswith("  "))
spent["register.run total"] = total

champion = registry.Registry(cfg).holder(cfg.registry.name, "champion")
test = inputs["splits"]["test"]
t = time.perf_counter()
with mlflow.start_run(run_name="bench mlflow.models.evaluate"):
    mlflow.models.evaluate(f"models:/{champion.name}/{champion.version}", data=test,
                           targets=cfg.dataset.target, model_type="classifier",
                           evaluators=["default"])
evaluate_seconds = time.perf_counter() - t
print("PHASES " + json.dumps({"spent": spent, "line": report.summary,
                              "mlflow.models.evaluate": evaluate_seconds}))
"""


def trainpipe_exe() -> str:
    exe = Path(sys.executable).with_name("trainpipe")
    return str(exe) if exe.exists() else "trainpipe"


def run(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([trainpipe_exe(), *args], cwd=SCRATCH, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"exit {proc.returncode}: trainpipe {' '.join(args)}\n{proc.stdout}\n"
                 f"{proc.stderr}")
    return wall, proc.stdout


def rounds(base: list[str], env: dict, repeats: int) -> list[dict]:
    """A warm-up run (version 1, the first champion), then `repeats` forced runs."""
    run(["run", *base], env)
    found_rounds = []
    for i in range(repeats):
        wall, stdout = run(["run", "--force", *base], env)
        found = REGISTER_LINE.search(stdout)
        if found is None:
            sys.exit(f"no register line in round {i + 1}:\n{stdout}")
        found_rounds.append({"wall": wall, "register": float(found[1]),
                             "line": found[2].strip()})
        print(f"round {i + 1}: register {found[1]} s of {wall:.2f} s: {found[2].strip()}",
              file=sys.stderr)
    return found_rounds


def phases(base: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", HARNESS, *base], cwd=SCRATCH, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"harness failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("PHASES ", 1)[1])


@contextlib.contextmanager
def on_the_stack(data: Path, env: dict):
    """(trainpipe arguments, environment) for runs on a stack of their own: PostgreSQL, an
    MLflow server, artifacts and the lake on a moto S3 server (as bench/stack_vs_local.py)."""
    import boto3
    import stack_vs_local as svl

    from trainpipe import stack

    svl.SCRATCH.mkdir(parents=True, exist_ok=True)  # moto's log
    moto, endpoint = svl.start_moto()
    aws = svl.AWS | {"AWS_ENDPOINT_URL": endpoint}
    folder = svl.reachable_folder("bench-register-")
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])
        for bucket in (svl.LAKE_BUCKET, svl.ARTIFACTS_BUCKET):
            s3.create_bucket(Bucket=bucket)
        key = "lake/raw/hotel_bookings/train.csv"
        s3.upload_file(str(data), svl.LAKE_BUCKET, key)
        clean = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        info = stack.up(folder / "stack", port=0, env=clean | aws,
                        artifacts_destination=f"s3://{svl.ARTIFACTS_BUCKET}/mlartifacts")
        yield (["tracking=server", "lake=s3", f"lake.root=s3://{svl.LAKE_BUCKET}/lake",
                f"dataset.source=s3://{svl.LAKE_BUCKET}/{key}"], clean | aws | info.env)
    finally:
        stack.down(folder / "stack")
        shutil.rmtree(folder, ignore_errors=True)
        moto.terminate()
        moto.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stack", action="store_true", help="also on the PostgreSQL + "
                        "MLflow server + S3 stack")
    args = parse_args(parser)
    load_start = os.getloadavg()
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    env = run_env(args.src)
    src = args.src or Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    base = [f"dataset.source={args.data}", f"lake.root={SCRATCH / 'lake'}",
            f"tracking.uri=sqlite:///{SCRATCH / 'mlflow.db'}"]
    record = {"measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
              "data": str(args.data), "rounds": rounds(base, env, args.repeats)}
    record["phases"] = phases(base, env)
    if args.stack:
        sys.path.insert(0, str(src))
        with on_the_stack(args.data, env) as (stack_base, stack_env):
            record["stack_rounds"] = rounds(stack_base, stack_env, args.repeats)
            record["stack_phases"] = phases(stack_base, stack_env)
    record |= git_state() | machine(load_start)
    (WORK / "register.json").write_text(json.dumps(record, indent=2))
    print(report(record))


def report(r: dict) -> str:
    where = [("local", "rounds", "phases", "the embedded store (SQLite, artifacts in a folder)")]
    if "stack_rounds" in r:
        where.append(("stack", "stack_rounds", "stack_phases", "the stack (PostgreSQL + MLflow "
                      "server, artifacts and lake on moto S3)"))
    lines = [f"measured {r['measured']} UTC, commit {r['git_commit']}"
             + (" + uncommitted src/ changes" if r["src_changes"] else "")
             + f", 1-min load {r['loadavg_start'][0]:.2f}→{r['loadavg_end'][0]:.2f}", "",
             "| store | register step median s | min | max | raw | whole run median s |",
             "|---|---:|---:|---:|---|---:|"]
    for name, key, _, _ in where:
        seconds = [x["register"] for x in r[key]]
        lines.append(f"| {name} | **{statistics.median(seconds):.2f}** | {min(seconds):.2f} | "
                     f"{max(seconds):.2f} | {' '.join(f'{s:.2f}' for s in seconds)} | "
                     f"{statistics.median(x['wall'] for x in r[key]):.2f} |")
    local = statistics.median(x["register"] for x in r["rounds"])
    lines += ["", f"Target (register under {TARGET_SECONDS:g} s, embedded store): "
              f"**{'met' if local < TARGET_SECONDS else 'NOT met'}**. Last gate line: "
              f"`{r['rounds'][-1]['line']}`", "",
              "One register step in-process (fresh interpreter, scikit-learn and MLflow "
              "imported first, as in a run), on " + " and on ".join(w[0] for w in where) + ":",
              "", "| phase | " + " | ".join(f"{w[0]} s" for w in where) + " |",
              "|---|" + "---:|" * len(where)]
    for phase in r["phases"]["spent"]:
        lines.append(f"| {phase} | " + " | ".join(
            f"{r[w[2]]['spent'].get(phase, 0.0):.3f}" for w in where) + " |")
    lines += ["", "`mlflow.models.evaluate` of the same champion on the same rows: " + ", ".join(
        f"{r[w[2]]['mlflow.models.evaluate']:.2f} s ({w[0]})" for w in where) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
