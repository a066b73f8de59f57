"""How fast is `trainpipe run` when nothing changed, and what does it leave behind?

Rounds alternate a full run (`trainpipe run --force`: every step redone and recorded) with
the same command without --force right after it (nothing changed: every output is
published for this config), each a fresh process, in bench/work/cache/ (lake + SQLite
MLflow store) after one warm-up run. Records per round: both wall times, their ratio, and
how many MLflow runs each added to the store. Then, for the unchanged run: whether it
imported MLflow at all (`python -X importtime`), and a fresh interpreter's `pass` and
`import trainpipe.cli` for scale.

    python bench/cache.py [--data PATH] [--rounds 5] [--src DIR]

Prints a markdown report; raw numbers go to bench/work/cache.json.
Targets: median unchanged/full ratio <= 0.10; the unchanged run under 1 s on a quiet machine.
"""

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from hotel_data import WORK, git_state, machine, parse_args, run_env

SCRATCH = WORK / "cache"
TARGET_RATIO = 0.10
SRC: Path | None = None


def trainpipe_cmd(data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainpipe", "run", f"dataset.source={data}",
            f"lake.root={SCRATCH / 'lake'}", f"tracking.uri=sqlite:///{SCRATCH / 'mlflow.db'}",
            *extra]


def timed(cmd: list[str]) -> tuple[float, str, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=SCRATCH, env=run_env(SRC), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout, proc.stderr


def mlflow_runs() -> int:
    with sqlite3.connect(SCRATCH / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def measured(cmd: list[str]) -> dict:
    before = mlflow_runs()
    seconds, stdout, _ = timed(cmd)
    return {"seconds": seconds, "new_runs": mlflow_runs() - before, "stdout": stdout}


def imports_mlflow(data: Path) -> bool:
    _, _, stderr = timed([sys.executable, "-X", "importtime", *trainpipe_cmd(data)[1:]])
    return any(line.split("|")[-1].strip() == "mlflow" for line in stderr.splitlines())


def main() -> None:
    global SRC
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_args(parser)
    SRC = args.src
    load = __import__("os").getloadavg()
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    timed(trainpipe_cmd(args.data))  # warm-up: creates the store and the lake
    rounds = []
    for i in range(args.rounds):
        full = measured(trainpipe_cmd(args.data, "--force"))
        unchanged = measured(trainpipe_cmd(args.data))
        if "up to date" not in unchanged["stdout"]:
            sys.exit(f"round {i + 1}: the run without --force was not up to date:\n"
                     f"{unchanged['stdout']}")
        rounds.append({"full": full["seconds"], "unchanged": unchanged["seconds"],
                       "ratio": unchanged["seconds"] / full["seconds"],
                       "full_new_runs": full["new_runs"],
                       "unchanged_new_runs": unchanged["new_runs"]})
        print(f"round {i + 1}: full {full['seconds']:.2f} s ({full['new_runs']} runs), "
              f"unchanged {unchanged['seconds']:.2f} s ({unchanged['new_runs']} runs)",
              file=sys.stderr)
    scale = {what: timed([sys.executable, "-c", code])[0] for what, code in
             {"python -c pass": "pass", "import trainpipe.cli": "import trainpipe.cli"}.items()}
    record = {"when": datetime.now(UTC).isoformat(timespec="seconds"), **git_state(),
              "machine": machine(load), "data": str(args.data), "rounds": rounds,
              "median_ratio": statistics.median(r["ratio"] for r in rounds),
              "median_full": statistics.median(r["full"] for r in rounds),
              "median_unchanged": statistics.median(r["unchanged"] for r in rounds),
              "unchanged_imports_mlflow": imports_mlflow(args.data), "scale": scale,
              "last_unchanged_output": unchanged["stdout"]}
    (WORK / "cache.json").write_text(json.dumps(record, indent=2))
    verdict = "meets" if record["median_ratio"] <= TARGET_RATIO else "MISSES"
    print(f"# Unchanged run vs full run ({record['when']}, commit {record['git_commit']}"
          f"{' + edits' if record['src_changes'] else ''}, load at start {load[0]:.2f})\n")
    print("| round | full s | MLflow runs made | unchanged s | MLflow runs made | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rounds, 1):
        print(f"| {i} | {r['full']:.2f} | {r['full_new_runs']} | {r['unchanged']:.2f} | "
              f"{r['unchanged_new_runs']} | {r['ratio']:.3f} |")
    print(f"\nmedian ratio **{record['median_ratio']:.3f}** ({verdict} the target "
          f"<= {TARGET_RATIO}); median unchanged run {record['median_unchanged']:.2f} s, "
          f"full run {record['median_full']:.2f} s.")
    print(f"The unchanged run imports MLflow: {record['unchanged_imports_mlflow']}. For scale, "
          f"a fresh `python -c pass` took {scale['python -c pass']:.2f} s and "
          f"`import trainpipe.cli` {scale['import trainpipe.cli']:.2f} s.")
    print("\nWhat the unchanged run printed:\n\n```\n" + record["last_unchanged_output"].rstrip()
          + "\n```")


if __name__ == "__main__":
    main()
