"""Scale-out (issue 12): `trainpipe run model=lightgbm` on copies of the hotel data 100x and
1000x its size, compute=local against compute=dask (a LocalCluster of 2 workers).

1. Data: scaled copies of the shared train.csv (read where it is, never copied into the
   repo), written once under --scratch (default /tmp/trainpipe-scale) and reused. A copy of
   factor N has N x 42,100 rows in chunks of --part-rows rows (10 copies' worth by default);
   each chunk draws its rows from the shared ones with replacement and perturbs lead_time
   (+-5 % and +-2 days) and avg_price_per_room (+-3 %), seeded by (--seed, chunk number),
   so a copy holds no block of exact duplicates, the ids are 0..rows-1 (unique) and every
   value stays inside conf/dataset/hotel_bookings.yaml's contract. Chunk k is the same rows
   whatever the factor: the 100x copy is the first 4.2M rows of the 1000x one. Up to 100x
   the copy is one CSV file; above, a folder of Parquet parts (one row group a part).
2. The runs: `trainpipe run --force model=lightgbm model.params.n_estimators=N compute=...
   dataset.source=<copy> lake.root=<scratch>/lake-<engine>-x<factor>
   tracking.uri=sqlite:///<scratch>/mlflow.db`, the venv's `trainpipe` console script as a
   subprocess, one at a time. Its wall time; the RSS of every process in its tree (the CLI,
   the tracker, LocalCluster's worker processes, ...) sampled every --interval seconds with
   psutil: each process's peak, the largest of those, and the largest sum over the tree at
   one sample; the test ROC AUC and the step times as the CLI prints them.

Cases: at the sizes in --local-sizes (default: the smallest) compute=local then
compute=dask, side by side (ratio dask/local); at the others compute=dask only. Time per
million rows at each size and its ratio to the smallest size's.

    python bench/scale.py [--sizes 100,1000] [--n-estimators 100] [--data CSV] [--src DIR]
    python bench/scale.py --sizes 2,5 --local-sizes 2,5          # a quick check
    python bench/scale.py --sizes 2,5 --engines local --format parquet --part-rows 30000
    python bench/scale.py --generate-only --sizes 100,1000       # only write the copies

The big sizes take long on 2 cores: run them in the background, alone, e.g.
`nohup bench/run scale > /tmp/scale.log 2>&1 &`. If 1000x cannot finish in the time there
is (--timeout a run), take a smaller factor, e.g. --sizes 100,300.
Raw numbers: <scratch>/scale.json; the terminal gets a markdown report.
Targets: at the largest size no process above 6 GB RSS; its time per million rows within
1.3x of the smallest size's (compute=dask both); compute=dask within 1.5x of compute=local's
wall time at 100x.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotel_data import git_state, machine, parse_args, run_env  # noqa: E402

SCRATCH = Path("/tmp/trainpipe-scale")
BASE_ROWS = 42_100
PART_ROWS = 10 * BASE_ROWS  # rows a chunk: a Parquet part (one row group), a CSV write
CSV_UP_TO = 100  # factors up to this one are one CSV file; above, a folder of Parquet parts
GENERATOR = 1  # bump when the generator changes: copies made by another version are redone
GB = 1e9  # RSS is reported in GB and MB (powers of 10), as the targets are
TARGET_MAX_RSS_GB = 6.0
TARGET_PER_MROW_RATIO = 1.3
TARGET_DASK_LOCAL_RATIO = 1.5
STEP_LINE = re.compile(r"^\s*✓ (\w+)\s+([\d.]+)s\b", re.MULTILINE)
METRIC_LINE = re.compile(r"^\s+(test_roc_auc)\s+([\d.]+)\s*$", re.MULTILINE)
RUN_ID = re.compile(r"^\s+run id\s+(\w+)", re.MULTILINE)


# ---------------------------------------------------------------------------- the copies

def copy_path(scratch: Path, factor: int, fmt: str, seed: int) -> Path:
    name = f"hotel_x{factor}_seed{seed}"
    return scratch / "data" / (f"{name}.csv" if fmt == "csv" else name)


def scaled_copy(data: Path, factor: int, *, scratch: Path, seed: int = 42,
                part_rows: int = PART_ROWS, fmt: str = "auto") -> Path:
    """The hotel data `factor` times (see the module's docstring): a CSV file or a folder of
    Parquet parts under scratch/data/, written once (into a temporary name, then renamed)
    and reused while its recipe (a JSON file beside it) is the same."""
    fmt = ("csv" if factor <= CSV_UP_TO else "parquet") if fmt == "auto" else fmt
    out = copy_path(scratch, factor, fmt, seed)
    recipe = {"generator": GENERATOR, "source": str(data), "source_bytes": data.stat().st_size,
              "factor": factor, "seed": seed, "part_rows": part_rows, "format": fmt,
              "rows": factor * BASE_ROWS}
    sidecar = out.with_name(out.name + ".json")
    if out.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == recipe:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    for stale in (out, tmp):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    start = time.perf_counter()
    base = _base_columns(data)
    if fmt == "csv":
        with tmp.open("w", newline="") as f:
            for k, chunk in enumerate(_chunks(base, recipe["rows"], part_rows, seed)):
                chunk.to_csv(f, header=k == 0, index=False)
    else:
        tmp.mkdir()
        for k, chunk in enumerate(_chunks(base, recipe["rows"], part_rows, seed)):
            chunk.to_parquet(tmp / f"part-{k:05d}.parquet", index=False,
                             row_group_size=len(chunk))
    tmp.rename(out)
    sidecar.write_text(json.dumps(recipe, indent=2))
    print(f"wrote {out} ({recipe['rows']:,} rows, {_size(out) / 1e6:,.0f} MB) in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def _base_columns(data: Path) -> dict[str, Any]:
    import pandas as pd

    df = pd.read_csv(data)
    if len(df) != BASE_ROWS or "id" not in df:
        sys.exit(f"{data}: expected the hotel train.csv ({BASE_ROWS:,} rows with an id column)")
    return {c: df[c].to_numpy() for c in df.columns}


def _chunks(base: dict[str, Any], rows: int, part_rows: int, seed: int):
    """DataFrames of part_rows rows (the last may be shorter): rows drawn from `base` with
    replacement and perturbed, chunk k seeded by (seed, k) alone, ids start + 0, 1, ..."""
    import numpy as np
    import pandas as pd

    for k, start in enumerate(range(0, rows, part_rows)):
        n = min(part_rows, rows - start)
        rng = np.random.default_rng([seed, k])
        pick = rng.integers(0, BASE_ROWS, size=n)
        cols = {c: values[pick] for c, values in base.items()}
        cols["id"] = np.arange(start, start + n, dtype=np.int64)
        lead = cols["lead_time"] * rng.normal(1.0, 0.05, n) + rng.integers(-2, 3, n)
        cols["lead_time"] = np.clip(np.rint(lead), 0, 1000).astype(np.int64)
        price = cols["avg_price_per_room"] * rng.normal(1.0, 0.03, n)
        cols["avg_price_per_room"] = np.clip(np.round(price, 2), 0.0, 10_000.0)
        yield pd.DataFrame(cols, columns=list(base))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def copy_rows(path: Path) -> int:
    return json.loads(path.with_name(path.name + ".json").read_text())["rows"]


# ---------------------------------------------------------------------------- measuring

def _label(proc, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "trainpipe (main)"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return "?"
    if "trainpipe.tracker" in cmd:
        return "tracker"
    if "resource_tracker" in cmd:
        return "multiprocessing resource tracker"
    if "spawn_main" in cmd or "forkserver" in cmd:
        return "spawned (Dask worker)"
    return cmd[:80]


def measured(cmd: list[str], *, cwd: Path, env: dict, log: Path, interval: float,
             timeout: float, rss_limit_gb: float) -> dict:
    """Run `cmd`; sample the RSS of its whole process tree every `interval` seconds until it
    exits. Stops it (its tree, by pid) after `timeout` seconds or when one process passes
    `rss_limit_gb` (the machine is shared)."""
    import psutil

    with log.open("w") as out:
        start = time.perf_counter()
        popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        root = psutil.Process(popen.pid)
        peaks: dict[int, dict] = {}
        max_sum = (0, 0.0)  # bytes, seconds since start
        max_load = os.getloadavg()[0]
        stopped = None
        samples = 0
        while popen.poll() is None:
            now = time.perf_counter() - start
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for proc in tree:
                try:
                    rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                seen = peaks.get(proc.pid)
                if seen is None:
                    seen = peaks[proc.pid] = {"pid": proc.pid, "label": _label(proc, popen.pid),
                                              "peak_rss": 0, "first_s": now}
                seen["last_s"] = now
                if rss > seen["peak_rss"]:
                    seen["peak_rss"], seen["peak_at_s"] = rss, now
                if rss > rss_limit_gb * GB and not stopped:
                    stopped = f"{seen['label']} (pid {proc.pid}) passed {rss_limit_gb} GB RSS"
            if total > max_sum[0]:
                max_sum = (total, now)
            samples += 1
            max_load = max(max_load, os.getloadavg()[0])
            if now > timeout and not stopped:
                stopped = f"still running after {timeout:.0f} s"
            if stopped:
                _stop(tree)
                break
            time.sleep(interval)
        code = popen.wait()
        wall = time.perf_counter() - start
    return {"wall_s": wall, "exit_code": code, "stopped": stopped, "samples": samples,
            "processes": sorted(peaks.values(), key=lambda p: p["first_s"]),
            "max_process_rss": max((p["peak_rss"] for p in peaks.values()), default=0),
            "max_sum_rss": max_sum[0], "max_sum_at_s": max_sum[1], "max_load_1min": max_load}


def _stop(tree: list) -> None:
    import psutil

    for proc in reversed(tree):  # children first, each by its pid
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def run_case(args: argparse.Namespace, source: Path, factor: int, engine: str,
             env: dict) -> dict:
    lake = args.scratch / f"lake-{engine}-x{factor}"
    folder = args.scratch / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("trainpipe")
    cmd = [str(exe) if exe.exists() else "trainpipe", "run", "--force", "model=lightgbm",
           f"model.params.n_estimators={args.n_estimators}", f"compute={engine}",
           f"dataset.source={source}", f"lake.root={lake}",
           f"tracking.uri=sqlite:///{args.scratch / 'mlflow.db'}", *args.override]
    log = folder / f"{engine}-x{factor}.log"
    rows = copy_rows(source)
    print(f"{datetime.now(UTC):%H:%M:%S} x{factor} compute={engine}: {rows:,} rows "
          f"(output: {log})", file=sys.stderr, flush=True)
    load_start = os.getloadavg()
    result = measured(cmd, cwd=folder, env=env, log=log, interval=args.interval,
                      timeout=args.timeout, rss_limit_gb=args.rss_limit)
    stdout = log.read_text(errors="replace")
    result.update({"factor": factor, "engine": engine, "rows": rows, "source": str(source),
                   "command": cmd, "log": str(log), "code": git_state(),
                   "loadavg_start": load_start,
                   "loadavg_end": os.getloadavg(),
                   "steps": {name: float(s) for name, s in STEP_LINE.findall(stdout)},
                   "test_roc_auc": _auc(stdout, args.scratch / "mlflow.db")})
    result["s_per_mrow"] = result["wall_s"] / (rows / 1e6)
    ok = result["exit_code"] == 0 and not result["stopped"]
    print(f"  {'done' if ok else 'FAILED'} in {result['wall_s']:.0f} s "
          f"(exit {result['exit_code']}{', ' + result['stopped'] if result['stopped'] else ''});"
          f" max process {result['max_process_rss'] / GB:.2f} GB, tree "
          f"{result['max_sum_rss'] / GB:.2f} GB; AUC {result['test_roc_auc']}",
          file=sys.stderr, flush=True)
    if not ok:
        print("  " + "\n  ".join(stdout.strip().splitlines()[-15:]), file=sys.stderr)
    return result


def _auc(stdout: str, db: Path) -> float | None:
    """test_roc_auc as the CLI printed it, else from the run in the MLflow store."""
    found = METRIC_LINE.search(stdout)
    if found:
        return float(found[2])
    run = RUN_ID.search(stdout)
    if not run or not db.exists():
        return None
    with sqlite3.connect(db) as con:
        row = con.execute("select value from latest_metrics where run_uuid = ? and "
                          "key = 'test_roc_auc'", (run[1],)).fetchone()
    return row[0] if row else None


# ---------------------------------------------------------------------------- the report

def report(r: dict) -> str:
    cases = r["cases"]
    lines = [f"repo HEAD {r['code']['git_commit']}"
             + (" (uncommitted src/ edits)" if r["code"]["src_changes"] else "")
             + f" · {r['date']} · n_estimators {r['n_estimators']} · load (1/5/15 min) "
             + " / ".join(f"{x:.2f}" for x in r["machine"]["loadavg_start"]) + " → "
             + " / ".join(f"{x:.2f}" for x in r["machine"]["loadavg_end"]), "",
             "| size | rows | compute | wall s | s per M rows | max process RSS GB | "
             "sum at peak GB | test ROC AUC | 1-min load start→end (max) | result |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for c in cases:
        ok = c["exit_code"] == 0 and not c["stopped"]
        auc = f"{c['test_roc_auc']:.4f}" if c["test_roc_auc"] is not None else "–"
        lines.append(
            f"| x{c['factor']} | {c['rows']:,} | {c['engine']} | {c['wall_s']:.1f} | "
            f"{c['s_per_mrow']:.1f} | {c['max_process_rss'] / GB:.2f} | "
            f"{c['max_sum_rss'] / GB:.2f} | {auc} | {c['loadavg_start'][0]:.2f}→"
            f"{c['loadavg_end'][0]:.2f} ({c['max_load_1min']:.2f}) | "
            f"{'ok' if ok else c['stopped'] or 'exit ' + str(c['exit_code'])} |")
    lines += ["", "Peak RSS of each process (MB; processes under 50 MB left out):", ""]
    for c in cases:
        procs = ", ".join(f"{p['label']} {p['peak_rss'] / 1e6:,.0f}"
                          for p in c["processes"] if p["peak_rss"] > 50e6)
        steps = ", ".join(f"{k} {v:.1f}" for k, v in c["steps"].items())
        lines.append(f"- x{c['factor']} {c['engine']}: {procs}; steps (s): {steps or '–'}")
    lines += ["", *verdicts(r)]
    return "\n".join(lines)


def verdicts(r: dict) -> list[str]:
    done = [c for c in r["cases"] if c["exit_code"] == 0 and not c["stopped"]]
    dask = {c["factor"]: c for c in done if c["engine"] == "dask"}
    local = {c["factor"]: c for c in done if c["engine"] == "local"}
    out = []
    for f in sorted(set(dask) & set(local)):
        ratio = dask[f]["wall_s"] / local[f]["wall_s"]
        met = "met" if ratio <= TARGET_DASK_LOCAL_RATIO else "MISSED"
        out.append(f"- x{f}: wall dask/local **{ratio:.2f}** (target <= "
                   f"{TARGET_DASK_LOCAL_RATIO}: {met})"
                   f"; max process RSS dask/local "
                   f"{dask[f]['max_process_rss'] / local[f]['max_process_rss']:.2f}")
    if len(dask) >= 2:
        small, big = dask[min(dask)], dask[max(dask)]
        ratio = big["s_per_mrow"] / small["s_per_mrow"]
        out.append(f"- dask time per million rows x{big['factor']} / x{small['factor']}: "
                   f"**{ratio:.2f}** (target <= {TARGET_PER_MROW_RATIO}: "
                   f"{'met' if ratio <= TARGET_PER_MROW_RATIO else 'MISSED'})")
    if dask:
        big = dask[max(dask)]
        peak = big["max_process_rss"] / GB
        met = "met" if peak < TARGET_MAX_RSS_GB else "MISSED"
        out.append(f"- x{big['factor']} dask: max process RSS **{peak:.2f} GB** (target < "
                   f"{TARGET_MAX_RSS_GB} GB: {met})")
    failed = [c for c in r["cases"] if c not in done]
    out += [f"- x{c['factor']} {c['engine']}: did not finish "
            f"({c['stopped'] or 'exit ' + str(c['exit_code'])}; output {c['log']})"
            for c in failed]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="factors (copies of the rows)")
    parser.add_argument("--local-sizes", help="factors also run with compute=local "
                        "(default: the smallest of --sizes)")
    parser.add_argument("--engines", default="local,dask",
                        help="which of compute=local,dask to run (e.g. local alone)")
    parser.add_argument("--n-estimators", type=int, default=100, help="LightGBM's trees")
    parser.add_argument("--scratch", type=Path, default=SCRATCH, help="copies, lakes, store")
    parser.add_argument("--seed", type=int, default=42, help="the copies' random draws")
    parser.add_argument("--part-rows", type=int, default=PART_ROWS,
                        help="rows a generated chunk (a Parquet part, one row group)")
    parser.add_argument("--format", choices=("auto", "csv", "parquet"), default="auto",
                        help=f"auto: CSV up to x{CSV_UP_TO}, Parquet parts above")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=45 * 60, help="seconds a run may take")
    parser.add_argument("--rss-limit", type=float, default=12.0,
                        help="GB: a run with a process above this is stopped")
    parser.add_argument("--override", action="append", default=[],
                        help="another key=value for every run (repeatable)")
    parser.add_argument("--generate-only", action="store_true", help="write the copies, no runs")
    parser.add_argument("--out", type=Path, help="raw numbers (default <scratch>/scale.json)")
    parser.add_argument("--append", action="store_true", help="add these runs to those already "
                        "in --out (e.g. the largest size run on its own later); one report")
    args = parse_args(parser)
    args.scratch = args.scratch.resolve()
    repo = Path(__file__).resolve().parents[1]
    if args.scratch.is_relative_to(repo):
        sys.exit(f"--scratch {args.scratch} is inside the repo: take a folder outside it")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    local_sizes = ({int(s) for s in args.local_sizes.split(",")} if args.local_sizes
                   else {sizes[0]})
    copies = {f: scaled_copy(args.data, f, scratch=args.scratch, seed=args.seed,
                             part_rows=args.part_rows, fmt=args.format) for f in sizes}
    if args.generate_only:
        return
    env = run_env(args.src)
    out = args.out or args.scratch / "scale.json"
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "code": git_state(),
               "n_estimators": args.n_estimators, "sizes": sizes, "cases": []}
    load_start = os.getloadavg()
    if args.append and out.exists():
        results = json.loads(out.read_text())
        if results["n_estimators"] != args.n_estimators:
            sys.exit(f"{out} has runs of {results['n_estimators']} trees, not "
                     f"{args.n_estimators}: a report compares like with like")
        results["sizes"] = sorted(set(results["sizes"]) | set(sizes))
        load_start = results["machine"]["loadavg_start"]
    for f in sizes:
        for engine in ("local", "dask") if f in local_sizes else ("dask",):
            if engine not in args.engines.split(","):
                continue
            results["cases"].append(run_case(args, copies[f], f, engine, env))
            results["machine"] = machine(load_start)
            out.write_text(json.dumps(results, indent=2))  # what there is so far
    print(report(results))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":  # LocalCluster's worker processes re-import __main__
    main()
