"""What the benchmarks share: the hotel data (the shared file, and scaled copies of it made in
bench/work/), and the record of where and on what code they ran.

The shared file is read where it is (never copied into the repo). A scaled copy repeats
its rows `factor` times, with the id column renumbered 0..N-1 so ids stay unique (the
shared ids are 0..42,099, so the first copy keeps them as they are).
"""

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work"
SHARED_DATA = "shared/datasets/hotel_bookings/train.csv"


def _default_data() -> Path:
    """The shared file beside the repo (../shared/...), or beside the main checkout when this
    is a git worktree elsewhere (the common .git folder's parent)."""
    beside = BENCH.parents[1] / SHARED_DATA
    if beside.exists():
        return beside
    common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
                            capture_output=True, text=True, cwd=BENCH).stdout.strip()
    return Path(common).parent.parent / SHARED_DATA if common else beside


DEFAULT_DATA = _default_data()


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add what every benchmark takes (--data, --src) to `parser` and parse the command
    line. `args.data` comes back resolved and checked, `args.src` resolved or None."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the training CSV")
    parser.add_argument("--src", type=Path, help="import trainpipe from this folder instead")
    args = parser.parse_args()
    args.data = args.data.resolve()
    if not args.data.is_file():
        sys.exit(f"no such file: {args.data}")
    args.src = args.src.resolve() if args.src else None
    return args


def run_env(src: Path | None) -> dict[str, str]:
    """The environment a benchmarked `trainpipe` runs in: no MLflow URI from the caller,
    wide rich output (no wrapped lines to parse), the package under `src` if given."""
    env = os.environ | {"COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if src is not None:  # ahead of the venv's editable install
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def scaled_copy(data: Path, factor: int) -> Path:
    """bench/work/data/<name>_x<factor>.csv, written once (atomically) and reused."""
    import pandas as pd

    out = WORK / "data" / f"{data.stem}_x{factor}.csv"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(data)
    big = pd.concat([df] * factor, ignore_index=True)
    big["id"] = range(len(big))
    tmp = out.with_suffix(".tmp")
    big.to_csv(tmp, index=False)
    tmp.rename(out)
    return out


def rows(path: Path) -> int:
    """Data rows of a CSV file (lines minus the header)."""
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1


def git_state() -> dict[str, str]:
    """The repo's commit and its uncommitted src/ edits (empty when there are none)."""
    def out(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True,
                              cwd=BENCH.parent).stdout.strip()

    return {"git_commit": out("git", "rev-parse", "--short", "HEAD"),
            "src_changes": out("git", "status", "--porcelain", "--", "src")}


def machine(load_start: tuple[float, float, float]) -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()}
