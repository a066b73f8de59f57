"""Which thread settings should the models default to on a shared machine?

Fits LightGBM (the default's 400 trees) and the random forest (200 trees) on the
transformed hotel data with each thread setting, alternating them round by round, each fit
in a fresh process (OpenMP reads its settings at start), on a quiet machine and then with
`--hogs N` busy processes (pure-Python loops, one core each) standing in for the other work
of a shared machine. Records the median seconds of each and its ratio to n_jobs=1, and the
test ROC AUC (the setting must not change the model's quality).

    python bench/threads.py [--data PATH] [--rounds 3] [--hogs 2]

Prints a markdown table; raw numbers go to bench/work/threads.json.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

from hotel_data import WORK, git_state, machine, parse_args

# (model, label, extra environment, n_jobs)
SETTINGS = [
    ("lightgbm", "n_jobs=1", {}, 1),
    ("lightgbm", "n_jobs=-1", {"OMP_WAIT_POLICY": "ACTIVE"}, -1),
    ("lightgbm", "n_jobs=-1, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, -1),
    ("lightgbm", "n_jobs=2, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    ("random_forest", "n_jobs=1", {}, 1),
    ("random_forest", "n_jobs=-1", {}, -1),
]

FIT = """
import json, sys, time
import numpy as np, pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
model, n_jobs, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
df = pd.read_csv(data)
y = df.pop("booking_status"); x = df.drop(columns=["id"])
xt, xs, yt, ys = train_test_split(x, y, test_size=0.15, random_state=42, stratify=y)
if model == "lightgbm":
    from lightgbm import LGBMClassifier
    est = LGBMClassifier(n_estimators=400, learning_rate=0.05, num_leaves=63, subsample=0.8,
                         subsample_freq=1, colsample_bytree=0.8, n_jobs=n_jobs,
                         random_state=42, verbose=-1)
else:
    from sklearn.ensemble import RandomForestClassifier
    est = RandomForestClassifier(n_estimators=200, max_depth=15, n_jobs=n_jobs, random_state=42)
t = time.perf_counter(); est.fit(xt, yt); seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "auc": roc_auc_score(ys, est.predict_proba(xs)[:, 1])}))
"""


def hog(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def measure(data, rounds: int) -> dict:
    times: dict[str, list[float]] = {}
    aucs: dict[str, float] = {}
    for _ in range(rounds):
        for model, label, env, n_jobs in SETTINGS:
            key = f"{model} · {label}"
            out = subprocess.run([sys.executable, "-c", FIT, model, str(n_jobs), str(data)],
                                 env=os.environ | env, capture_output=True, text=True,
                                 check=True).stdout
            result = json.loads(out)
            times.setdefault(key, []).append(result["seconds"])
            aucs[key] = result["auc"]
    return {k: {"median": statistics.median(v), "raw": v, "auc": aucs[k]}
            for k, v in times.items()}


def table(title: str, results: dict) -> str:
    lines = [f"**{title}**", "", "| model · setting | median fit s | / n_jobs=1 | test AUC |",
             "|---|---:|---:|---:|"]
    for key, r in results.items():
        base = results[key.split(" · ")[0] + " · n_jobs=1"]["median"]
        lines.append(f"| {key} | {r['median']:.2f} | {r['median'] / base:.2f} | "
                     f"{r['auc']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=2, help="busy processes for the loaded run")
    args = parse_args(parser)
    load = os.getloadavg()
    quiet = measure(args.data, args.rounds)
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=hog, args=(stop,)) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    time.sleep(1)
    try:
        loaded = measure(args.data, args.rounds)
    finally:
        stop.set()
        for h in hogs:
            h.join()
    record = {"when": datetime.now(UTC).isoformat(timespec="seconds"), **git_state(),
              "machine": machine(load), "rounds": args.rounds, "hogs": args.hogs,
              "as_found": quiet, "with_hogs": loaded}
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "threads.json").write_text(json.dumps(record, indent=2))
    print(f"# Thread settings ({record['when']}, load at start {load[0]:.2f})\n")
    print(table("the machine as found", quiet))
    print()
    print(table(f"with {args.hogs} busy processes beside", loaded))


if __name__ == "__main__":  # the hogs are spawned processes: guard the entry point
    main()
