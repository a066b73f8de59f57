"""The run report: one self-contained HTML page per pipeline run (`report.html`).

The page is built from what MLflow recorded, and from nothing else: the pipeline's parent
run, its step runs (for a step reused from an earlier run, that run's step run), their
params, metrics, tags and artifacts. So the page the tracker logs at the end of a run and
the one `trainpipe report RUN_ID` writes later are built by the same code from the same
records.

Self-contained: the CSS is inline, the plots are base64 PNGs, there is no script and
nothing is fetched from elsewhere, so it works from a file and inside the MLflow UI (which
shows HTML artifacts inline).
"""

import base64
import functools
import html
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainpipe.errors import ConfigError
from trainpipe.redaction import redact_text, redact_uri

REPORT = "report.html"
# Recorded with a finished step's record (pipeline._publish) or at the end of the run
# (tracking.Tracking.write_report), read here:
SUMMARY = "trainpipe.summary"  # on a step run: its one line in the terminal
SECONDS = "trainpipe.seconds"  # on a step run and the parent: its time, as the pipeline
# measured it
ERROR = "trainpipe.error"  # on the parent run: why it failed or stopped
REUSED = "trainpipe.reused."  # + step, on the parent run: "fingerprint F, made by run R"
# on the parent run, without trainpipe.git_commit: why none (tracking._git_tags)
NO_COMMIT = "trainpipe.git_no_commit"
# The plots in the order the page shows them; any other PNG of the evaluate run follows.
PLOTS = ("roc_curve.png", "precision_recall_curve.png", "calibration.png",
         "confusion_matrix.png", "predicted_vs_actual.png", "residuals.png",
         "feature_importance.png")
COUNTS = ("tn", "fp", "fn", "tp")  # metrics that count rows
PRIMARY = {"binary": "roc_auc", "multiclass": "f1_score",
           "regression": "root_mean_squared_error"}


@dataclass
class StepView:
    name: str
    status: str  # FINISHED | FAILED | KILLED | RUNNING | CACHED | NOT RUN
    seconds: float | None = None
    summary: str = ""
    fingerprint: str = ""
    run_id: str | None = None  # its run under this pipeline run
    made_by: str | None = None  # reused: the pipeline run that made its output
    record: Any = None  # the step run whose records the page shows (its own or the maker's)
    elsewhere: bool = False  # reused, and this store does not hold the run that made it

    def not_here(self, what: str) -> str:
        """For a section whose records are those of a run the store does not hold: a note
        that says so (else "")."""
        if not self.elsewhere:
            return ""
        return (f"<p class=note>{e(self.name)} was reused: its output was made by run "
                f"{e(self.made_by)}, which is not in this tracking store (a run of another "
                f"store, or one deleted since), so this page cannot show {e(what)}; that "
                f"run's own page has it (trainpipe report {e(self.made_by)} "
                "tracking.uri=ITS_STORE)</p>")


@dataclass
class Record:
    """Everything the page shows, as MLflow has it."""

    run: Any  # mlflow.entities.Run of the parent
    status: str
    seconds: float
    steps: list[StepView]
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    sources: list[dict]
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (step, name) -> bytes
    config_yaml: str = ""
    environment: dict = field(default_factory=dict)
    changed: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    experiment: str = ""

    def step(self, name: str) -> StepView | None:
        return next((s for s in self.steps if s.name == name), None)

    def json(self, step: str, name: str) -> dict | None:
        data = self.files.get((step, name))
        return json.loads(data) if data is not None else None


# ------------------------------------------------------------------ reading MLflow


def step_tags(summary: str, seconds: float) -> dict[str, str]:
    """What a step run carries of what the terminal told: the page reads it back."""
    return {SUMMARY: summary, SECONDS: f"{seconds:.3f}"}


def build(client, run_id: str, status: str | None = None) -> bytes:
    """The page of pipeline run `run_id`. `status`: the state the run is about to end in
    (the tracker builds the page just before it ends the runs)."""
    return render(collect(client, run_id, status)).encode()


def collect(client, run_id: str, status: str | None = None) -> Record:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one per file
    parent = pipeline_run(client, run_id)
    tags = parent.data.tags
    final = status or parent.info.status
    steps = _step_views(client, parent, status)
    end = parent.info.end_time if status is None and parent.info.end_time else time.time() * 1000
    # the pipeline's own count when it made one: its run starts when the tracker gets to it
    seconds = float(tags.get(SECONDS) or (end - parent.info.start_time) / 1000)
    record = Record(parent, final, seconds, steps,
                    dict(parent.data.params), dict(parent.data.metrics), dict(tags),
                    _sources(parent))
    wanted = {"validate": ("validation_report.json",), "register": ("gate_report.json",),
              "evaluate": PLOTS}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Artifacts(client, tmp)
        for view in steps:
            if view.record is None or view.name not in wanted:
                continue
            present = artifacts.names(view.record)
            names = [n for n in wanted[view.name] if n in present]
            if view.name == "evaluate":  # any other plot, after the known ones
                names += sorted(n for n in present if n.endswith(".png") and n not in PLOTS)
            for name in names:
                record.files[view.name, name] = artifacts.read(view.record, name)
        present = artifacts.names(parent)
        if "config.yaml" in present:
            record.config_yaml = artifacts.read(parent, "config.yaml").decode()
        if "environment.json" in present:
            record.environment = json.loads(artifacts.read(parent, "environment.json"))
    record.changed = changed_from_defaults(record.params)
    record.experiment = client.get_experiment(parent.info.experiment_id).name
    return record


def _step_views(client, parent, status: str | None) -> list[StepView]:
    """Each step the run selected: its own run, the run that made its reused output, or
    none. `status`: the run's final state, which its open step runs are about to take."""
    tags = parent.data.tags
    children = _step_runs(client, parent)
    # pipeline run -> its step runs (None: the store does not hold it)
    makers: dict[str | None, dict[str, Any] | None] = {None: {}}
    views = []
    for name in [s for s in tags.get("trainpipe.steps", "").split(",") if s]:
        run = children.get(name)
        if run is not None:
            info, own = run.info, run.data.tags
            seconds = float(own[SECONDS]) if own.get(SECONDS) else (
                (info.end_time - info.start_time) / 1000 if info.end_time else None)
            views.append(StepView(
                name, status if status and info.status == "RUNNING" else info.status, seconds,
                own.get(SUMMARY, ""), own.get("trainpipe.fingerprint", ""), info.run_id,
                record=run))
        elif REUSED + name in tags:
            fingerprint, made_by = _reused(tags[REUSED + name])
            if made_by not in makers:
                makers[made_by] = _maker_steps(client, made_by)
            maker = makers[made_by]
            views.append(StepView(name, "CACHED", 0.0, "reused", fingerprint, made_by=made_by,
                                  record=(maker or {}).get(name), elsewhere=maker is None))
        else:
            views.append(StepView(name, "NOT RUN"))
    # A step that stores nothing (ingest) has no tag when reused; steps run in order, so one
    # without a run before a step that ran or was reused was reused too.
    for i, view in enumerate(views):
        if view.status == "NOT RUN" and any(v.status != "NOT RUN" for v in views[i + 1:]):
            view.status, view.seconds, view.summary = "CACHED", 0.0, "reused"
    return views


def pipeline_run(client, run_id: str):
    """The parent run of a pipeline run; a clear ConfigError for any other id."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no run {run_id!r} in the tracking store "
                          f"{redact_uri(client.tracking_uri)}") from None
    tags = run.data.tags
    if tags.get("trainpipe.kind") != "pipeline":
        parent = tags.get("mlflow.parentRunId")
        what = (f"the {tags['trainpipe.step']} step run of pipeline run {parent}; give that one"
                if parent and "trainpipe.step" in tags else "not a trainpipe pipeline run")
        raise ConfigError(f"run {run_id} is {what}")
    return run


def latest_run(client, experiment: str) -> str:
    """The id of the newest pipeline run in `experiment`."""
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id], "tags.`trainpipe.kind` = 'pipeline'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"no pipeline run in experiment {experiment!r} of "
                          f"{redact_uri(client.tracking_uri)}: run `trainpipe run` first, or "
                          "name the store (tracking.uri=..., tracking.experiment=...)")
    return runs[0].info.run_id


def _step_runs(client, parent) -> dict[str, Any]:
    """Step name -> step run of a pipeline run (the newest, should there be several)."""
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    return {r.data.tags["trainpipe.step"]: r for r in runs if "trainpipe.step" in r.data.tags}


def _maker_steps(client, run_id: str) -> dict[str, Any] | None:
    """The step runs of the pipeline run that made a reused output; None when the store does
    not hold that run (the lake's output was made by a run tracked in another store, or the
    run was deleted)."""
    from mlflow.exceptions import MlflowException

    try:
        return _step_runs(client, client.get_run(run_id))
    except MlflowException:
        return None


def _reused(tag: str) -> tuple[str, str | None]:
    """'fingerprint F, made by run R' -> (F, R)."""
    fingerprint, _, made_by = tag.partition(", made by run ")
    return fingerprint.removeprefix("fingerprint ").strip(), made_by.strip() or None


class Artifacts:
    """A run's artifacts, read straight from its artifact store (the client's download
    looks the run up again for every file)."""

    def __init__(self, client, folder: str):
        self.client, self.folder = client, folder

    def repository(self, run):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(run.info.artifact_uri,
                                       tracking_uri=self.client.tracking_uri)

    def names(self, run) -> set[str]:
        return {f.path for f in self.repository(run).list_artifacts() if not f.is_dir}

    def read(self, run, name: str) -> bytes:
        folder = Path(self.folder) / run.info.run_id
        folder.mkdir(exist_ok=True)
        return Path(self.repository(run).download_artifacts(name, str(folder))).read_bytes()


def _sources(run) -> list[dict]:
    """The run's dataset inputs: role, URI, sha256, bytes, format."""
    out = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        dataset = item.dataset
        try:
            source = json.loads(dataset.source)
            uri = source.get("uri") or source.get("url") or dataset.source
        except (ValueError, AttributeError):
            uri = dataset.source
        try:
            profile = json.loads(dataset.profile or "{}")
        except ValueError:
            profile = {}
        role = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        out.append({"role": role, "name": dataset.name, "uri": uri,
                    "sha256": profile.get("sha256", dataset.digest),
                    "bytes": profile.get("bytes"), "format": profile.get("format", "")})
    return out


def changed_from_defaults(params: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(key, this run's value, the default) for every recorded config value that differs
    from trainpipe's defaults. Not tracking.uri: its default is MLFLOW_TRACKING_URI where
    the page is built (the header names the run's store)."""
    defaults = default_params()
    keys = sorted((set(params) | set(defaults)) - {"tracking.uri"})
    return [(k, params.get(k), defaults.get(k)) for k in keys if params.get(k) != defaults.get(k)]


def default_params() -> dict[str, str]:
    """trainpipe's default config, as the params a run records. Composed once a process
    (the tracker does it while the pipeline runs: tracking.warm_up); Hydra composes one
    config at a time, so a caller that comes meanwhile waits for that one."""
    with _COMPOSING:
        return _default_params()


_COMPOSING = threading.Lock()


@functools.cache
def _default_params() -> dict[str, str]:
    from trainpipe import config
    from trainpipe.tracking import flat_params

    try:
        return dict(flat_params(config.compose([])))
    except ConfigError:  # the defaults do not compose here (a broken environment): no diff
        return {}


def location(artifact_uri: str) -> str:
    """Where the page of a run with this artifact URI is: a path for a store on this
    machine's disk, else the artifact URI."""
    if artifact_uri.startswith("file://"):
        artifact_uri = artifact_uri.removeprefix("file://")
    if artifact_uri.startswith("/"):
        return str(Path(artifact_uri) / REPORT)
    return f"{redact_uri(artifact_uri)}/{REPORT}"


def write(client, run_id: str | None, experiment: str, out: str | None) -> tuple[str, Path]:
    """`trainpipe report`: the page of `run_id` (default: the newest pipeline run of
    `experiment`) written to `out`, a file or a folder (default: ./report-<run id>.html);
    (run id, path)."""
    run_id = run_id or latest_run(client, experiment)
    page = build(client, run_id)
    name = f"report-{run_id[:12]}.html"
    path = Path(out or name)
    if path.is_dir() or (out or "").endswith("/"):  # a folder, maybe yet to be made
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(page)
    partial.replace(path)  # whole or not at all
    return run_id, path.absolute()


# ------------------------------------------------------------------ the page


def e(value: Any) -> str:
    """Text for the page: redacted (whatever a record holds), then escaped."""
    return html.escape(redact_text("" if value is None else str(value)))


def number(name: str, value: float | None) -> str:
    if value is None:
        return ""
    if name.rsplit("_", 1)[-1] in COUNTS and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def render(r: Record) -> str:
    task = r.params.get("dataset.task", "")
    title = f"{r.tags.get('trainpipe.dataset', '?')} · {r.tags.get('trainpipe.model', '?')}"
    body = [_header(r, title), _error(r), _steps(r), _validation(r), _split(r, task),
            _metrics(r, task), _plots(r), _lineage(r)]
    return PAGE.format(title=e(f"trainpipe {title} · {r.status} · run {r.run.info.run_id}"),
                       css=CSS, body="\n".join(b for b in body if b))


def _header(r: Record, title: str) -> str:
    info = r.run.info
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.start_time / 1000))
    facts = [("dataset", r.tags.get("trainpipe.dataset"), "dataset"),
             ("model", r.tags.get("trainpipe.model"), "model"),
             ("status", r.status, "status"), ("started", started, None),
             ("duration", duration(r.seconds), None),
             ("run id", info.run_id, "run-id"), ("run name", info.run_name, None),
             ("experiment", r.experiment, None), ("tracking", r.params.get("tracking.uri"),
                                                  None)]
    if "trainpipe.model_uri" in r.tags:
        facts.append(("model URI", r.tags["trainpipe.model_uri"], "model-uri"))
    if r.tags.get("trainpipe.registered_version"):
        facts.append(("registered", f"{r.tags.get('trainpipe.registered_model')} version "
                      f"{r.tags['trainpipe.registered_version']}", None))
    rows = "".join(f"<div><dt>{e(k)}</dt><dd{_data('fact', key)}>{e(v)}</dd></div>"
                   for k, v, key in facts if v)
    command, notes = reproduce(r)
    note = "".join(f"<p class=note>{e(n)}</p>" for n in notes)
    return (f"<header><h1>{e(title)} <span class='badge {e(r.status.lower())}'>"
            f"{e(r.status)}</span></h1><dl class=facts>{rows}</dl>"
            f"<p class=label>reproduce it</p><pre class=command>{e(command)}</pre>{note}"
            "</header>")


def reproduce(r: Record) -> tuple[str, list[str]]:
    """The command that makes this run again, and what it cannot say."""
    from trainpipe.config import CONF_DIR
    from trainpipe.pipeline import STEP_NAMES

    selected = [s.name for s in r.steps]
    scoring = r.params.get("dataset.scoring_source") not in (None, "", "None")
    every = [s for s in STEP_NAMES if s != "predict" or scoring]
    words = ["trainpipe", "run"]
    if len(selected) == 1 and len(every) > 1:
        words = ["trainpipe", "step", selected[0]]
    elif selected:
        if selected[0] != every[0]:
            words.append(f"--from {selected[0]}")
        if selected[-1] != every[-1]:
            words.append(f"--to {selected[-1]}")
    notes = []
    dataset = r.tags.get("trainpipe.dataset", "")
    if dataset and not (CONF_DIR / "dataset" / f"{dataset}.yaml").exists():
        words.append("--config-dir CONFIG_DIR")
        notes.append(f"CONFIG_DIR: the folder holding dataset/{dataset}.yaml (not recorded; "
                     "config.yaml below is the whole resolved config)")
    if r.tags.get("trainpipe.overrides"):
        words.append(r.tags["trainpipe.overrides"])
    command = " ".join(words)
    commit = r.tags.get("trainpipe.git_commit")
    if commit:
        command = f"git checkout {commit}\n{command}"
        if r.tags.get("trainpipe.git_dirty") == "true":
            notes.append("the checkout had uncommitted changes when this run was made")
    return command, notes


def _error(r: Record) -> str:
    if ERROR not in r.tags:
        return ""
    return (f"<section id=error><h2>Why it {'stopped' if r.status == 'KILLED' else 'failed'}"
            f"</h2><pre class=error>{e(r.tags[ERROR])}</pre></section>")


def _steps(r: Record) -> str:
    rows = []
    for s in r.steps:
        status = s.status.lower().replace(" ", "-")
        run = (f"<code class=id>{e(s.run_id)}</code>" if s.run_id else
               f"cached from run <code class=id>{e(s.made_by)}</code>" if s.made_by else "")
        if s.elsewhere:
            run += " (not in this tracking store)"
        rows.append(f"<tr{_data('step', s.name)}><td class=name>{e(s.name)}</td>"
                    f"<td><span class='badge {e(status)}'>{e(s.status)}</span></td>"
                    f"<td class=num>{e(duration(s.seconds))}</td><td>{e(s.summary)}</td>"
                    f"<td>{run}</td></tr>")
    return _section("steps", "Steps", _table(["step", "status", "time", "summary", "run"],
                                             rows, wide=True))


def _validation(r: Record) -> str:
    report = r.json("validate", "validation_report.json")
    view = r.step("validate")
    if report is None:
        if view is not None and view.elsewhere:
            return _section("validation", "Validation", view.not_here("its validation report"))
        said = ("validate did not run in this pipeline run" if view is None
                else f"no validation report recorded (validate: {view.status.lower()})")
        return _section("validation", "Validation", f"<p class=note>{e(said)}</p>")
    parts = []
    for role, src in report.get("sources", {}).items():
        parts.append(f"<p>{e(role)}: <code>{e(src.get('source'))}</code>, "
                     f"{src.get('rows', 0):,} rows</p>")
    if report.get("failures"):
        from trainpipe.steps.validate import FIRST_ROW, example_text

        rows = []
        # a report made before rows were numbered from FIRST_ROW numbered them from 0
        shift = FIRST_ROW - report.get("first_row", 0)
        for f in report["failures"]:
            examples = "; ".join(
                example_text(x | {"row": x["row"] + shift} if x.get("row") is not None else x)
                for x in f.get("examples", []))
            rows.append(f"<tr><td><code>{e(f.get('column') or '(table)')}</code></td>"
                        f"<td>{e(f.get('message'))}</td><td class=num>{f.get('rows', 0):,}</td>"
                        f"<td><code>{e(examples)}</code></td><td>{e(f.get('source'))}</td></tr>")
        verdict = (f"<p class='verdict failed'>FAILED: {len(report['failures'])} "
                   f"check(s) broken; nothing was published</p>")
        parts += [verdict, _table(["column", "check", "rows", "examples", "file"], rows),
                  "<p class=note>example rows are numbered from 1, the header line not "
                  "counted</p>"]
    else:
        parts.append("<p class='verdict passed'>passed: every row holds to the dataset's "
                     "contract</p>")
        for role, stats in report.get("statistics", {}).items():
            rows = []
            for col, s in stats.items():
                top = ", ".join(f"{k} ({v:,})" for k, v in list(s.get("distinct", {}).items())[:8])
                rows.append(f"<tr><td><code>{e(col)}</code></td><td class=num>{s['count']:,}</td>"
                            f"<td class=num>{s['nulls']:,}</td>"
                            + "".join(f"<td class=num>{e(_short(s.get(k)))}</td>"
                                      for k in ("min", "max", "mean"))
                            + f"<td>{e(top)}</td></tr>")
            table = _table(["column", "count", "nulls", "min", "max", "mean",
                            "values (rows)"], rows)
            parts.append(f"<details{' open' if role == 'train' else ''}><summary>column "
                         f"statistics ({e(role)})</summary>{table}</details>")
    if view is not None and view.made_by:
        parts.append(f"<p class=note>validate was reused: this is the report of run "
                     f"{e(view.made_by)}</p>")
    return _section("validation", "Validation", "".join(parts))


def _split(r: Record, task: str) -> str:
    view = r.step("split")
    if view is not None and view.elsewhere:
        return _section("split", "Split", view.not_here("the split's sizes"))
    if view is None or view.record is None:
        return ""
    metrics = view.record.data.metrics
    sizes = {s: metrics.get(f"rows_{s}") for s in ("train", "val", "test")}
    if not any(sizes.values()):
        return ""
    total = sum(v or 0 for v in sizes.values()) or 1
    rows = [f"<tr><td>{s}</td><td class=num{_data('split', s)}>{int(n or 0):,}</td>"
            f"<td class=num>{(n or 0) / total:.1%}</td></tr>" for s, n in sizes.items()]
    parts = [_table(["split", "rows", "share"], rows)]
    report = r.json("validate", "validation_report.json") or {}
    target = r.params.get("dataset.target")
    stats = report.get("statistics", {}).get("train", {}).get(target or "", {})
    if task != "regression" and stats.get("distinct"):
        counts = stats["distinct"]
        n = sum(counts.values()) or 1
        rows = [f"<tr><td><code>{e(k)}</code></td><td class=num>{v:,}</td>"
                f"<td class=num>{v / n:.1%}</td></tr>" for k, v in counts.items()]
        parts.append(f"<p>class balance of <code>{e(target)}</code> over all {n:,} rows; the "
                     "split is stratified, so each split has the same shares</p>"
                     + _table(["class", "rows", "share"], rows))
    elif stats:
        parts.append(f"<p>target <code>{e(target)}</code>: min {e(_short(stats.get('min')))}, "
                     f"mean {e(_short(stats.get('mean')))}, max {e(_short(stats.get('max')))}"
                     "</p>")
    seed = r.params.get("seed")
    if seed:
        parts.append(f"<p class=note>seed {e(seed)}; split.val_size "
                     f"{e(r.params.get('split.val_size'))}, split.test_size "
                     f"{e(r.params.get('split.test_size'))}</p>")
    return _section("split", "Split", "".join(parts))


def _metrics(r: Record, task: str) -> str:
    names = sorted({k.split("_", 1)[1] for k in r.metrics if k.startswith(("val_", "test_"))})
    gate = r.json("register", "gate_report.json")
    register = r.step("register")
    away = register.not_here("the registry gate's report") if register else ""
    if not names and gate is None and not away:
        return ""
    primary = PRIMARY.get(task)
    names.sort(key=lambda n: (n != primary, COUNTS.index(n) + 1 if n in COUNTS else 0, n))
    champion = ((gate or {}).get("scores") or {}).get("champion") or {}
    headers = ["metric", "val", "test"]
    if champion:
        headers.append(f"champion version {gate.get('champion_before')}, test")
    rows = []
    for name in names:
        cells = [f"<td{_data('metric', f'{split}_{name}')} class=num>"
                 f"{e(number(name, r.metrics.get(f'{split}_{name}')))}</td>"
                 for split in ("val", "test")]
        if champion:
            value = champion.get(f"test_{name}")
            cells.append(f"<td{_data('metric', f'champion_test_{name}')} class=num>"
                         f"{e(number(name, value))}</td>")
        mark = " class=primary" if name == primary else ""
        rows.append(f"<tr{mark}><td>{e(name)}</td>{''.join(cells)}</tr>")
    parts = [_table(headers, rows)] if rows else []
    if gate is not None:
        verdict = str(gate.get("decision", ""))
        reasons = "".join(f"<li>{e(x)}</li>" for x in gate.get("reasons", []))
        parts.append(f"<h3>Registry gate</h3><p class='verdict {e(verdict)}'"
                     f"{_data('gate', verdict)}>{e(verdict.upper())}: {e(gate.get('line'))}</p>"
                     f"<ul>{reasons}</ul><p class=note>{e(gate.get('name'))} version "
                     f"{e(gate.get('version'))}; champion before: "
                     f"{e(gate.get('champion_before') or 'none')}, after: "
                     f"{e(gate.get('champion_after') or 'none')}; both scored on the same "
                     f"{gate.get('test_rows', 0):,} test rows</p>")
    return _section("metrics", "Metrics", "".join(parts) + away)


def _plots(r: Record) -> str:
    figures = []
    for (step, name), data in r.files.items():
        if step != "evaluate" or not name.endswith(".png"):
            continue
        label = name.removesuffix(".png").replace("_", " ")
        figures.append(f"<figure><img alt='{e(label)}' src='data:image/png;base64,"
                       f"{base64.b64encode(data).decode()}'><figcaption>{e(name)}"
                       "</figcaption></figure>")
    if not figures:
        view = r.step("evaluate")
        if view is None or view.status in ("NOT RUN", "FAILED", "KILLED"):
            return ""  # the steps table says why
        if view.elsewhere:
            return _section("plots", "Plots", view.not_here("its plots"))
        return _section("plots", "Plots", f"<p class=note>no plots recorded (evaluate: "
                        f"{e(view.status.lower())}; evaluate.plots="
                        f"{e(r.params.get('evaluate.plots'))})</p>")
    return _section("plots", "Plots", f"<div class=plots>{''.join(figures)}</div>")


def _lineage(r: Record) -> str:
    parts = []
    if r.sources:
        rows = [f"<tr><td>{e(s['role'])}</td><td><code>{e(s['uri'])}</code></td>"
                f"<td><code>{e(s['sha256'])}</code></td>"
                f"<td class=num>{e(_count(s['bytes']))}</td><td>{e(s['format'])}</td></tr>"
                for s in r.sources]
        parts.append("<h3>Data</h3>" + _table(["role", "source", "sha256", "bytes", "format"],
                                              rows))
    rows = [f"<tr><td>{e(s.name)}</td><td><code>{e(s.fingerprint)}</code></td>"
            f"<td>{e(('made by run ' + s.made_by) if s.made_by else s.status.lower())}</td></tr>"
            for s in r.steps if s.fingerprint]
    if rows:
        parts.append("<h3>Step fingerprints</h3>" + _table(["step", "fingerprint", "output"],
                                                           rows))
    code = [("trainpipe", r.tags.get("trainpipe.version")), ("git commit", _commit(r.tags)),
            ("python", r.environment.get("python")), ("platform", r.environment.get("platform"))]
    code += sorted((p, v or "not installed")
                   for p, v in r.environment.get("packages", {}).items())
    parts.append("<h3>Code and packages</h3>" + _table(
        ["", "version"], [f"<tr><td>{e(k)}</td><td><code>{e(v)}</code></td></tr>"
                          for k, v in code if v]))
    overrides = r.tags.get("trainpipe.overrides") or "(none)"
    rows = [f"<tr><td><code>{e(k)}</code></td><td><code>{e(v if v is not None else '-')}"
            f"</code></td><td><code>{e(d if d is not None else '-')}</code></td></tr>"
            for k, v, d in r.changed]
    parts.append(f"<h3>Config</h3><p>overrides: <code>{e(overrides)}</code></p>")
    parts.append(_table(["value that differs from the defaults", "this run", "default"], rows)
                 if rows else "<p>every recorded config value is trainpipe's default</p>")
    if r.config_yaml:
        parts.append(f"<details><summary>config.yaml (the resolved config)</summary>"
                     f"<pre>{e(r.config_yaml)}</pre></details>")
    return _section("lineage", "Lineage", "".join(parts))


def _commit(tags: dict[str, str]) -> str:
    """The run's git commit, or that none was recorded and why, when the run says why
    (tracking._git_tags: not a git checkout, no commit yet, no git, git's error)."""
    if "trainpipe.git_commit" in tags:
        dirty = tags.get("trainpipe.git_dirty") == "true"
        return tags["trainpipe.git_commit"] + (" (uncommitted changes)" if dirty else "")
    why = tags.get(NO_COMMIT)
    return f"no git commit recorded ({why})" if why else "no git commit recorded"


def _section(key: str, title: str, content: str) -> str:
    return f"<section id={key}><h2>{e(title)}</h2>{content}</section>"


def _table(headers: list[str], rows: list[str], wide: bool = False) -> str:
    """A table; `wide`: as wide as the page (for columns of text)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return (f"<table{' class=wide' if wide else ''}><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _data(kind: str, key: str | None) -> str:
    """A machine-readable mark (data-metric="test_roc_auc"): what tests read on the page."""
    return f" data-{kind}='{e(key)}'" if key else ""


def _count(value) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) else ""


def _short(value) -> str:
    """A number as a reader wants it in a table: 31.46, not 31.45544968775453."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.5g}"
    return str(value)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body><main>
{body}
<footer>made by trainpipe from the records of this run in MLflow</footer>
</main></body></html>
"""

CSS = """
:root { color-scheme: light; --fg: #1d2330; --muted: #5b6475; --line: #dde2ea;
  --bg: #f6f7f9; --ok: #1f7a3a; --bad: #b3261e; --warn: #8a5a00; --info: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 40px; }
header, section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 18px; margin: 0 0 14px; }
h1 { font-size: 22px; margin: 0 0 10px; }
h2 { font-size: 17px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12.5px; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; word-break: break-all;
  margin: 4px 0; }
pre.error { border-color: var(--bad); color: var(--bad); }
dl.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
  gap: 6px 18px; margin: 0 0 10px; }
dl.facts dt { color: var(--muted); font-size: 12px; }
dl.facts dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
dl.facts div { min-width: 0; }
.label { color: var(--muted); font-size: 12px; margin: 6px 0 0; }
.note { color: var(--muted); font-size: 12.5px; margin: 6px 0; }
table { border-collapse: collapse; margin: 6px 0; min-width: 40%; }
table.wide { width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; overflow-wrap: anywhere; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.primary td { font-weight: 700; }
td.name, code.id { white-space: nowrap; }
.badge { white-space: nowrap; display: inline-block; padding: 1px 8px; border-radius: 10px;
  font-size: 12px; font-weight: 700; vertical-align: middle; background: #e8ebf0;
  color: var(--muted); }
.badge.finished { background: #dcf1e2; color: var(--ok); }
.badge.failed { background: #fbe0dd; color: var(--bad); }
.badge.killed, .badge.running { background: #fdf0d5; color: var(--warn); }
.badge.cached { background: #dfeaf8; color: var(--info); }
.verdict { font-weight: 700; }
.verdict.passed { color: var(--ok); }
.verdict.failed { color: var(--bad); }
details { margin: 6px 0; }
summary { cursor: pointer; color: var(--info); }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 14px; }
figure { margin: 0; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 12px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"""
