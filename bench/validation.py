"""How fast is the validate step, and does it scale linearly with the rows?

Times `validate.run` alone, in-process, on the shared hotel file and on a copy with every
row repeated `--factor` times (bench/hotel_data.py writes it to bench/work/data/). Each
measurement is a fresh subprocess (MEASURE below): it reads the data as ingest does, then
resets the kernel's peak-RSS mark and times two calls of `validate.run`. The first call
is what a pipeline run pays (pandera is imported before it, and timed apart); the second
shows what is left once everything is warm. Then validate's share of a full run: three
`trainpipe run --force` on the small file (after a warm-up run that creates the store in
bench/work/validation/), reading the CLI's per-step seconds.

    python bench/validation.py [--data PATH] [--repeats 5] [--factor 100] [--src DIR]

Prints a markdown report; the raw numbers go to bench/work/validation.json.
Targets: scaling factor (time ratio / row ratio) <= 1; validate < 5% of a full run.
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

from hotel_data import WORK, git_state, machine, parse_args, run_env, scaled_copy

SCRATCH = WORK / "validation"
TARGET_SHARE = 0.05
SRC: Path | None = None  # --src: a folder holding the trainpipe package to measure
STEP_LINE = re.compile(r"^\s*✓ (\w+)\s+([\d.]+)s\b", re.MULTILINE)
# argv[1]: the data file. Prints one JSON line. Memory in MB (kernel kB / 1024).
MEASURE = """
import gc, json, resource, sys, time

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from trainpipe import config
from trainpipe.steps import ingest, validate
cfg = config.compose([f"dataset.source={sys.argv[1]}"])
t = time.perf_counter()
import pandera.pandas
pandera_import = time.perf_counter() - t
raw = ingest.to_table(ingest.read_sources(cfg)["train"])  # the file's bytes are freed here
gc.collect()
read_peak, before = maxrss(), status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM, ru_maxrss)
    f.write("5")
t = time.perf_counter()
outputs, _ = validate.run(cfg, raw, None)
first = time.perf_counter() - t
peak = maxrss()
validated = outputs["validated"]
assert len(validated) == len(raw.df)
output_mb = 0 if validated is raw.df else validated.memory_usage(deep=True).sum() / 2**20
del outputs, validated
t = time.perf_counter()
validate.run(cfg, raw, None)
second = time.perf_counter() - t
print(json.dumps({"rows": len(raw.df), "first_s": first, "second_s": second,
                  "pandera_import_s": pandera_import,
                  "raw_df_mb": raw.df.memory_usage(deep=True).sum() / 2**20,
                  "output_copy_mb": output_mb, "rss_before_mb": before, "peak_mb": peak,
                  "read_peak_mb": read_peak}))
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=SCRATCH, env=run_env(SRC), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def measure(data: Path, repeats: int) -> list[dict[str, float]]:
    runs = []
    for i in range(repeats):
        runs.append(json.loads(timed([sys.executable, "-c", MEASURE, str(data)])[1]))
        print(f"{data.name} {i + 1}/{repeats}: {runs[-1]['first_s']:.2f}s "
              f"peak {runs[-1]['peak_mb']:.0f} MB", file=sys.stderr)
    return runs


def full_runs(data: Path, repeats: int) -> list[dict[str, float]]:
    """`trainpipe run --force` wall seconds and per-step seconds, after a warm-up run."""
    exe = Path(sys.executable).with_name("trainpipe")
    cmd = [str(exe) if exe.exists() else "trainpipe", "run", "--force",
           f"dataset.source={data}", f"lake.root={SCRATCH / 'lake'}",
           f"tracking.uri=sqlite:///{SCRATCH / 'mlflow.db'}"]
    timed(cmd)
    runs = []
    for _ in range(repeats):
        wall, stdout = timed(cmd)
        runs.append({"wall": wall} | {n: float(s) for n, s in STEP_LINE.findall(stdout)})
    return runs


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    med = statistics.median
    s = {key: med(r[key] for r in runs) for key in runs[0]}
    s["rows_per_s"] = s["rows"] / s["first_s"]
    s["extra_mb"] = med(r["peak_mb"] - r["rss_before_mb"] for r in runs)
    return s


def report(r: dict[str, Any]) -> str:
    small, big = r["small"], r.get("big")
    lines = [f"## validate.run alone (median of {r['repeats']} fresh processes"
             + (f", {r['big_repeats']} on the big file)" if big else ")"), "",
             f"trainpipe imported from {r['code']['trainpipe']} (repo HEAD "
             f"{r['code']['git_commit']}; working tree "
             + ("has uncommitted src/ edits" if r["code"]["src_changes"] else "clean src/")
             + f"); load average {r['machine']['loadavg_start'][0]:.2f} → "
             f"{r['machine']['loadavg_end'][0]:.2f}", "",
             "| | " + " | ".join(f"{s['rows']:,.0f} rows" for s in (small, big) if s) + " |",
             "|---|" + "---:|" * (2 if big else 1)]

    def row(label: str, key: str, fmt: str) -> None:
        lines.append(f"| {label} | " + " | ".join(format(s[key], fmt) for s in (small, big) if s)
                     + " |")

    row("first call s (what a run pays, pandera already imported)", "first_s", ".3f")
    row("second call s (warm)", "second_s", ".3f")
    row("rows/s (first call)", "rows_per_s", ",.0f")
    row("`import pandera.pandas` s (before the first call)", "pandera_import_s", ".3f")
    row("raw DataFrame MB (memory_usage deep)", "raw_df_mb", ".1f")
    row("process RSS before validate MB", "rss_before_mb", ".0f")
    row("peak RSS during validate MB (ru_maxrss after a reset)", "peak_mb", ".0f")
    row("validate's extra MB (peak − before)", "extra_mb", ".0f")
    row("of which: the validated frame, a copy of the raw one MB", "output_copy_mb", ".0f")
    row("peak RSS while reading the CSV MB (ru_maxrss)", "read_peak_mb", ".0f")
    if big:
        row_ratio = big["rows"] / small["rows"]
        first = big["first_s"] / small["first_s"] / row_ratio
        second = big["second_s"] / small["second_s"] / row_ratio
        lines += ["", f"Scaling factor (time ratio / row ratio {row_ratio:.0f}): first call "
                  f"{first:.2f}, second call {second:.2f} (<= 1: linear or better). "
                  f"Extra memory per raw MB: small {small['extra_mb'] / small['raw_df_mb']:.1f}, "
                  f"big {big['extra_mb'] / big['raw_df_mb']:.1f}."]
    f = r["full_runs"]
    walls = [x["wall"] for x in f]
    shares = [x["validate"] / x["wall"] for x in f]
    step_shares = [x["validate"] / sum(v for k, v in x.items() if k != "wall") for x in f]
    verdict = "meets" if statistics.median(shares) < TARGET_SHARE else "misses"
    lines += ["", f"## validate's share of a full run ({len(f)} x `trainpipe run --force`, "
              f"{small['rows']:,.0f} rows)", "",
              "| run | wall s | validate s (CLI) | share of wall | share of the steps' sum |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {i + 1} | {x['wall']:.2f} | {x['validate']:.2f} | {sh:.1%} | {ss:.1%} |"
              for i, (x, sh, ss) in enumerate(zip(f, shares, step_shares, strict=True))]
    lines += ["", f"Median share {statistics.median(shares):.1%} of a median "
              f"{statistics.median(walls):.2f} s run {verdict} the target "
              f"(< {TARGET_SHARE:.0%}). The CLI's validate seconds also include its MLflow "
              "child run, the report's logging and writing the validated Parquet to the lake."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="measurements on the small file")
    parser.add_argument("--factor", type=int, default=100,
                        help="rows repeated this many times for the big file (0: skip it)")
    parser.add_argument("--big-repeats", type=int, default=3, help="measurements on the big file")
    args = parse_args(parser)
    global SRC
    SRC, data = args.src, args.data

    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    load_start = os.getloadavg()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(data),
        "code": {**git_state(), "trainpipe": timed(
            [sys.executable, "-c", "import trainpipe; print(trainpipe.__file__)"])[1].strip()},
        "repeats": args.repeats, "big_repeats": args.big_repeats,
        "small_runs": measure(data, args.repeats)}
    results["small"] = summary(results["small_runs"])
    if args.factor > 0:
        big = scaled_copy(data, args.factor)
        results["big_data"] = str(big)
        results["big_runs"] = measure(big, args.big_repeats)
        results["big"] = summary(results["big_runs"])
    results["full_runs"] = full_runs(data, 3)
    results["machine"] = machine(load_start)
    (WORK / "validation.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nraw numbers: {WORK / 'validation.json'}")


if __name__ == "__main__":
    main()
