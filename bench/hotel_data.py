"""The benchmarks' data: the shared hotel file, and scaled copies of it made in bench/work/.

The shared file is read where it is (never copied into the repo). A scaled copy repeats
its rows `factor` times, with the id column renumbered 0..N-1 so ids stay unique (the
shared ids are 0..42,099, so the first copy keeps them as they are).
"""

from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hotel_bookings/train.csv"


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
