"""The command line: `trainpipe run`, `trainpipe step NAME`, `trainpipe registry`,
`trainpipe predict`, `trainpipe serve`, `trainpipe report`, `trainpipe tune`,
`trainpipe dataset init`, `trainpipe data demo`, `trainpipe stack`.

Exit codes: 0 success, 1 unexpected error, 2 usage or config error (also a missing or
unreadable source), 3 data validation failed, 4 the gate kept the champion and
registry.require_promotion=true, 130 interrupted.
"""

import contextlib
import gc
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from trainpipe.deferred import imports_deferred
from trainpipe.errors import GateFailed, Interrupted, TrainpipeError
from trainpipe.redaction import redact_text


class _ListByDefault(TyperGroup):
    """`trainpipe registry [NAME]` is `trainpipe registry list [NAME]`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] != "--help"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Raw tabular data in a lake to a validated, tracked model.")
data_app = typer.Typer(no_args_is_help=True, help="Data helpers.")
app.add_typer(data_app, name="data")
dataset_app = typer.Typer(no_args_is_help=True, help="Dataset files.")
app.add_typer(dataset_app, name="dataset")
stack_app = typer.Typer(no_args_is_help=True, help="The local production-like stack: "
                        "PostgreSQL + MLflow tracking server (artifacts to S3 or a folder).")
app.add_typer(stack_app, name="stack")
registry_app = typer.Typer(
    cls=_ListByDefault, help="The MLflow Model Registry: `trainpipe registry [NAME]` lists "
    "the versions; promote and rollback move the champion by hand.")
app.add_typer(registry_app, name="registry")
StackFolder = Annotated[str, typer.Option("--folder", help="Where the stack keeps its state "
                                          "and data.")]
out = Console()
err = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(
    help="Hydra overrides, e.g. model=lightgbm seed=7 dataset.source=s3://b/raw.csv")]
OverridesText = Annotated[str | None, typer.Option(
    "--overrides", help="Several overrides in one string, split like a shell would: "
    "'model=lightgbm seed=3' (how `mlflow run` passes them).")]
Multirun = Annotated[bool, typer.Option("-m", "--multirun", help="Sweep: seed=1,2,3 runs 3 jobs.")]
PrintCfg = Annotated[str | None, typer.Option("--cfg", help="Print the resolved config "
                                              "('job') and exit.")]
ConfigDir = Annotated[str | None, typer.Option("--config-dir", help="A folder of your own "
                                               "config (e.g. dataset/mine.yaml).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks for every error.")]
Force = Annotated[bool, typer.Option("--force", help="Ignore the cache: redo every step run.")]
StepName = Annotated[str, typer.Argument(help="ingest | validate | split | features | train | "
                                         "evaluate | register | predict")]
ModelUri = Annotated[str | None, typer.Option(
    "--model", help="A model URI: models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-... (a "
    "run's trainpipe.model_uri), runs:/RUN_ID/PATH. Default: models:/<registry name, else the "
    "dataset name>@champion.")]


@app.command()
def run(overrides: Overrides = None, multirun: Multirun = False, cfg: PrintCfg = None,
        config_dir: ConfigDir = None, verbose: Verbose = False, force: Force = False,
        first: Annotated[str | None, typer.Option("--from", help="First step to run.")] = None,
        last: Annotated[str | None, typer.Option("--to", help="Last step to run.")] = None,
        overrides_text: OverridesText = None) -> None:
    """Run the pipeline: ingest, validate, split, features, train, evaluate, register. Steps
    whose output is already published (same data, code and config) are reused, not redone."""
    with imports_deferred():  # an unchanged run needs no pandas: see deferred.py
        _execute((first, last), _overrides(overrides, overrides_text), multirun, cfg, config_dir,
                 verbose, force)


@app.command()
def step(name: StepName, overrides: Overrides = None, multirun: Multirun = False,
         cfg: PrintCfg = None, config_dir: ConfigDir = None, verbose: Verbose = False,
         force: Force = False, overrides_text: OverridesText = None) -> None:
    """Run one step alone, reading its inputs from the lake (same as --from NAME --to NAME)."""
    with imports_deferred():  # an unchanged run needs no pandas: see deferred.py
        _execute((name, name), _overrides(overrides, overrides_text), multirun, cfg, config_dir,
                 verbose, force)


@app.command()
def inspect(overrides: Overrides = None, config_dir: ConfigDir = None,
            verbose: Verbose = False) -> None:
    """Show the steps in order: fingerprint, cache state, the run that made the output."""
    from trainpipe import config, pipeline
    from trainpipe.lake import DamagedOutput
    from trainpipe.steps import ingest

    try:
        cfg = config.compose(overrides or [], config_dir)
        catalog = pipeline.catalog_for(cfg, ingest.read_sources(cfg))
    except TrainpipeError as exc:
        _fail(exc, verbose)
    table = Table(show_edge=False)
    for col in ("step", "fingerprint", "state", "made by run", "output"):
        table.add_column(col, overflow="fold")
    for step in pipeline.STEPS:
        name = step.name
        try:
            manifest, state = catalog.manifest(name), "published"
        except DamagedOutput:
            manifest, state = None, "damaged"
        if manifest is None and state != "damaged":
            state = "missing" if catalog.publishes(name) else "-"
            state = state if step.when(cfg) else "does not apply"
        where = catalog.url(name) if catalog.publishes(name) and step.when(cfg) else ""
        made_by = (manifest or {}).get("pipeline_run_id") or (manifest or {}).get("run_id", "")
        table.add_row(name, catalog.fingerprints[name][:12], state, made_by,
                      redact_text(where))
    out.print(table)


@app.command()
def clean(overrides: Overrides = None, config_dir: ConfigDir = None,
          step_name: Annotated[str | None, typer.Option("--step", help="Only this step's "
                                                        "outputs.")] = None,
          keep: Annotated[int, typer.Option(help="Newest outputs to keep per step, besides "
                                            "those a kept config needs.")] = 1,
          keep_config: Annotated[list[str] | None, typer.Option(
              "--keep-config", help="Overrides of another config whose outputs to keep too, "
              "e.g. \"model=lightgbm seed=3\" (repeatable).")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be "
                                                "removed; remove nothing.")] = False,
          models: Annotated[bool, typer.Option("--models", help="Also delete the MLflow "
                                               "models (and their artifacts) of the train "
                                               "outputs removed.")] = False,
          verbose: Verbose = False) -> None:
    """Remove published outputs (never raw data) that this config and each --keep-config
    do not need, keeping the newest --keep per step as well."""
    from trainpipe import config, housekeeping

    try:
        cfg = config.compose(overrides or [], config_dir)
        kept = [_keep_config(value, config_dir) for value in keep_config or []]
        result = housekeeping.clean(cfg, step_name, keep, tuple(kept), dry_run, models)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    removed, deleted = ("would remove", "would delete") if dry_run else ("removed", "deleted")
    for url in result.removed:
        out.print(f"{removed} {redact_text(url)}", highlight=False, soft_wrap=True)
    for model in result.models:
        out.print(f"{deleted} model {redact_text(model)}", highlight=False, soft_wrap=True)
    for note in result.models_left:
        out.print(f"left model {redact_text(note)}", highlight=False, soft_wrap=True)
    done = "would be removed" if dry_run else "removed"
    summary = f"{len(result.removed)} output(s) {done}"
    if models:
        summary += f", {len(result.models)} model(s) {done.replace('removed', 'deleted')}"
    whose = "this config or a --keep-config needs" if kept else "this config needs"
    out.print(f"{'dry run: ' if dry_run else ''}{summary}; kept the {result.needed} output(s) "
              f"{whose}", highlight=False, soft_wrap=True)


def _keep_config(value: str, config_dir: str | None):
    from trainpipe import config

    try:
        return config.compose(config.split_overrides([value]), config_dir)
    except TrainpipeError as exc:
        raise type(exc)(f"--keep-config {value!r}: {exc}") from None


@app.command()
def predict(input_url: Annotated[str, typer.Option(
                "--input", help="The rows to score: CSV or Parquet, any fsspec URL (a path, "
                "s3://...), the dataset's columns without the target.")],
            output_url: Annotated[str, typer.Option(
                "--output", help="Where the predictions go: a .csv or .parquet file, any "
                "fsspec URL.")],
            overrides: Overrides = None, model: ModelUri = None, config_dir: ConfigDir = None,
            verbose: Verbose = False, overrides_text: OverridesText = None) -> None:
    """Score a file with a model. The rows are checked against the dataset's contract first
    (the validation report and exit 3 when they break it), scored in chunks, and written
    whole or not at all; the run is recorded in MLflow (tag trainpipe.kind=predict)."""
    from trainpipe import config, lake, serving

    try:
        cfg = config.compose(_overrides(overrides, overrides_text), config_dir)
        serving.output_format(output_url)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    shown_model = model or serving.default_model(cfg)
    out.print(f"[bold]trainpipe predict[/] {cfg.dataset.name} · model {shown_model} · "
              f"tracking {redact_text(str(cfg.tracking.uri))}", highlight=False, soft_wrap=True)
    with _reported("the predict run is marked KILLED; nothing was written to --output",
                   verbose):
        scored = serving.predict_file(cfg, model, input_url, output_url)
    source = scored.input
    out.print(f"  input   {redact_text(lake.absolute(source.url))} ({source.format}, "
              f"{source.size / 2**20:,.1f} MB, sha256 {source.digest[:12]})",
              highlight=False, soft_wrap=True)
    rate = scored.rows / scored.seconds if scored.seconds else 0
    out.print(f"  [green]✓[/] {scored.rows:,} rows scored in {scored.seconds:.2f} s "
              f"({rate:,.0f} rows/s) by {scored.model.version}", highlight=False,
              soft_wrap=True)
    out.print(f"  output  {scored.output}", highlight=False, soft_wrap=True)
    out.print(f"  run id  {scored.run_id}", highlight=False)
    _browse_hint(cfg)


@app.command()
def serve(overrides: Overrides = None, model: ModelUri = None,
          port: Annotated[int, typer.Option(min=1, max=65535, help="The port to listen on.")
                          ] = 5001,
          host: Annotated[str, typer.Option(help="The address to listen on: this machine "
                                            "only unless told otherwise (0.0.0.0: every "
                                            "interface).")] = "127.0.0.1",
          config_dir: ConfigDir = None, verbose: Verbose = False,
          overrides_text: OverridesText = None) -> None:
    """Serve a model over HTTP with MLflow's scoring server (POST /invocations, GET /ping)
    until Ctrl-C."""
    from trainpipe import config, serving

    def ready(server: serving.Server) -> None:
        pinned = "" if server.model.version == server.model.uri else (
            f" ({server.model.uri})")
        out.print(f"[bold]trainpipe serve[/] {server.model.version}{pinned} at {server.url} "
                  f"(MLflow scoring server, pid {server.process.pid})", highlight=False,
                  soft_wrap=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            out.print(f"  [yellow]![/] listening on {host}: whoever reaches this machine "
                      "can call the model", highlight=False)
        out.print(f"  health   curl {server.url}/ping", highlight=False, soft_wrap=True)
        out.print(f"  predict  {server.example}", highlight=False, soft_wrap=True,
                  markup=False)
        out.print(f"  log      {server.log}", highlight=False, soft_wrap=True)
        out.print("Ctrl-C stops it.", highlight=False)

    try:
        cfg = config.compose(_overrides(overrides, overrides_text), config_dir)
        out.print(f"starting MLflow's scoring server for {model or serving.default_model(cfg)}"
                  f" on {host}:{port} ...", highlight=False, soft_wrap=True)
        serving.serve(cfg, model, host, port, ready)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    out.print("stopped the model server", highlight=False)


@app.command()
def report(words: Annotated[list[str] | None, typer.Argument(
               help="RUN_ID (a pipeline run; default: the newest in tracking.experiment) and "
               "Hydra overrides naming the store, e.g. tracking.uri=sqlite:///mlflow.db")] = None,
           out_path: Annotated[str | None, typer.Option(
               "--out", help="The file (or folder) to write; default: "
               "./report-<run id>.html")] = None,
           config_dir: ConfigDir = None, verbose: Verbose = False) -> None:
    """Write the HTML report of a pipeline run to a local file and print its path: the page
    every run logs as report.html, built again from what MLflow recorded."""
    from trainpipe import config
    from trainpipe import report as reports
    from trainpipe.errors import ConfigError

    words = words or []
    run_ids = [w for w in words if "=" not in w]
    try:
        if len(run_ids) > 1:
            raise ConfigError(f"expected one RUN_ID, then overrides (key=value); got "
                              f"{' '.join(run_ids)}")
        cfg = config.compose([w for w in words if "=" in w], config_dir)
        client = _existing_store(cfg)
        run_id, path = reports.write(client, run_ids[0] if run_ids else None,
                                     str(cfg.tracking.experiment), out_path)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    err.print(f"report of pipeline run {run_id}", highlight=False)
    out.print(str(path), highlight=False, soft_wrap=True)


def _existing_store(cfg):
    """A client of the store the config names; an SQLite store that does not exist is an
    error (reading it must not create it)."""
    from trainpipe.config import tracking_uri
    from trainpipe.errors import ConfigError
    from trainpipe.tracking import Tracking, sqlite_path

    uri = tracking_uri(cfg)
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        raise ConfigError(f"no MLflow store at {path} (tracking.uri={redact_text(uri)}): run "
                          "`trainpipe run` first, or name the store with tracking.uri=...")
    return Tracking(cfg).client


@data_app.command("demo")
def data_demo(rows: Annotated[int, typer.Option(min=1, help="Number of rows.")] = 20_000,
              out_url: Annotated[str, typer.Option("--out", help="Where to write the CSV "
                                                   "(any fsspec URL).")] = "demo/train.csv",
              seed: Annotated[int, typer.Option(help="Random seed.")] = 0) -> None:
    """Write synthetic hotel-booking data (the shape of the real hotel data)."""
    from trainpipe import demo, lake

    df = demo.hotel_bookings(rows=rows, seed=seed)
    lake.write_file(out_url, df.to_csv(index=False).encode())
    out.print(f"wrote {len(df):,} rows to {out_url}")


RegistryWords = Annotated[list[str] | None, typer.Argument(
    help="NAME (default: registry.name, i.e. the dataset's name) and Hydra overrides naming "
    "the store, e.g. tracking=server or tracking.uri=sqlite:///mlflow.db")]
Reason = Annotated[str | None, typer.Option("--reason", help="Why: recorded on the version "
                                            "with who and when.")]
COUNTS = {"test_tn", "test_fp", "test_fn", "test_tp"}  # in the gate report, not the list


@registry_app.command("list")
def registry_list(words: RegistryWords = None, config_dir: ConfigDir = None,
                  verbose: Verbose = False) -> None:
    """The versions of a registered model, newest first: aliases, the train step's run that
    logged it, gate, test metrics."""
    from trainpipe.steps.evaluate import PRIMARY

    try:
        registry, cfg, [name] = _registry(words, config_dir, ["NAME"], optional=True)
        name = name or str(cfg.registry.name)
        versions = registry.versions(name)
        metrics = {v.version: registry.test_metrics(v) for v in versions}
    except TrainpipeError as exc:
        _fail(exc, verbose)
    out.print(f"[bold]{name}[/] · tracking {redact_text(registry.uri)}", highlight=False,
              soft_wrap=True)
    table = Table(show_edge=False)
    for col in ("version", "aliases", "registered (UTC)", "train run", "gate", "test metrics"):
        table.add_column(col, overflow="fold")
    for v in versions:
        primary = f"test_{PRIMARY.get(v.tags.get('trainpipe.task'), ('', True))[0]}"
        shown = sorted((m for m in metrics[v.version] if m not in COUNTS),
                       key=lambda m: (m != primary, m))[:3]  # all: in the gate report
        table.add_row(str(v.version), ", ".join(v.aliases), f"{v.created:%Y-%m-%d %H:%M}",
                      v.run_id or "", v.tags.get("trainpipe.gate", ""),
                      "  ".join(f"{m.removeprefix('test_')} {metrics[v.version][m]:.4f}"
                                for m in shown))
    out.print(table)
    for v in versions:  # who moved each alias there, when and why
        for alias in v.aliases:
            when, who, why = (v.tags.get(f"trainpipe.{alias}.{k}") for k in ("set_at", "set_by",
                                                                            "why"))
            if when:
                out.print(f"  {alias}: version {v.version}, set {when} by {who}: {why}",
                          highlight=False, soft_wrap=True)
    if not versions:
        out.print("  no versions")


@registry_app.command("promote")
def registry_promote(name: Annotated[str, typer.Argument(help="The registered model.")],
                     version: Annotated[int, typer.Argument(help="The version to promote.")],
                     overrides: Overrides = None, reason: Reason = None,
                     config_dir: ConfigDir = None, verbose: Verbose = False) -> None:
    """Make VERSION the champion of NAME, whatever the gate said (recorded: who, when, why)."""
    try:
        registry, _, _ = _registry(overrides, config_dir, [])
        new, before = registry.promote(name, version, reason or "promoted by hand "
                                       "(trainpipe registry promote, no --reason given)")
    except TrainpipeError as exc:
        _fail(exc, verbose)
    was = f"version {before.version}" if before else "none"
    out.print(f"champion of {name}: version {new.version} (was {was})", highlight=False)


@registry_app.command("rollback")
def registry_rollback(name: Annotated[str, typer.Argument(help="The registered model.")],
                      overrides: Overrides = None, reason: Reason = None,
                      config_dir: ConfigDir = None, verbose: Verbose = False) -> None:
    """Give the champion alias back to the version that held it before the current one."""
    try:
        registry, _, _ = _registry(overrides, config_dir, [])
        new, before = registry.rollback(name, reason or "no --reason given")
    except TrainpipeError as exc:
        _fail(exc, verbose)
    out.print(f"champion of {name}: version {new.version} (rolled back from version "
              f"{before.version})", highlight=False)


def _registry(words: list[str] | None, config_dir: str | None, names: list[str],
              optional: bool = False):
    """The registry of the store the config names, the config, and the positional words
    (those without '=') that `names` asks for; the rest are overrides."""
    from trainpipe import config
    from trainpipe.errors import ConfigError
    from trainpipe.registry import Registry

    words = words or []
    positional = [w for w in words if "=" not in w]
    if len(positional) > len(names) or (len(positional) < len(names) and not optional):
        raise ConfigError(f"expected {' '.join(names) or 'no name'}, then overrides "
                          f"(key=value); got {' '.join(positional)}")
    cfg = config.compose([w for w in words if "=" in w], config_dir)
    return Registry(cfg), cfg, positional + [None] * (len(names) - len(positional))


@app.command()
def tune(overrides: Overrides = None,
         workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes "
                                              "here; the same command elsewhere (same "
                                              "tune.study) adds more.")] = 1,
         config_dir: ConfigDir = None, verbose: Verbose = False,
         overrides_text: OverridesText = None) -> None:
    """Search model.search_space with Optuna: tune.trials trials (each a nested MLflow run
    under one tune run, fit on train, scored on val), then train the best params in a normal
    run (test evaluation, report, registry gate). Running it again adds trials."""
    from trainpipe import config, pipeline, tuning
    from trainpipe.tracker import Tracker

    words = _overrides(overrides, overrides_text)
    tracker = Tracker.start()
    try:
        cfg = config.compose(words, config_dir)
        plan = tuning.plan(cfg)  # search space, metric, storage: before any trial
    except TrainpipeError as exc:
        tracker.discard()
        _fail(exc, verbose)
    out.print(f"[bold]trainpipe tune[/] study {plan.study} · {plan.trials} trial(s) on "
              f"{workers} worker(s) · {plan.direction} val_{plan.metric} · storage "
              f"{plan.shown}", highlight=False, soft_wrap=True)
    out.print("data up to features (reused when published):", highlight=False)
    code = _run_one(cfg, words, (None, "features"), False, verbose, tracker)
    if code:
        raise typer.Exit(code)
    out.rule("search")
    with _reported("the tune run and its running trials are marked KILLED / FAIL; the same "
                   "command resumes the study", verbose), pipeline.sigterm_interrupts():
        found = tuning.search(cfg, words, plan, workers,
                              lambda m: out.print(m, highlight=False, soft_wrap=True))
    _tune_summary(plan, found)
    final = tuning.best_overrides(cfg, words, found.best_params)
    out.print(f"  reproduce   trainpipe run {' '.join(final)}", highlight=False, soft_wrap=True,
              markup=False)
    out.rule("the best params, trained and evaluated on test")
    try:
        final_cfg = config.compose(final, config_dir)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    code = _run_one(final_cfg, final, (None, None), False, verbose, Tracker.start(),
                    on_result=lambda r: tuning.link_final(final_cfg, found.parent_run_id,
                                                          plan.study, r.run_id))
    raise typer.Exit(code)


def _tune_summary(plan, found) -> None:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(found.counts.items()))
    out.print(f"  trials      {counts or 'none'} in {found.seconds:.1f}s (this command); "
              f"{found.total_trials} in the study", highlight=False)
    if found.replaced:
        out.print(f"  workers     killed and replaced: {', '.join(found.replaced)}",
                  highlight=False)
    out.print(f"  best        trial {found.best_number}: val_{plan.metric} "
              f"{found.best_value:.4f}", highlight=False)
    for name, value in found.best_params.items():
        out.print(f"    {name:<24} {value}", highlight=False)
    out.print(f"  tune run    {found.parent_run_id}", highlight=False)


@dataset_app.command("init")
def dataset_init(
        source: Annotated[str, typer.Argument(help="A CSV or Parquet file (any fsspec URL); "
                                              "a large one is sampled: its first rows.")],
        target: Annotated[str | None, typer.Option(help="The column to predict (default: "
                                                   "guessed).")] = None,
        task: Annotated[str | None, typer.Option(help="binary | multiclass | regression "
                                                 "(default: guessed from the target).")] = None,
        name: Annotated[str | None, typer.Option(help="The dataset's name (default: the "
                                                 "file's).")] = None,
        out_dir: Annotated[str, typer.Option("--out", help="The config folder: writes "
                                             "OUT/dataset/NAME.yaml.")] = "conf",
        force: Annotated[bool, typer.Option("--force", help="Overwrite the file even if a "
                                            "person edited it.")] = False,
        verbose: Verbose = False) -> None:
    """Write a dataset file inferred from a table: types, nulls, ranges, values, target, task.
    Exit 3 when the table breaks trainpipe's rules (the file is written all the same)."""
    from trainpipe import dataset_init as init

    try:
        written = init.init(source, out_dir, name, target, task, force)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    found = written.inferred
    done = "rewrote" if written.replaced else "wrote"
    out.print(f"{done} {written.path}: {len(found.columns)} columns from "
              f"{written.sample.described()}", highlight=False, soft_wrap=True)
    out.print(f"  target {found.target} ({found.task})"
              + (f", id column {found.id_column}" if found.id_column else ""), highlight=False)
    for key, note in found.checks():
        out.print(f"  check {key}: {note}", highlight=False, soft_wrap=True)
    if written.problems:
        err.print("[red bold]invalid data[/]: the table breaks the dataset file as written, "
                  "and `trainpipe run` would stop at validation:", soft_wrap=True)
        err.print(redact_text(written.problems), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    out.print(f"then: trainpipe run --config-dir {out_dir} dataset={found.name}",
              highlight=False, soft_wrap=True)


@stack_app.command("up")
def stack_up(folder: StackFolder = ".trainpipe/stack",
             port: Annotated[int | None, typer.Option(help="MLflow server port (default "
                                                      "5000; 0: any free port).")] = None,
             backend_store_uri: Annotated[str | None, typer.Option(
                 "--backend-store-uri", help="An existing PostgreSQL; default: a cluster "
                 "of the stack's own.")] = None,
             artifacts_destination: Annotated[str | None, typer.Option(
                 "--artifacts-destination", help="s3://bucket/prefix or a folder; default: "
                 "<folder>/artifacts.")] = None,
             verbose: Verbose = False) -> None:
    """Start what is missing, health-check it, print the tracking URI and what to export."""
    from trainpipe import stack

    try:
        info = stack.up(folder, port, backend_store_uri, artifacts_destination)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    _print_services(info.services)
    out.print(f"started: {', '.join(info.started) or 'nothing'}; reused: "
              f"{', '.join(info.reused) or 'nothing'} ({info.seconds:.1f}s)")
    out.print(f"tracking URI  {info.tracking_uri}", highlight=False)
    out.print(f"backend store {redact_text(info.backend_store_uri)}", highlight=False)
    out.print(f"artifacts     {redact_text(info.artifacts_destination)}", highlight=False)
    out.print("export before `trainpipe run tracking=server`:")
    for name, value in info.env.items():
        out.print(f"  export {name}={value}", highlight=False, soft_wrap=True)
    out.print("then: trainpipe run tracking=server  (a lake on S3 too: add lake=s3 "
              "lake.root=s3://BUCKET/lake, with AWS credentials in the environment)",
              highlight=False, soft_wrap=True)


@stack_app.command("status")
def stack_status(folder: StackFolder = ".trainpipe/stack") -> None:
    """Each part of the stack: pid, port, health. Exit 1 when a part is not healthy."""
    from trainpipe import stack

    services = stack.status(folder)
    if not services:
        out.print(f"no stack in {folder} (start one with `trainpipe stack up`)")
        raise typer.Exit(1)
    _print_services(services)
    if not all(s.healthy for s in services):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(folder: StackFolder = ".trainpipe/stack") -> None:
    """Stop what `stack up` started, and nothing else; the data stays for the next `up`."""
    from trainpipe import stack

    stopped = stack.down(folder)
    for line in stopped:
        out.print(f"stopped {line}", highlight=False)
    if not stopped:
        out.print("nothing to stop")


def _print_services(services) -> None:
    for s in services:
        mark = "[green]✓[/]" if s.healthy else "[red]✗[/]"
        owner = "started by stack up" if s.managed else "external"
        out.print(f"  {mark} {s.name:<10} pid {s.pid or '-'}  port {s.port or '-'}  ({owner})",
                  highlight=False)
        out.print(f"      {redact_text(s.detail)}", highlight=False, soft_wrap=True)


def _execute(span, overrides, multirun, print_cfg, config_dir, verbose, force) -> None:
    from trainpipe import config, pipeline
    from trainpipe.tracker import Tracker

    # MLflow loads in a process of its own while the config is read and the data checked;
    # a run with nothing to do ends it unused.
    tracker = Tracker.start() if print_cfg is None else None
    if getattr(tracker and tracker.proc, "started_warm_tracker", False):
        from trainpipe import warm

        _notice(f"started a warm tracker: later runs fork their MLflow tracker from it; it "
                f"exits after {warm.idle_seconds() / 60:g} minutes without a run "
                f"({warm.ENV}=0 turns it off)")
    try:
        pipeline.select(*span)  # unknown step names are usage errors, before anything runs
        jobs = config.expand_sweeps(overrides) if multirun else [overrides]
        cfgs = [config.compose(job, config_dir) for job in jobs]
    except TrainpipeError as exc:
        if tracker is not None:
            tracker.discard()
        _fail(exc, verbose)
    if print_cfg is not None:
        for job_cfg in cfgs:
            out.print(config.to_yaml(job_cfg), markup=False, highlight=False)
        return
    codes = []
    for i, (job, job_cfg) in enumerate(zip(jobs, cfgs, strict=True)):
        if multirun:
            out.rule(f"job {i + 1}/{len(jobs)}: {' '.join(job) or '(defaults)'}")
        codes.append(_run_one(job_cfg, job, span, force, verbose,
                              tracker if i == 0 else Tracker.start()))
        if codes[-1] == 130:  # Ctrl-C stops the sweep, not just this job
            break
    if any(codes):
        raise typer.Exit(max(codes))


def _run_one(cfg, overrides, span, force, verbose, tracker, on_result=None) -> int:
    from trainpipe import pipeline

    lake, tracking = redact_text(str(cfg.lake.root)), redact_text(str(cfg.tracking.uri))
    out.print(f"[bold]trainpipe[/] {cfg.dataset.name} · {cfg.model.name} · lake {lake} · "
              f"tracking {tracking}", highlight=False, soft_wrap=True)

    def on_step(r: pipeline.StepResult) -> None:
        if r.status == "running":
            out.print(f"  [cyan]▶[/] {r.name} ...", highlight=False)
        else:
            mark = {"done": "[green]✓[/]", "cached": "[blue]=[/]", "failed": "[red]✗[/]",
                    "killed": "[yellow]■[/]"}
            out.print(f"  {mark[r.status]} {r.name:<9} {r.seconds:6.2f}s  {_said(r)}",
                      highlight=False, soft_wrap=True)

    result = pipeline.run(cfg, overrides, *span, force=force, on_step=on_step,
                          on_notice=_notice, tracker=tracker)
    if isinstance(result.error, KeyboardInterrupt | Interrupted):
        _exiting_interrupted()  # before the summary: a further Ctrl-C must not cut it short
    if on_result is not None:  # e.g. tune: tag the final run with its study
        on_result(result)
    _summary(cfg, result)
    if result.error is not None:
        if isinstance(result.error, KeyboardInterrupt | Interrupted):
            err.print("[yellow]interrupted[/]: runs marked KILLED")
            return 130
        return _report_error(result.error, verbose)
    if cfg.registry.require_promotion and result.tags.get("trainpipe.gate") == "failed":
        # also when up to date: the published registration says what the gate decided
        name = result.tags.get("trainpipe.registered_model")
        version = result.tags.get("trainpipe.registered_version")
        return _report_error(GateFailed(
            f"version {version} of {name} (registry.require_promotion=true): "
            f"{result.tags.get('trainpipe.gate.decision', '')}"), verbose)
    return 0


def _summary(cfg, result) -> None:
    if result.up_to_date:
        out.print("  [blue]=[/] up to date: every step's output is published for this config; "
                  "nothing to run (--force redoes it)", highlight=False, soft_wrap=True)
    elif result.run_id is None and all(r.status == "pending" for r in result.steps):
        return  # stopped before any run started (config, source, server): the error says it
    else:
        table = Table(title="summary", show_edge=False, title_justify="left")
        for col in ("step", "status", "seconds", "result"):
            table.add_column(col)
        for r in result.steps:
            table.add_row(r.name, r.status, f"{r.seconds:.2f}", _said(r))
        out.print(table)
    for name, value in sorted(result.metrics.items()):
        if name.startswith("test_"):
            shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:.4f}"
            out.print(f"  {name:<30} {shown}", highlight=False)
    if result.run_id:
        out.print(f"  run id      {result.run_id}")
    if result.report:
        out.print(f"  report      {redact_text(result.report)}", highlight=False, soft_wrap=True)
    elif result.report_problem and result.run_id:
        out.print("  [yellow]![/] report.html not written: "
                  + escape(redact_text(result.report_problem)), highlight=False, soft_wrap=True)
    if "trainpipe.model_uri" in result.tags:
        out.print(f"  model       {result.tags['trainpipe.model_uri']}")
    if result.made_by:
        out.print(f"  made by run {result.made_by}")
    if result.up_to_date and "trainpipe.gate.decision" in result.tags:
        out.print(f"  gate        {result.tags['trainpipe.gate.decision']}", highlight=False,
                  soft_wrap=True)
    _browse_hint(cfg, "  browse      ")


def _said(step) -> str:
    """A step's result in a line; a failed step's reason comes after the summary, in full."""
    return step.summary or ("see the error below" if step.status == "failed" else "")


def _notice(message: str) -> None:
    # soft_wrap: a link or a path in a notice stays on one line, to copy
    out.print(f"  [yellow]![/] {message}", soft_wrap=True)


def _browse_hint(cfg, label: str = "  browse  ") -> None:
    from trainpipe.config import tracking_uri
    from trainpipe.redaction import redact_uri

    # soft_wrap: a command to copy must stay on one line, whatever the terminal's width
    uri = redact_uri(tracking_uri(cfg))
    hint = f"open {uri}" if uri.startswith(("http://", "https://")) else (
        f"mlflow ui --backend-store-uri {uri}")
    out.print(f"{label}{hint}", highlight=False, soft_wrap=True)


def _report_error(exc: BaseException, verbose: bool) -> int:
    if verbose or not isinstance(exc, TrainpipeError):
        import traceback

        err.print(redact_text("".join(traceback.format_exception(exc))), markup=False,
                  highlight=False)
    code = exc.exit_code if isinstance(exc, TrainpipeError) else 1
    kind = {2: "error", 3: "invalid data", 4: "not promoted"}.get(code, "failed")
    err.print(f"[red bold]{kind}[/]: ", end="")
    # soft_wrap: paths and values stay whole, to copy and to grep
    err.print(redact_text(str(exc)), markup=False, highlight=False, soft_wrap=True)
    for note in getattr(exc, "__notes__", []):
        err.print(redact_text(note), markup=False, highlight=False, soft_wrap=True)
    return code


def _overrides(args: list[str] | None, text: str | None) -> list[str]:
    """Each argument is one override, spaces and all (`'dataset.source=/a b.csv'`);
    `--overrides` holds several in one string."""
    from trainpipe import config

    return [*(args or []), *config.split_overrides([text] if text else [])]


@contextlib.contextmanager
def _reported(when_interrupted: str, verbose: bool):
    """A command's work: Ctrl-C or SIGTERM exits 130 saying what became of it; an error
    exits with its code, in words (a traceback when unexpected)."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted):
        _exiting_interrupted()
        err.print(f"[yellow]interrupted[/]: {when_interrupted}")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - reported in words
        raise typer.Exit(_report_error(exc, verbose)) from None


def _fail(exc: TrainpipeError, verbose: bool):
    raise typer.Exit(_report_error(exc, verbose))


def _exiting_interrupted() -> None:
    """The runs are ended and the program exits 130: a further Ctrl-C (often pressed twice)
    must not land in the interpreter's exit, which would then die by the signal; SIGTERM
    ends it at once. Only in the program's own process (not under a test's CliRunner)."""
    import os
    import signal

    if _program:
        with contextlib.suppress(ValueError):  # not the main thread: leave them
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(130))


_program = False  # set by main(): the signals are this command's to change


def main() -> None:
    global _program
    _program = True
    try:
        app()
    except KeyboardInterrupt:
        _exiting_interrupted()
        err.print("interrupted")
        sys.exit(130)
    finally:
        # A run leaves millions of objects behind (MLflow, pandas, scikit-learn); freezing
        # them spares the collector's final pass over them at exit (about a second).
        gc.freeze()
