"""The command line: `trainpipe run`, `trainpipe step NAME`, `trainpipe data demo`.

Exit codes: 0 success, 1 unexpected error, 2 usage or config error (also a missing or
unreadable source), 3 data validation failed, 130 interrupted.
"""

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from trainpipe.errors import ConfigError, Interrupted, TrainpipeError
from trainpipe.redaction import redact_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Raw tabular data in a lake to a validated, tracked model.")
data_app = typer.Typer(no_args_is_help=True, help="Data helpers.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(
    help="Hydra overrides, e.g. model=lightgbm seed=7 dataset.source=s3://b/raw.csv")]
Multirun = Annotated[bool, typer.Option("-m", "--multirun", help="Sweep: seed=1,2,3 runs 3 jobs.")]
PrintCfg = Annotated[str | None, typer.Option("--cfg", help="Print the resolved config "
                                              "('job') and exit.")]
ConfigDir = Annotated[str | None, typer.Option("--config-dir", help="A folder of your own "
                                               "config (e.g. dataset/mine.yaml).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks for every error.")]


@app.command()
def run(overrides: Overrides = None, multirun: Multirun = False, cfg: PrintCfg = None,
        config_dir: ConfigDir = None, verbose: Verbose = False) -> None:
    """Run the whole pipeline: ingest, validate, split, features, train, evaluate."""
    _execute(None, overrides or [], multirun, cfg, config_dir, verbose)


@app.command()
def step(name: Annotated[str, typer.Argument(help="ingest | validate | split | features | "
                                             "train | evaluate")],
         overrides: Overrides = None, multirun: Multirun = False, cfg: PrintCfg = None,
         config_dir: ConfigDir = None, verbose: Verbose = False) -> None:
    """Run one step alone, reading its inputs from the lake."""
    _execute(name, overrides or [], multirun, cfg, config_dir, verbose)


@data_app.command("demo")
def data_demo(rows: Annotated[int, typer.Option(help="Number of rows.")] = 20_000,
              out_url: Annotated[str, typer.Option("--out", help="Where to write the CSV "
                                                   "(any fsspec URL).")] = "demo/train.csv",
              seed: Annotated[int, typer.Option(help="Random seed.")] = 0) -> None:
    """Write synthetic hotel-booking data (the shape of the real hotel data)."""
    from trainpipe import demo, lake

    df = demo.hotel_bookings(rows=rows, seed=seed)
    lake.write_file(out_url, df.to_csv(index=False).encode())
    out.print(f"wrote {len(df):,} rows to {out_url}")


def _execute(only, overrides, multirun, print_cfg, config_dir, verbose) -> None:
    from trainpipe import config

    try:
        if only is not None and only not in _step_names():
            raise ConfigError(f"unknown step {only!r}; steps: {', '.join(_step_names())}")
        overrides = config.split_overrides(overrides)
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
        codes.append(_run_one(job_cfg, job, only, verbose))
    if any(codes):
        raise typer.Exit(max(codes))


def _run_one(cfg, overrides, only, verbose) -> int:
    from trainpipe import pipeline

    lake, tracking = redact_text(str(cfg.lake.root)), redact_text(str(cfg.tracking.uri))
    out.print(f"[bold]trainpipe[/] {cfg.dataset.name} · {cfg.model.name} · lake {lake} · "
              f"tracking {tracking}", highlight=False)

    def on_step(r: pipeline.StepResult) -> None:
        if r.status == "running":
            out.print(f"  [cyan]▶[/] {r.name} ...", highlight=False)
        else:
            mark = {"done": "[green]✓[/]", "failed": "[red]✗[/]", "killed": "[yellow]■[/]"}
            out.print(f"  {mark[r.status]} {r.name:<9} {r.seconds:6.2f}s  {r.summary}",
                      highlight=False)

    result = pipeline.run(cfg, overrides, only, on_step=on_step,
                          on_notice=lambda m: out.print(f"  [yellow]![/] {m}"))
    _summary(cfg, result)
    if result.error is not None:
        if isinstance(result.error, KeyboardInterrupt | Interrupted):
            err.print("[yellow]interrupted[/]: runs marked KILLED")
            return 130
        return _report_error(result.error, verbose)
    return 0


def _summary(cfg, result) -> None:
    from trainpipe.tracking import normalise_uri, ui_hint

    table = Table(title="summary", show_edge=False, title_justify="left")
    for col in ("step", "status", "seconds", "result"):
        table.add_column(col)
    for r in result.steps:
        table.add_row(r.name, r.status, f"{r.seconds:.2f}", r.summary)
    out.print(table)
    for name, value in sorted(result.metrics.items()):
        out.print(f"  {name:<30} {value:.4f}")
    if result.run_id:
        out.print(f"  run id      {result.run_id}")
    if "trainpipe.model_uri" in result.tags:
        out.print(f"  model       {result.tags['trainpipe.model_uri']}")
    out.print(f"  browse      {ui_hint(normalise_uri(str(cfg.tracking.uri)))}", highlight=False)


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


def _fail(exc: TrainpipeError, verbose: bool):
    raise typer.Exit(_report_error(exc, verbose))


def _step_names() -> tuple[str, ...]:
    from trainpipe.pipeline import STEP_NAMES

    return STEP_NAMES


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
