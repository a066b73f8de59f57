"""`trainpipe serve` against the same model's in-process `pyfunc.predict`: latency of 1-row
requests and rows/s of 1,000-row requests, on 127.0.0.1.

The model is the pipeline's own (`trainpipe run` on the shared file, the reference forest:
200 trees, depth 15), trained once in bench/work/serve/. Two variants are measured: the model
as trainpipe logs it (predicting on one thread), and the same model with `n_jobs=-1` put back
on its forest and logged again (how trainpipe logged models before: the training setting).

For each variant, in this one process and on the same rows (the model's input columns of the
shared file's first rows): `mlflow.pyfunc.load_model(uri).predict` on a prebuilt DataFrame
(in-process), and `trainpipe serve --model uri` started as a user would, with the
same rows POSTed as `dataframe_split` JSON (bodies prebuilt) over one keep-alive connection,
each row in turn in-process then served (the machine's load weighs on both alike), and a
GET /ping after each (the HTTP layer alone). Each loop is bounded (--requests 1-row,
--batches 1,000-row) after a warm-up.

    python bench/serve.py [--data PATH] [--requests 300] [--batches 30] [--src DIR]

Prints a markdown report; raw numbers go to bench/work/serve.json.
Targets: served 1-row p50 within 1.3x of in-process; the model's own 1-row predict small.
"""

import argparse
import http.client
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

from hotel_data import WORK, git_state, machine, parse_args, run_env

SCRATCH = WORK / "serve"
TARGET_RATIO = 1.3
MODEL = re.compile(r"model\s+(models:/m-\w+)")
WARM_UP = 20


def store() -> str:
    return f"sqlite:///{SCRATCH / 'mlflow.db'}"


def trainpipe(*args: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", "trainpipe", *args], cwd=SCRATCH, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"trainpipe {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def models(data, env: dict) -> dict[str, str]:
    """The model as trainpipe logs it, and the same with n_jobs=-1 (logged once, reused)."""
    import mlflow

    out = trainpipe("run", f"dataset.source={data}", f"lake.root={SCRATCH / 'lake'}",
                    f"tracking.uri={store()}", env=env)
    logged = MODEL.search(out)[1]
    mlflow.set_tracking_uri(store())
    marker = SCRATCH / f"n_jobs_-1.{logged.rsplit('/', 1)[1]}"
    if not marker.exists():
        from mlflow.models import Model

        model = mlflow.sklearn.load_model(logged)
        model[-1].set_params(n_jobs=-1)
        mlflow.set_experiment("bench-serve")
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(model, name="n_jobs_-1",
                                            signature=Model.load(logged).signature,
                                            serialization_format="cloudpickle")
        marker.write_text(info.model_uri)
    return {"as trainpipe logs it (n_jobs=1)": logged,
            "n_jobs=-1 (as logged before)": marker.read_text()}


def quantiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "mean_ms": statistics.fmean(ms)}


def start_server(uri: str, port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "trainpipe", "serve", "--model", uri,
                             "--port", str(port), f"tracking.uri={store()}"], cwd=SCRATCH,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    seen = []
    while (line := lines.get(timeout=300)) is not None:
        seen.append(line)
        if "Ctrl-C stops it." in line:
            return proc
    sys.exit("trainpipe serve did not start:\n" + "".join(seen))


def compare(uri: str, port: int, singles, batches, single_bodies, batch_bodies) -> dict:
    """In-process and served, request by request in turn (so the machine's load weighs on
    both alike), after a warm-up of each; and GET /ping, the HTTP layer's own cost."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(uri)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(body: bytes | None, path: str = "/invocations") -> None:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"HTTP {response.status}")

    def timed(fn, arg) -> float:
        start = time.perf_counter()
        fn(arg)
        return time.perf_counter() - start

    for df, body in zip(singles[:WARM_UP], single_bodies[:WARM_UP], strict=True):
        model.predict(df)
        post(body)
    local, remote, ping = [], [], []
    for df, body in zip(singles, single_bodies, strict=True):
        local.append(timed(model.predict, df))
        remote.append(timed(post, body))
        ping.append(timed(lambda _: post(None, "/ping"), None))
    local_batch = remote_batch = 0.0
    for df, body in zip(batches, batch_bodies, strict=True):
        local_batch += timed(model.predict, df)
        remote_batch += timed(post, body)
    conn.close()
    rows = 1000 * len(batches)
    return {"in_process": quantiles(local) | {"rows_per_s_1000": rows / local_batch},
            "served": quantiles(remote) | {"rows_per_s_1000": rows / remote_batch},
            "ping": quantiles(ping)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="1-row requests per loop")
    parser.add_argument("--batches", type=int, default=30, help="1,000-row requests per loop")
    args = parse_args(parser)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    env = run_env(args.src)
    load_start = os.getloadavg()
    import pandas as pd

    from trainpipe import supervise

    variants = models(args.data, env)
    raw = pd.read_csv(args.data).drop(columns=["id", "booking_status"])
    singles = [raw.iloc[[i]] for i in range(args.requests)]
    batches = [raw.iloc[i * 1000:(i + 1) * 1000] for i in range(args.batches)]

    def body(df) -> bytes:
        return json.dumps({"dataframe_split": json.loads(
            df.to_json(orient="split", index=False))}).encode()

    single_bodies, batch_bodies = [body(df) for df in singles], [body(df) for df in batches]
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "code": git_state(),
               "requests": args.requests, "batches": args.batches, "variants": {}}
    for name, uri in variants.items():
        port = supervise.free_port()
        proc = start_server(uri, port, env)
        try:
            measured = compare(uri, port, singles, batches, single_bodies, batch_bodies)
        finally:
            proc.terminate()
            proc.wait(60)
        results["variants"][name] = {"uri": uri, **measured}
        print(f"{name}: in-process p50 {measured['in_process']['p50_ms']:.2f} ms, served p50 "
              f"{measured['served']['p50_ms']:.2f} ms", file=sys.stderr)
    results["machine"] = machine(load_start)
    (WORK / "serve.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nraw numbers: {WORK / 'serve.json'}")


def report(r: dict) -> str:
    lines = [f"repo HEAD {r['code']['git_commit']}"
             + (" (uncommitted src/ edits)" if r["code"]["src_changes"] else "")
             + f" · {r['requests']} 1-row requests, {r['batches']} 1,000-row requests per loop"
             f" · load {r['machine']['loadavg_start'][0]:.2f} → "
             f"{r['machine']['loadavg_end'][0]:.2f}", "",
             "| model | where | 1 row p50 ms | 1 row p99 ms | 1 row mean ms | "
             "1,000-row requests: rows/s |", "|---|---|---:|---:|---:|---:|"]
    for name, v in r["variants"].items():
        for where in ("in_process", "served"):
            m = v[where]
            label = "in-process pyfunc.predict" if where == "in_process" else "trainpipe serve"
            lines.append(f"| {name} | {label} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                         f"{m['mean_ms']:.2f} | {m['rows_per_s_1000']:,.0f} |")
    lines.append("")
    for name, v in r["variants"].items():
        ratio = v["served"]["p50_ms"] / v["in_process"]["p50_ms"]
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        lines.append(f"- {name}: served / in-process 1-row p50 = {ratio:.2f} "
                     f"(target <= {TARGET_RATIO}: {verdict}); GET /ping p50 "
                     f"{v['ping']['p50_ms']:.2f} ms (the HTTP layer alone)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
