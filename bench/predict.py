"""`trainpipe predict` against a bare script, on the hotel rows 1x, 10x and 100x: rows/s and
peak RSS.

The model is the pipeline's own (`trainpipe run` on the shared file, the reference forest:
200 trees, depth 15), trained once in bench/work/predict/. The inputs are the shared rows
repeated (bench/hotel_data.py's scaled_copy) without the target, as CSV (and Parquet for the
largest). Each measurement is a fresh process, timed from start to exit, its peak RSS from
`wait4` (ru_maxrss of that process alone):

- `trainpipe predict --model URI --input FILE --output OUT.parquet` (validates, scores in
  chunks, writes, records the run);
- the bare script (BARE below): load the same logged model, read the whole file at once,
  `predict_proba` on its feature columns, labels by argmax, write id + prediction +
  probabilities to Parquet: the same output without validation, chunks or tracking.

    python bench/predict.py [--data PATH] [--factors 1,10,100] [--repeats 3] [--src DIR]

Prints a markdown report; raw numbers go to bench/work/predict.json.
Targets: trainpipe predict's peak RSS under 1.5 GB whatever the input size; its time within
1.3x of the bare script's on the same rows.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from hotel_data import WORK, git_state, machine, parse_args, run_env, scaled_copy

SCRATCH = WORK / "predict"
TARGET_RSS_MB = 1536
TARGET_RATIO = 1.3
MODEL = re.compile(r"model\s+(models:/m-\w+)")
# argv: model URI, input CSV or Parquet, output Parquet. Prints the time of each part (JSON).
BARE = """
import json, sys, time
t0 = time.perf_counter()
import mlflow.sklearn, numpy as np, pandas as pd
model = mlflow.sklearn.load_model(sys.argv[1])
t1 = time.perf_counter()
read = pd.read_parquet if sys.argv[2].endswith(".parquet") else pd.read_csv
df = read(sys.argv[2])
t2 = time.perf_counter()
proba = model.predict_proba(df[list(model.feature_names_in_)])
out = pd.DataFrame({"id": df["id"], "prediction": model.classes_[np.argmax(proba, axis=1)]})
for i, c in enumerate(model.classes_):
    out[f"proba_{c}"] = proba[:, i]
t3 = time.perf_counter()
out.to_parquet(sys.argv[3], index=False)
t4 = time.perf_counter()
print(json.dumps({"imports_and_model_s": t1 - t0, "read_s": t2 - t1, "predict_s": t3 - t2,
                  "write_s": t4 - t3}))
"""


def run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=SCRATCH, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


MEASURED = """
import json, os, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
out, err = proc.communicate()
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_mb": rss, "code": proc.returncode,
                  "stdout": out.decode(), "stderr": err.decode()[-3000:]}))
"""


def measure(cmd: list[str], env: dict) -> dict:
    """One fresh process: wall seconds and its own peak RSS (a wrapper process whose only
    child it is reads RUSAGE_CHILDREN)."""
    result = json.loads(subprocess.run([sys.executable, "-c", MEASURED, *cmd], cwd=SCRATCH,
                                       env=env, capture_output=True, text=True,
                                       check=True).stdout)
    if result["code"] != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result['stdout']}\n{result['stderr']}")
    return result


def trainpipe_cmd() -> list[str]:
    return [sys.executable, "-m", "trainpipe"]


def train(data: Path, env: dict) -> str:
    """The model: `trainpipe run` on the shared file (reused when already made)."""
    out = run([*trainpipe_cmd(), "run", f"dataset.source={data}",
               f"lake.root={SCRATCH / 'lake'}", f"tracking.uri={store()}"], env)
    found = MODEL.search(out)
    if not found:
        sys.exit(f"no model URI in the output of trainpipe run:\n{out}")
    return found[1]


def store() -> str:
    return f"sqlite:///{SCRATCH / 'mlflow.db'}"


def scoring_file(data: Path, factor: int, fmt: str) -> Path:
    """The scaled copy without the target column, as CSV or Parquet (written once)."""
    import pandas as pd

    out = WORK / "data" / f"{data.stem}_x{factor}_scoring.{fmt}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    source = scaled_copy(data, factor) if factor > 1 else data
    df = pd.read_csv(source).drop(columns=["booking_status"])
    tmp = out.with_suffix(".tmp")
    if fmt == "csv":
        df.to_csv(tmp, index=False)
    else:
        df.to_parquet(tmp, index=False)
    tmp.rename(out)
    return out


def rows_of(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    from hotel_data import rows

    return rows(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default="1,10,100", help="input sizes: copies of the rows")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per input below "
                        "1M rows (1 above)")
    args = parse_args(parser)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    env = run_env(args.src)
    load_start = os.getloadavg()
    model = train(args.data, env)
    print(f"model {model}", file=sys.stderr)
    factors = [int(f) for f in args.factors.split(",")]
    inputs = [scoring_file(args.data, f, "csv") for f in factors]
    inputs.append(scoring_file(args.data, max(factors), "parquet"))
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": model,
               "code": git_state(), "inputs": []}
    for path in inputs:
        rows = rows_of(path)
        repeats = args.repeats if rows < 1_000_000 else 1
        entry = {"input": str(path), "rows": rows, "trainpipe": [], "bare": []}
        for i in range(repeats):  # alternate, so load changes hit both alike
            out = SCRATCH / "out.parquet"
            entry["trainpipe"].append(measure([
                *trainpipe_cmd(), "predict", "--model", model, "--input", str(path),
                "--output", str(out), f"tracking.uri={store()}"], env))
            bare = measure([sys.executable, "-c", BARE, model, str(path), str(out)], env)
            bare["parts"] = json.loads(bare["stdout"])
            entry["bare"].append(bare)
            print(f"{path.name} {i + 1}/{repeats}: trainpipe "
                  f"{entry['trainpipe'][-1]['wall_s']:.1f}s "
                  f"{entry['trainpipe'][-1]['peak_mb']:.0f} MB, bare {bare['wall_s']:.1f}s "
                  f"{bare['peak_mb']:.0f} MB", file=sys.stderr)
        results["inputs"].append(entry)
    results["machine"] = machine(load_start)
    (WORK / "predict.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nraw numbers: {WORK / 'predict.json'}")


def report(r: dict) -> str:
    med = statistics.median
    lines = [f"model {r['model']} · repo HEAD {r['code']['git_commit']}"
             + (" (uncommitted src/ edits)" if r["code"]["src_changes"] else "")
             + f" · load {r['machine']['loadavg_start'][0]:.2f} → "
             f"{r['machine']['loadavg_end'][0]:.2f}", "",
             "| input | rows | runs | trainpipe predict s | rows/s | peak RSS MB | bare s | "
             "bare peak RSS MB | ratio trainpipe/bare | bare: read s / predict s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in r["inputs"]:
        tp = med(x["wall_s"] for x in e["trainpipe"])
        bare = med(x["wall_s"] for x in e["bare"])
        ratio = med(t["wall_s"] / b["wall_s"] for t, b in zip(e["trainpipe"], e["bare"],
                                                              strict=True))
        read = med(x["parts"]["read_s"] for x in e["bare"])
        predict = med(x["parts"]["predict_s"] for x in e["bare"])
        lines.append(f"| {Path(e['input']).name} | {e['rows']:,} | {len(e['trainpipe'])} | "
                     f"{tp:.2f} | {e['rows'] / tp:,.0f} | "
                     f"{max(x['peak_mb'] for x in e['trainpipe']):,.0f} | {bare:.2f} | "
                     f"{max(x['peak_mb'] for x in e['bare']):,.0f} | {ratio:.2f} | "
                     f"{read:.2f} / {predict:.2f} |")
    rss_ok = all(x["peak_mb"] < TARGET_RSS_MB for e in r["inputs"] for x in e["trainpipe"])
    biggest = max(r["inputs"], key=lambda e: e["rows"])
    ratio = med(t["wall_s"] / b["wall_s"] for t, b in zip(biggest["trainpipe"], biggest["bare"],
                                                          strict=True))
    lines += ["", f"Peak RSS target (< {TARGET_RSS_MB} MB at every size): "
              + ("met" if rss_ok else "MISSED") + f". Time target (<= {TARGET_RATIO}x bare on "
              f"{biggest['rows']:,} rows): {ratio:.2f}x, "
              + ("met" if ratio <= TARGET_RATIO else "MISSED") + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
