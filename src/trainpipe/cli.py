"""The command line: `trainpipe run`, `trainpipe step NAME`, `trainpipe dataset init`,
`trainpipe data demo`, ...

Exit codes: 0 success, 1 unexpected error, 2 usage or config error (also a missing or
unreadable source), 3 data validation failed, 130 interrupted.
"""

import gc
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from trainpipe.errors import Interrupted, TrainpipeError
from trainpipe.redaction import redact_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Raw tabular data in a lake to a validated, tracked model.")
data_app = typer.Typer(no_args_is_help=True, help="Data helpers.")
app.add_typer(data_app, name="data")
dataset_app = typer.Typer(no_args_is_help=True, help="Dataset files.")
app.add_typer(dataset_app, name="dataset")
stack_app = typer.Typer(no_args_is_help=True, help="The local production-like stack: "
                        "PostgreSQL + MLflow tracking server (artifacts to S3 or a folder).")
app.add_typer(stack_app, name="stack")
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
                                         "evaluate")]


@app.command()
def run(overrides: Overrides = None, multirun: Multirun = False, cfg: PrintCfg = None,
        config_dir: ConfigDir = None, verbose: Verbose = False, force: Force = False,
        first: Annotated[str | None, typer.Option("--from", help="First step to run.")] = None,
        last: Annotated[str | None, typer.Option("--to", help="Last step to run.")] = None,
        overrides_text: OverridesText = None) -> None:
    """Run the pipeline: ingest, validate, split, features, train, evaluate. Steps whose
    output is already published (same data, code and config) are reused, not redone."""
    _execute((first, last), _overrides(overrides, overrides_text), multirun, cfg, config_dir,
             verbose, force)


@app.command()
def step(name: StepName, overrides: Overrides = None, multirun: Multirun = False,
         cfg: PrintCfg = None, config_dir: ConfigDir = None, verbose: Verbose = False,
         force: Force = False, overrides_text: OverridesText = None) -> None:
    """Run one step alone, reading its inputs from the lake (same as --from NAME --to NAME)."""
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
    for name in pipeline.STEP_NAMES:
        try:
            manifest, state = catalog.manifest(name), "published"
        except DamagedOutput:
            manifest, state = None, "damaged"
        if manifest is None and state != "damaged":
            state = "missing" if catalog.publishes(name) else "-"
        where = catalog.url(name) if catalog.publishes(name) else ""
        made_by = (manifest or {}).get("pipeline_run_id") or (manifest or {}).get("run_id", "")
        table.add_row(name, catalog.fingerprints[name][:12], state, made_by,
                      redact_text(where))
    out.print(table)


@app.command()
def clean(overrides: Overrides = None, config_dir: ConfigDir = None,
          step_name: Annotated[str | None, typer.Option("--step", help="Only this step's "
                                                        "outputs.")] = None,
          keep: Annotated[int, typer.Option(help="Newest outputs to keep per step.")] = 1,
          verbose: Verbose = False) -> None:
    """Remove published outputs (never raw data), keeping the newest --keep per step."""
    from trainpipe import config, housekeeping

    try:
        cfg = config.compose(overrides or [], config_dir)
        removed = housekeeping.clean(cfg, step_name, keep)
    except TrainpipeError as exc:
        _fail(exc, verbose)
    for url in removed:
        out.print(f"removed {redact_text(url)}", highlight=False)
    out.print(f"{len(removed)} output(s) removed")


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

    try:
        pipeline.select(*span)  # unknown step names are usage errors, before anything runs
        jobs = config.expand_sweeps(overrides) if multirun else [overrides]
        cfgs = [config.compose(job, config_dir) for job in jobs]
    except TrainpipeError as exc:
        _fail(exc, verbose)
    if print_cfg is not None:
        for job_cfg in cfgs:
            out.print(config.to_yaml(job_cfg), markup=False, highlight=False)
        return
    codes = []
    for i, (job, job_cfg) in enumerate(zip(jobs, cfgs, strict=True)):
        if multirun:
            out.rule(f"job {i + 1}/{len(jobs)}: {' '.join(job) or '(defaults)'}")
        codes.append(_run_one(job_cfg, job, span, force, verbose))
    if any(codes):
        raise typer.Exit(max(codes))


def _run_one(cfg, overrides, span, force, verbose) -> int:
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
            out.print(f"  {mark[r.status]} {r.name:<9} {r.seconds:6.2f}s  {r.summary}",
                      highlight=False, soft_wrap=True)

    result = pipeline.run(cfg, overrides, *span, force=force, on_step=on_step,
                          on_notice=lambda m: out.print(f"  [yellow]![/] {m}"))
    _summary(cfg, result)
    if result.error is not None:
        if isinstance(result.error, KeyboardInterrupt | Interrupted):
            err.print("[yellow]interrupted[/]: runs marked KILLED")
            return 130
        return _report_error(result.error, verbose)
    return 0


def _summary(cfg, result) -> None:
    from trainpipe.config import tracking_uri
    from trainpipe.redaction import redact_uri

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
            table.add_row(r.name, r.status, f"{r.seconds:.2f}", r.summary)
        out.print(table)
    for name, value in sorted(result.metrics.items()):
        if name.startswith("test_"):
            shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:.4f}"
            out.print(f"  {name:<30} {shown}", highlight=False)
    if result.run_id:
        out.print(f"  run id      {result.run_id}")
    if "trainpipe.model_uri" in result.tags:
        out.print(f"  model       {result.tags['trainpipe.model_uri']}")
    if result.made_by:
        out.print(f"  made by run {result.made_by}")
    # soft_wrap: a command to copy must stay on one line, whatever the terminal's width
    uri = redact_uri(tracking_uri(cfg))
    hint = f"open {uri}" if uri.startswith(("http://", "https://")) else (
        f"mlflow ui --backend-store-uri {uri}")
    out.print(f"  browse      {hint}", highlight=False, soft_wrap=True)


def _report_error(exc: BaseException, verbose: bool) -> int:
    if verbose or not isinstance(exc, TrainpipeError):
        import traceback

        err.print(redact_text("".join(traceback.format_exception(exc))), markup=False,
                  highlight=False)
    code = exc.exit_code if isinstance(exc, TrainpipeError) else 1
    kind = {2: "error", 3: "invalid data"}.get(code, "failed")
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


def _fail(exc: TrainpipeError, verbose: bool):
    raise typer.Exit(_report_error(exc, verbose))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    finally:
        # A run leaves millions of objects behind (MLflow, pandas, scikit-learn); freezing
        # them spares the collector's final pass over them at exit (about a second).
        gc.freeze()
