"""The pipeline against the production-like stack vs the embedded default.

Stack: `trainpipe.stack.up` with a PostgreSQL cluster of its own (initdb) and an MLflow
server whose artifacts go to a moto S3 server, all on loopback; the lake on the same S3
(`lake=s3`), the hotel data uploaded to its raw zone. Local: the embedded default, a lake
folder and a SQLite store (bench/work/stack_vs_local/). Both run the same command,
`trainpipe run --force` (every step redone) on the shared hotel data, each a fresh
process, alternating, after one warm-up run each (creates the stores).

Also: `stack up` from nothing to healthy (a fresh folder: initdb, PostgreSQL, migrations,
MLflow server), a second `up` (everything reused) and `up` after `down` (data kept).

    python bench/stack_vs_local.py [--data PATH] [--repeats 5] [--stack-ups 3] [--src DIR]

Prints a markdown report; the raw numbers go to bench/work/stack_vs_local.json.
Target: median stack/local ratio <= 1.2.
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from hotel_data import WORK, parse_args, rows

SCRATCH = WORK / "stack_vs_local"
TARGET_RATIO = 1.2
STEPS = ("ingest", "validate", "split", "features", "train", "evaluate")
STEP_LINE = re.compile(r"^\s*([✓=✗■]) (\w+)\s+([\d.]+)s\b", re.MULTILINE)
LAKE_BUCKET, ARTIFACTS_BUCKET = "bench-lake", "bench-artifacts"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
       "AWS_DEFAULT_REGION": "us-east-1"}


class RunFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(SCRATCH / "moto.log", "wb")  # noqa: SIM115 - open while moto runs
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start: " + (SCRATCH / "moto.log").read_text()[-2000:])


def reachable_folder(prefix: str) -> Path:
    """A fresh folder the user `postgres` can reach (the stack runs its cluster as that user
    when run as root): under /tmp, opened to others."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder


def time_stack_ups(env: dict, endpoint: str, count: int) -> dict:
    """`up` from nothing (fresh folder each time), then a second `up`, then `down` + `up`."""
    from trainpipe import stack

    fresh, again, restart = [], [], []
    for _ in range(count):
        folder = reachable_folder("bench-stack-")
        try:
            start = time.perf_counter()
            info = stack.up(folder / "stack", port=0, env=env,
                            artifacts_destination=f"s3://{ARTIFACTS_BUCKET}/up-{folder.name}")
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            stack.up(folder / "stack", env=env)
            again.append(time.perf_counter() - start)
            stack.down(folder / "stack")
            start = time.perf_counter()
            back = stack.up(folder / "stack", env=env)
            restart.append(time.perf_counter() - start)
            assert back.tracking_uri == info.tracking_uri
        finally:
            stack.down(folder / "stack")
            shutil.rmtree(folder, ignore_errors=True)
    return {"fresh": fresh, "again": again, "after_down": restart}


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=SCRATCH, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RunFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def steps_of(stdout: str) -> dict[str, float]:
    return {name: float(sec) for _, name, sec in STEP_LINE.findall(stdout) if name in STEPS}


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stack-ups", type=int, default=3)
    args = parse_args(parser)
    if args.src is not None:  # ahead of the venv's editable install, here and in the runs
        sys.path.insert(0, str(args.src))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(args.src), os.environ.get("PYTHONPATH")]))
    data = args.data
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)

    from trainpipe import stack

    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "AWS_", "TRAINPIPE_"))} | {"COLUMNS": "200"}
    moto, endpoint = start_moto()
    aws = AWS | {"AWS_ENDPOINT_URL": endpoint}
    folder = reachable_folder("bench-stack-runs-")
    result: dict = {"measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "trainpipe": str(Path(stack.__file__).parent),
                    "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                    "data": str(data), "rows": rows(data), "load_start": load()}
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench-secret")
        for bucket in (LAKE_BUCKET, ARTIFACTS_BUCKET):
            s3.create_bucket(Bucket=bucket)
        source = f"s3://{LAKE_BUCKET}/lake/raw/hotel_bookings/train.csv"
        s3.upload_file(str(data), LAKE_BUCKET, "lake/raw/hotel_bookings/train.csv")

        ups = time_stack_ups(base | aws, endpoint, args.stack_ups)
        result["stack_up"] = ups
        print(f"stack up from nothing: {[round(s, 2) for s in ups['fresh']]} s", flush=True)

        info = stack.up(folder / "stack", port=0, env=base | aws,
                        artifacts_destination=f"s3://{ARTIFACTS_BUCKET}/mlartifacts")
        commands = {
            "stack": ([sys.executable, "-m", "trainpipe", "run", "--force", "tracking=server",
                       "lake=s3", f"lake.root=s3://{LAKE_BUCKET}/lake",
                       f"dataset.source={source}"], base | aws | info.env),
            "local": ([sys.executable, "-m", "trainpipe", "run", "--force",
                       f"dataset.source={data}", f"lake.root={SCRATCH / 'lake'}",
                       f"tracking.uri=sqlite:///{SCRATCH / 'mlflow.db'}"], base),
        }
        for cmd, env in commands.values():  # warm-up: stores, experiment, caches
            timed(cmd, env)
        runs: dict[str, list] = {"stack": [], "local": []}
        for i in range(args.repeats):
            order = ("stack", "local") if i % 2 == 0 else ("local", "stack")
            for name in order:
                cmd, env = commands[name]
                seconds, stdout = timed(cmd, env)
                runs[name].append({"seconds": seconds, "steps": steps_of(stdout)})
                print(f"{name:5} {seconds:6.2f} s  load {load():.2f}", flush=True)
        result["runs"] = runs
        result["load_end"] = load()
    finally:
        stack.down(folder / "stack")
        shutil.rmtree(folder, ignore_errors=True)
        moto.terminate()
        moto.wait(10)

    stack_s = [r["seconds"] for r in runs["stack"]]
    local_s = [r["seconds"] for r in runs["local"]]
    ratios = [s / loc for s, loc in zip(stack_s, local_s, strict=True)]
    result["ratio_median"] = statistics.median(ratios)
    (WORK / "stack_vs_local.json").write_text(json.dumps(result, indent=2))

    print(f"\n## stack vs local ({result['rows']:,} rows, {args.repeats} runs each, "
          f"{result['measured']}, load {result['load_start']:.2f}→{result['load_end']:.2f})\n")
    print("| | median (min) s | runs s |\n|---|---:|---|")
    for name, values in (("stack", stack_s), ("local", local_s)):
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}) | "
              f"{' '.join(f'{v:.2f}' for v in values)} |")
    print(f"| **ratio** (per pair) | **{statistics.median(ratios):.2f}** "
          f"({min(ratios):.2f}) | {' '.join(f'{r:.2f}' for r in ratios)} |")
    verdict = "met" if statistics.median(ratios) <= TARGET_RATIO else "missed"
    print(f"\ntarget <= {TARGET_RATIO}: {verdict}\n")
    print("| step | stack median s | local median s |\n|---|---:|---:|")
    for step in STEPS:
        med = [statistics.median(r["steps"].get(step, 0.0) for r in runs[n])
               for n in ("stack", "local")]
        print(f"| {step} | {med[0]:.2f} | {med[1]:.2f} |")
    outside = [statistics.median(r["seconds"] - sum(r["steps"].values()) for r in runs[n])
               for n in ("stack", "local")]
    print(f"| outside the steps | {outside[0]:.2f} | {outside[1]:.2f} |")
    print("\n| `stack up` | median (min–max) s |\n|---|---:|")
    for key, label in (("fresh", "from nothing to healthy (initdb, PostgreSQL, migrations, "
                                 "MLflow server)"),
                       ("again", "again while it runs (reused)"),
                       ("after_down", "after `down` (data kept)")):
        values = ups[key]
        print(f"| {label} | {statistics.median(values):.2f} ({min(values):.2f}–"
              f"{max(values):.2f}) |")


if __name__ == "__main__":
    main()
