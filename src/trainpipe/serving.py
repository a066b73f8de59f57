"""A logged model outside the pipeline: score a file (`trainpipe predict`), or serve the
model over HTTP (`trainpipe serve`).

MODEL is any MLflow model URI: `models:/<name>@<alias>`, `models:/<name>/<version>`,
`models:/m-...` (a run's `trainpipe.model_uri` tag) or `runs:/<run id>/<path>`. The default
is the champion of the dataset's registered model, `models:/<registry name>@champion`. An
alias is pinned to its version when the command starts, and that version is what the
predictions name and what the server serves.

`predict_file` reads its input in chunks (CSV chunks, Parquet batches), never whole: each
chunk is held to the dataset's contract by the validate step's own checks (row numbers
count from the file's first data row), scored with the step's `score`, and appended to a
local file that is published at the output URL in one move or upload once every row has
passed. Invalid data stops it with the validation report (exit 3) and nothing at the output.

`serve` runs MLflow's scoring server (the app `mlflow models serve` runs, see
scoring_app.py) as a process supervised by trainpipe.supervise, until Ctrl-C or SIGTERM.
"""

import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from trainpipe import lake, supervise
from trainpipe.errors import ConfigError, DataValidationError, Interrupted
from trainpipe.redaction import redact_text, redact_uri
from trainpipe.steps import Report
from trainpipe.steps.predict import CHUNK_ROWS, input_columns, score

CHAMPION = "champion"
OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SERVE_TIMEOUT = 300  # seconds for the server to load the model and answer /ping


def default_model(cfg: DictConfig) -> str:
    """`models:/<registry name>@champion`: `registry.name` when the config has it, else the
    dataset's name."""
    name = OmegaConf.select(cfg, "registry.name", default=None) or cfg.dataset.name
    return f"models:/{name}@{CHAMPION}"


@dataclass(frozen=True)
class Model:
    uri: str  # as given
    version: str  # what makes the predictions: an alias pinned to `models:/<name>/<version>`
    flavors: tuple[str, ...]


def resolve(uri: str | None, cfg: DictConfig) -> Model:
    """The model at `uri` (None: the default) in the current tracking store, from its MLmodel
    file; ConfigError naming the URI when there is no such model."""
    from mlflow import MlflowClient
    from mlflow.models import Model as MlflowModel

    given = uri is not None
    uri = uri if given else default_model(cfg)
    version = uri
    try:
        if uri.startswith("models:/") and "@" in uri:
            name, alias = uri[len("models:/"):].rsplit("@", 1)
            found = MlflowClient().get_model_version_by_alias(name, alias)
            version = f"models:/{name}/{found.version}"
        meta = MlflowModel.load(version)
    except Exception as exc:  # noqa: BLE001 - whatever MLflow says: no such model, bad URI
        message = redact_text(" ".join(str(getattr(exc, "message", exc)).split())[:300])
        what = (f"--model {uri}" if given else f"the default model {uri} (the {CHAMPION} of "
                f"the registered model {uri[len('models:/'):].rsplit('@', 1)[0]!r})")
        raise ConfigError(f"{what}: no such model in the tracking store "
                          f"{redact_uri(str(cfg.tracking.uri))} ({message}); pass --model "
                          "with a model URI, e.g. the trainpipe.model_uri tag of a pipeline "
                          "run (models:/m-...)") from None
    return Model(uri, version, tuple(meta.flavors))


def _load_estimator(model: Model):
    """The scikit-learn pipeline behind a model: it gives probabilities, pyfunc does not."""
    import mlflow.sklearn

    if "sklearn" not in model.flavors:
        raise ConfigError(f"--model {model.uri}: not a scikit-learn model (flavors: "
                          f"{', '.join(model.flavors)}); trainpipe predict scores the models "
                          "trainpipe trains")
    return mlflow.sklearn.load_model(model.version)


# ------------------------------------------------------------------------ trainpipe predict


@dataclass(frozen=True)
class Scored:
    run_id: str
    model: Model
    input: lake.LocalFile
    output: str
    rows: int
    seconds: float


def output_format(url: str) -> str:
    suffix = os.path.splitext(url.rsplit("?", 1)[0].lower())[1]
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {redact_uri(url)}: name a .csv or .parquet file (the "
                          "format follows the name)")
    return OUTPUT_FORMATS[suffix]


def predict_file(cfg: DictConfig, model_uri: str | None, input_url: str, output_url: str,
                 chunk_rows: int | None = None) -> Scored:
    """Score the file at `input_url` with the model, write the predictions to `output_url`,
    record it all as an MLflow run (tag `trainpipe.kind=predict`)."""
    from trainpipe.pipeline import sigterm_interrupts
    from trainpipe.tracking import Tracking

    out_format = output_format(output_url)
    tracking = Tracking(cfg)  # an unreachable server stops us here
    model = resolve(model_uri, cfg)
    estimator = _load_estimator(model)
    _check_inputs(cfg.dataset, model, estimator)
    shown_input, shown_output = redact_uri(lake.absolute(input_url)), redact_uri(
        lake.absolute(output_url))
    with sigterm_interrupts(), lake.local_file(input_url) as source:
        tags = {"trainpipe.kind": "predict", "trainpipe.dataset": cfg.dataset.name,
                "trainpipe.model_uri": model.uri, "trainpipe.model_version": model.version}
        with tracking.command_run(f"predict-{cfg.dataset.name}", tags) as run_id:
            tracking.log_sources(run_id, cfg, {"scoring": source.describe()})
            tracking.record(run_id, Report(params={
                "input": shown_input, "output": shown_output, "model": model.uri,
                "model_version": model.version, "input_format": source.format,
                "output_format": out_format}))
            start = time.perf_counter()
            try:
                with lake.staged_file(output_url) as local:
                    rows = _score_file(cfg, estimator, model.version, source, local,
                                       out_format, chunk_rows or CHUNK_ROWS)
            except DataValidationError as exc:
                if exc.report is not None:
                    tracking.record(run_id, exc.report)
                    exc.add_note(f"full report: {tracking.artifact_uri(run_id)}/"
                                 + ", ".join(exc.report.artifacts))
                raise
            seconds = time.perf_counter() - start
            tracking.record(run_id, Report(metrics={
                "rows": rows, "seconds": seconds,
                "rows_per_second": rows / seconds if seconds else 0.0}))
    return Scored(run_id, model, source, shown_output, rows, seconds)


def _check_inputs(dataset: DictConfig, model: Model, estimator) -> None:
    """The model must read only columns the dataset's contract describes (else it is
    another dataset's model)."""
    missing = [c for c in input_columns(estimator) if c not in dataset.columns]
    if missing:
        raise ConfigError(f"--model {model.uri}: it reads columns the dataset "
                          f"{dataset.name!r} does not have: {missing}; is it a model of "
                          "another dataset? (choose the dataset with dataset=NAME)")


def _score_file(cfg: DictConfig, estimator, version: str, source: lake.LocalFile, path: str,
                out_format: str, chunk_rows: int) -> int:
    """Validate and score the input chunk by chunk into the local file `path`; the number of
    rows, or DataValidationError with the report once the whole input is checked."""
    name = redact_uri(lake.absolute(source.url))
    from trainpipe.steps.validate import ChunkedValidation

    validation = ChunkedValidation(cfg, name, lambda column: (
        chunk[column] for chunk in _read_chunks(source, cfg.dataset, chunk_rows, [column])))
    with _Writer(path, out_format) as writer:
        for chunk in _read_chunks(source, cfg.dataset, chunk_rows):
            validated = validation.check(chunk)
            if validated is not None and not validation.failures:  # past a failure: check only
                writer.write(score(estimator, validated, cfg.dataset, version))
    failures = validation.finish()
    if failures:
        from trainpipe.steps import validate

        report = {"dataset": cfg.dataset.name, "valid": False, "failures": failures,
                  "sources": {"scoring": {"source": name, "digest": source.digest,
                                          "rows": validation.rows}},
                  "statistics": {}}
        artifacts = {"validation_report.json": json.dumps(report, indent=2,
                                                          default=str).encode(),
                     "validation_report.md": validate.to_markdown(report).encode()}
        raise DataValidationError(validate.to_terminal(failures),
                                  report=Report(artifacts=artifacts))
    return validation.rows


class _Writer:
    """Predictions appended chunk by chunk to a local Parquet (one row group per chunk) or
    CSV file."""

    def __init__(self, path: str, out_format: str):
        self.path, self.format = path, out_format
        self._parquet = None
        self._csv = None

    def write(self, df: pd.DataFrame) -> None:
        if self.format == "csv":
            if self._csv is None:
                self._csv = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
                df.to_csv(self._csv, index=False)
            else:
                df.to_csv(self._csv, index=False, header=False)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._parquet is None:
            table = pa.Table.from_pandas(df, preserve_index=False)
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        else:
            table = pa.Table.from_pandas(df, schema=self._parquet.schema,
                                         preserve_index=False)
        self._parquet.write_table(table)

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc) -> None:
        for handle in (self._parquet, self._csv):
            if handle is not None:
                handle.close()


def _read_chunks(source: lake.LocalFile, dataset: DictConfig, rows: int,
                 columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """The file's rows (or some of its columns), `rows` at a time, indexed by their row number
    in the file; parsed as ingest parses a whole file."""
    name = redact_uri(lake.absolute(source.url))
    if source.format == "parquet":
        yield from _parquet_chunks(source.path, name, rows, columns)
    else:
        yield from _csv_chunks(source.path, name, dataset, rows, columns)


def _parquet_chunks(path: str, name: str, rows: int,
                    columns: list[str] | None) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    from trainpipe.errors import SourceError

    offset = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns,
                                                    use_pandas_metadata=True)
        for batch in batches:
            df = batch.to_pandas()
            df.index = pd.RangeIndex(offset, offset + len(df))
            offset += len(df)
            yield df
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"{name}: not a readable Parquet file ({exc})") from None


def _csv_chunks(path: str, name: str, dataset: DictConfig, rows: int,
                columns: list[str] | None) -> Iterator[pd.DataFrame]:
    from trainpipe.steps.ingest import TEXT_CSV, _ragged

    try:
        # As ingest reads a whole file: every cell as its text (validate parses it);
        # utf-8-sig: a byte-order mark must not become part of the first column's name.
        reader = pd.read_csv(path, chunksize=rows, encoding="utf-8-sig", usecols=columns,
                             **TEXT_CSV)
        with reader:
            for i, df in enumerate(reader):
                if i == 0:
                    _check_delimiter(df, name)
                yield df
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{name}: the file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataValidationError(f"{name}: not a well-formed CSV file: {_ragged(exc)}"
                                  ) from None
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"{name}: line {_first_bad_utf8_line(path)}: bytes that are not UTF-8 "
            f"({exc.reason}); save the file as UTF-8") from None


def _check_delimiter(df: pd.DataFrame, name: str) -> None:
    if df.shape[1] != 1:
        return
    header = str(df.columns[0])
    for sep in (";", "\t", "|"):
        if sep in header:
            raise DataValidationError(
                f"{name}: line 1 has no commas but {header.count(sep)} {sep!r}: the file "
                f"seems to be {sep!r}-delimited; trainpipe reads comma-separated CSV")


def _first_bad_utf8_line(path: str) -> int:
    """The line holding the file's first byte that is not UTF-8 (read in blocks)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while block := f.read(lake.BLOCK):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return line + block[:exc.start].count(b"\n")
            line += block.count(b"\n")
    return line


# -------------------------------------------------------------------------- trainpipe serve


@dataclass(frozen=True)
class Server:
    url: str  # where clients reach it
    model: Model
    process: supervise.Process
    log: str
    example: str  # a ready-to-paste curl command scoring one row


def serve(cfg: DictConfig, model_uri: str | None, host: str, port: int,
          on_ready: Callable[[Server], None], timeout: float = SERVE_TIMEOUT) -> None:
    """Run MLflow's scoring server for the model on host:port until Ctrl-C or SIGTERM, then
    stop it (its whole process group). `on_ready` is called once it answers /ping."""
    import mlflow
    from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH  # where its app looks

    from trainpipe.config import tracking_uri
    from trainpipe.pipeline import sigterm_interrupts
    from trainpipe.tracking import quiet_mlflow

    uri = tracking_uri(cfg)
    supervise.check_tracking_server(uri)
    quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    model = resolve(model_uri, cfg)
    if not supervise.port_free(port):
        raise supervise.ServiceError(f"port {port} is in use; choose another with --port")
    folder = Path(".trainpipe/serve")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"server-{port}.log"
    # The tracking URI (perhaps with a password) goes in the environment, not the command.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, _SERVER_MODEL_PATH: model.version}
    # As `mlflow models serve --env-manager local` runs it, but for the CSV reading
    # (scoring_app.py).
    cmd = [sys.executable, "-m", "uvicorn", "--host", host, "--port", str(port),
           "trainpipe.scoring_app:app"]
    base = f"http://{_client_host(host)}:{port}"
    with sigterm_interrupts():
        process = supervise.start(cmd, env=env, cwd=os.getcwd(), log=log,
                                  banner=redact_text(f"trainpipe serve {model.version}"))
        try:
            example = _curl_example(model, base)
            supervise.wait_until_healthy(process, f"{base}/ping", timeout, "the model server")
            on_ready(Server(base, model, process, str(log), example))
            while supervise.alive(process):
                time.sleep(0.5)
            raise supervise.ServiceError(f"the model server stopped{supervise.log_tail(log)}")
        except (KeyboardInterrupt, Interrupted):
            pass  # how a server is meant to stop
        finally:
            supervise.stop(process, 15)


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _curl_example(model: Model, base: str) -> str:
    """A curl command scoring the first row of the model's input example."""
    payload = {"dataframe_split": _example_row(model)}
    return (f"curl -s {base}/invocations -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(payload, allow_nan=False))}")


def _example_row(model: Model) -> dict:
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = _download(model.version, "serving_input_example.json", tmp)
            split = json.loads(Path(path).read_text())["dataframe_split"]
        # MLflow writes a missing value as NaN, which strict JSON parsers reject: null
        row = [None if isinstance(v, float) and not math.isfinite(v) else v
               for v in split["data"][0]]
        return {"columns": split["columns"], "data": [row]}
    except Exception:  # noqa: BLE001 - a model without an example: its columns, values to fill
        from mlflow.models import Model as MlflowModel

        signature = MlflowModel.load(model.version).signature
        columns = signature.inputs.input_names() if signature else []
        return {"columns": columns, "data": [[None] * len(columns)]}


def _download(uri: str, file: str, folder: str) -> str:
    if uri.startswith("models:/"):
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        return ModelsArtifactRepository(uri).download_artifacts(file, dst_path=folder)
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{file}",
                                               dst_path=folder)
