"""Benchmark of `trainpipe tune` on the hotel data:

1. quality: the test ROC AUC of LightGBM tuned for --trials trials (on --workers workers),
   against default LightGBM and the random forest, same data, same splits (seed 42);
2. throughput: trials a minute with 1 and with 2 workers (fresh studies of --rate-trials
   trials each), and the overhead a trial beyond the objective (fit + scoring on val):
   (search wall time x workers - the trials' own seconds) / trials.

    bench/run tune [--trials 60] [--rate-trials 20] [--workers 2] [--data CSV] [--src DIR]
    bench/run tune --skip-defaults --skip-quality --rate-workers 1 --override model.params.n_jobs=1

Everything goes to bench/work/tune/ (lake, mlflow.db, optuna.db); the numbers to
bench/work/tune.json and the terminal.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotel_data import WORK, parse_args, run_env  # noqa: E402

FOLDER = WORK / "tune"


def trainpipe(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trainpipe", *args], cwd=FOLDER, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"trainpipe {' '.join(args)} failed ({done.returncode}):\n"
                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def common(data: Path) -> list[str]:
    return [f"dataset.source={data}", f"lake.root={FOLDER / 'lake'}",
            f"tracking.uri=sqlite:///{FOLDER / 'mlflow.db'}"]


def client():
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{FOLDER / 'mlflow.db'}")


def newest(kind: str, study: str | None = None):
    experiment = client().get_experiment_by_name("trainpipe")
    query = f"tags.trainpipe.kind = '{kind}'"
    if study:
        query += f" and tags.`trainpipe.tune.study` = '{study}'"
    return client().search_runs([experiment.experiment_id], query,
                                order_by=["attributes.start_time DESC"], max_results=1)[0]


def default_auc(data: Path, model: str, env: dict) -> dict:
    seconds, _ = trainpipe(["run", f"model={model}", "--force", *common(data)], env)
    run = newest("pipeline")
    return {"model": model, "test_roc_auc": run.data.metrics["test_roc_auc"],
            "val_roc_auc": run.data.metrics.get("val_roc_auc"), "seconds": seconds}


def tune(data: Path, study: str, trials: int, workers: int, env: dict,
         overrides: list[str]) -> dict:
    seconds, out = trainpipe(["tune", "model=lightgbm", f"tune.study={study}",
                              f"tune.trials={trials}", "--workers", str(workers),
                              *common(data), *overrides], env)
    parent = newest("tune", study)
    final = client().get_run(parent.data.tags["trainpipe.tune.final_run_id"])
    trial_runs = client().search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=1000)
    own = sum(r.data.metrics.get("trial_seconds", 0.0) for r in trial_runs)
    fits = [r.data.metrics["fit_seconds"] for r in trial_runs if "fit_seconds" in r.data.metrics]
    search = parent.data.metrics["search_seconds"]
    states: dict[str, int] = {}
    for run in trial_runs:
        state = run.data.tags.get("trainpipe.trial.state", "?")
        states[state] = states.get(state, 0) + 1
    inside, between = steady_overhead(study, trial_runs)
    return {"study": study, "trials": trials, "workers": workers, "overrides": overrides,
            "overhead_inside_trial": inside, "overhead_between_trials": between,
            "command_seconds": seconds,
            "search_seconds": search, "trials_per_minute": 60 * len(trial_runs) / search,
            "overhead_per_trial": (search * workers - own) / len(trial_runs),
            "mean_fit_seconds": sum(fits) / len(fits) if fits else None,
            "states": states, "best_val_roc_auc": parent.data.metrics["best_val_roc_auc"],
            "best_params": json.loads(parent.data.tags["trainpipe.tune.best_params"]),
            "tuned_test_roc_auc": final.data.metrics["test_roc_auc"],
            "reproduce": next((line.strip() for line in out.splitlines()
                               if line.strip().startswith("reproduce")), "")}


def steady_overhead(study_name: str, trial_runs: list) -> tuple[float, float]:
    """A trial's cost beyond its objective once the workers run (their start-up aside):
    inside the trial (Optuna's start to its end, minus the objective's own seconds: the
    sampling, MLflow's run, the user attribute, the tell) and between two trials of one
    worker (callbacks, stale-trial check, heartbeat, the next ask). Means, in seconds."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{FOLDER / 'optuna.db'}")
    own = {r.info.run_id: r.data.metrics.get("trial_seconds", 0.0) for r in trial_runs}
    inside, by_worker = [], {}
    for trial in study.trials:
        attr = trial.user_attrs["trainpipe"]
        inside.append((trial.datetime_complete - trial.datetime_start).total_seconds()
                      - own[attr["mlflow_run_id"]])
        by_worker.setdefault(attr["worker"], []).append(trial)
    between = []
    for trials in by_worker.values():
        trials.sort(key=lambda t: t.datetime_start)
        between += [(b.datetime_start - a.datetime_complete).total_seconds()
                    for a, b in zip(trials, trials[1:], strict=False)]
    return sum(inside) / len(inside), sum(between) / max(1, len(between))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="for the quality run")
    parser.add_argument("--rate-trials", type=int, default=20)
    parser.add_argument("--rate-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--override", action="append", default=[],
                        help="an override for every tune command (repeatable)")
    parser.add_argument("--skip-defaults", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-rate", action="store_true")
    parser.add_argument("--out", type=Path, default=WORK / "tune.json")
    parser.add_argument("--fresh", action="store_true", help="remove bench/work/tune first")
    args = parse_args(parser)
    if args.fresh:
        shutil.rmtree(FOLDER, ignore_errors=True)
    FOLDER.mkdir(parents=True, exist_ok=True)
    env = run_env(args.src)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results: dict = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.skip_defaults:
        results["defaults"] = [default_auc(args.data, m, env)
                               for m in ("lightgbm", "random_forest")]
        print(json.dumps(results["defaults"], indent=1), flush=True)
    if not args.skip_quality:
        results["quality"] = tune(args.data, f"bench-quality-{stamp}", args.trials,
                                  args.workers, env, args.override)
        print(json.dumps(results["quality"], indent=1), flush=True)
    if not args.skip_rate:
        results["rate"] = [tune(args.data, f"bench-rate-{workers}w-{stamp}", args.rate_trials,
                                workers, env, args.override) for workers in args.rate_workers]
        print(json.dumps(results["rate"], indent=1), flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
