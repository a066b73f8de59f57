"""The run report: every pipeline run logs one self-contained report.html on its parent run
and says where it is; `trainpipe report` writes the page of any run; the plots say what they
show. The browser test opens the page of a real run in headless Chromium."""

import html
import io
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from tests.conftest import FAST, compose, trainpipe
from tests.test_interrupts import FAILING_FIT
from tests.test_steps import run_through
from trainpipe import demo

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# ------------------------------------------------------------------ helpers


class Marks(HTMLParser):
    """The page's machine-readable marks (data-metric="test_roc_auc" -> its text), its
    outside references and its scripts."""

    def __init__(self, page: str):
        super().__init__()
        self.marks: dict[str, dict[str, str]] = {}
        self.references: list[str] = []  # src/href values
        self.tags: set[str] = set()
        self._open: list[tuple[str, str, str, list[str]]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "action", "poster") and value is not None:
                self.references.append(value)
            if name.startswith("data-") and tag not in ("img", "br", "meta"):
                self._open.append((tag, name, value or "", []))

    def handle_data(self, data):
        for *_, text in self._open:
            text.append(data)

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            _, name, value, text = self._open.pop()
            self.marks.setdefault(name, {})[value] = " ".join(" ".join(text).split())
            for *_, outer in self._open:
                outer.extend(text)


def pipeline_run_of(workdir: Path, run_id: str | None = None, experiment: str = "trainpipe"):
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    if run_id is None:
        [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                   "tags.`trainpipe.kind` = 'pipeline'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        run_id = run.info.run_id
    return client, client.get_run(run_id)


def step_runs(client, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.data.tags["trainpipe.step"]: r for r in runs}


def logged_page(client, run) -> str:
    return Path(client.download_artifacts(run.info.run_id, "report.html")).read_text()


def printed_report(stdout: str) -> Path:
    [line] = [line for line in stdout.splitlines() if line.strip().startswith("report ")]
    return Path(line.split(None, 1)[1])


def shown(page: str) -> str:
    """The page's text, tags dropped: what a reader sees, for asserting on words."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def assert_self_contained(page: str) -> None:
    marks = Marks(page)
    assert not {"script", "link", "iframe", "object", "embed"} & marks.tags
    outside = [r for r in marks.references if not r.startswith(("data:", "#"))]
    assert outside == []
    assert "url(" not in page and "@import" not in page  # no CSS fetches either


@pytest.fixture
def finished(finished_lake):
    """A real run of the whole pipeline on demo data (`trainpipe run *FAST`): its folder,
    what it printed, a client of its store and its parent run."""
    client, parent = pipeline_run_of(finished_lake.folder)
    assert parent.info.run_id == finished_lake.run_id
    return finished_lake.folder, finished_lake.stdout, client, parent


# ------------------------------------------------------------------ the page of a run


def test_every_run_logs_its_report_and_prints_where_it_is(finished):
    workdir, stdout, client, parent = finished
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "report.html" in artifacts
    path = printed_report(stdout)
    assert path == Path(parent.info.artifact_uri) / "report.html"
    page = path.read_text()
    assert page == logged_page(client, parent)
    assert_self_contained(page)
    text = shown(page)
    assert "hotel_bookings · random_forest FINISHED" in text
    assert f"run id {parent.info.run_id}" in text
    assert "trainpipe run model.params.n_estimators=20" in text  # the command to reproduce it


def test_the_page_shows_what_mlflow_recorded(finished):
    workdir, stdout, client, parent = finished
    page = logged_page(client, parent)
    marks = Marks(page).marks
    steps = step_runs(client, parent)

    # steps: each FINISHED, with the time and summary the terminal showed
    assert set(marks["data-step"]) == set(steps) == {
        "ingest", "validate", "split", "features", "train", "evaluate", "register"}
    for name, row in marks["data-step"].items():
        assert row.startswith(f"{name} FINISHED"), row
        assert steps[name].data.tags["trainpipe.summary"] in row
    seconds = float(steps["features"].data.tags["trainpipe.seconds"])
    told = re.search(r"features +([\d.]+)s +19 features", stdout)
    assert abs(float(told[1]) - seconds) < 0.006  # the time the terminal showed

    # validation passed, with per-column statistics
    text = shown(page)
    assert "passed: every row holds to the dataset's contract" in text
    assert re.search(r"lead_time 3,000 0 \d+ \d+ [\d.]+ ", text)

    # split sizes and class balance
    split = steps["split"].data.metrics
    assert {k: int(v.replace(",", "")) for k, v in marks["data-split"].items()} == {
        "train": split["rows_train"], "val": split["rows_val"], "test": split["rows_test"]}
    assert "class balance of booking_status over all 3,000 rows" in text

    # val and test metrics side by side, as MLflow has them
    metrics = parent.data.metrics
    shown_metrics = marks["data-metric"]
    assert {k for k in shown_metrics} == {k for k in metrics if k.startswith(("val_", "test_"))}
    for name, value in shown_metrics.items():
        if name.endswith(("_tn", "_fp", "_fn", "_tp")):
            assert int(value.replace(",", "")) == metrics[name]
        else:
            assert abs(float(value) - metrics[name]) <= 5e-5, name

    # the gate's decision (the first version: no champion)
    assert marks["data-gate"]["passed"].startswith("PASSED: promoted version 1 to champion")

    # plots, inline, each a PNG
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 5

    # lineage: the source and its digest, every step's fingerprint, the changed config
    [source] = parent.inputs.dataset_inputs
    assert source.dataset.digest in page and str(workdir / "lake/raw/hotel_bookings") in text
    for run in steps.values():
        assert run.data.tags["trainpipe.fingerprint"] in page
    assert "model.params.n_estimators 20 200" in text
    assert "mlflow 3." in text and "scikit-learn" in text


def test_trainpipe_report_writes_the_same_page(finished):
    workdir, _, client, parent = finished
    result = trainpipe("report", cwd=workdir)  # the newest run
    assert result.returncode == 0, result.stderr
    written = Path(result.stdout.strip())
    assert written == workdir / f"report-{parent.info.run_id[:12]}.html"
    assert f"report of pipeline run {parent.info.run_id}" in result.stderr
    # one builder: the logged page and the one built later differ only in the duration
    # (the tracker builds the page while the run ends)
    def without_duration(page: str) -> str:
        return re.sub(r"<dt>duration</dt><dd>[^<]*</dd>", "", page)

    assert without_duration(written.read_text()) == without_duration(
        logged_page(client, parent))

    out = workdir / "pages" / "first.html"
    again = trainpipe("report", parent.info.run_id, f"--out={out}", cwd=workdir)
    assert again.returncode == 0 and again.stdout.strip() == str(out)
    assert without_duration(out.read_text()) == without_duration(written.read_text())
    into = trainpipe("report", "--out", "more/", cwd=workdir)  # a folder, made for it
    assert into.stdout.strip() == str(workdir / "more" / written.name)


def test_trainpipe_report_names_what_is_wrong(finished, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from trainpipe.cli import app

    def report(*args: str, cwd: Path):
        monkeypatch.chdir(cwd)
        result = CliRunner().invoke(app, ["report", *args])
        assert "Traceback" not in result.stdout + result.stderr
        return result.exit_code, " ".join(result.stderr.split())

    workdir, _, client, parent = finished
    code, said = report("0123456789abcdef", cwd=workdir)
    assert code == 2
    assert "error: no run '0123456789abcdef' in the tracking store sqlite:///mlflow.db" in said
    train = step_runs(client, parent)["train"].info.run_id
    code, said = report(train, cwd=workdir)
    assert code == 2
    assert (f"error: run {train} is the train step run of pipeline run {parent.info.run_id}; "
            "give that one") in said
    code, said = report("tracking.experiment=nothing_here", cwd=workdir)
    assert code == 2 and "error: no pipeline run in experiment 'nothing_here'" in said
    code, said = report("one", "two", cwd=workdir)
    assert code == 2 and "error: expected one RUN_ID, then overrides (key=value); got one two" \
        in said
    code, said = report(cwd=tmp_path)  # no store here: none is created
    assert code == 2 and f"error: no MLflow store at {tmp_path / 'mlflow.db'}" in said
    assert not (tmp_path / "mlflow.db").exists()


def test_a_run_that_reuses_steps_says_which_run_made_them(finished):
    workdir, _, _, first = finished
    # another experiment, so "the newest run" of the other tests stays the same
    result = trainpipe("run", *FAST, "model.params.max_depth=8", "tracking.experiment=again",
                       cwd=workdir)
    assert result.returncode == 0, result.stderr
    client, parent = pipeline_run_of(workdir, experiment="again")
    page = logged_page(client, parent)
    steps = Marks(page).marks["data-step"]
    made_by = first.info.run_id
    assert steps["ingest"].startswith("ingest CACHED")  # stores nothing: its readers reused
    for name in ("validate", "split", "features"):
        assert steps[name].startswith(f"{name} CACHED"), steps[name]
        assert f"cached from run {made_by}" in steps[name]
    for name in ("train", "evaluate", "register"):
        assert steps[name].startswith(f"{name} FINISHED")
    text = shown(page)
    # the validation report and split sizes of the run that made them
    assert f"validate was reused: this is the report of run {made_by}" in text
    assert "passed: every row holds to the dataset's contract" in text
    assert set(Marks(page).marks["data-split"]) == {"train", "val", "test"}
    assert "model.params.max_depth 8 15" in text
    assert "trainpipe run model.params.n_estimators=20 model.params.max_depth=8 " \
           "tracking.experiment=again" in text


def test_a_run_in_another_store_says_what_it_cannot_show_of_reused_steps(finished):
    """The lake's outputs were made by a run of one store; a run tracked in another store
    reuses them. Its page says, where the records of the run that made them would be, that
    this store does not hold that run (it said "no validation report recorded (validate:
    cached)" and left the split out)."""
    workdir, _, _, first = finished
    result = trainpipe("run", *FAST, "tracking.uri=sqlite:///other.db", cwd=workdir)
    assert result.returncode == 0, result.stderr
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'other.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("trainpipe").experiment_id],
                                  "tags.`trainpipe.kind` = 'pipeline'")
    page = logged_page(client, parent)
    made_by = first.info.run_id
    steps = Marks(page).marks["data-step"]
    for name in ("validate", "split", "features"):
        assert steps[name].startswith(f"{name} CACHED"), steps[name]
        assert f"cached from run {made_by} (not in this tracking store)" in steps[name]
    text = shown(page)
    said = (f"{{}} was reused: its output was made by run {made_by}, which is not in this "
            "tracking store (a run of another store, or one deleted since), so this page "
            f"cannot show {{}}; that run's own page has it (trainpipe report {made_by} "
            "tracking.uri=ITS_STORE)")
    assert said.format("validate", "its validation report") in text
    assert said.format("split", "the split's sizes") in text
    assert "no validation report recorded" not in text
    # what its own steps made is there
    assert "data-metric" in page and "data:image/png;base64," in page


def test_a_run_stopped_by_validation_has_a_page_with_the_failures(workdir, monkeypatch):
    secret = "s3cr3t-in-a-cell-0042"
    df = demo.hotel_bookings(rows=500, seed=3)
    df["no_of_adults"] = df["no_of_adults"].astype(object)
    df.loc[[7, 9], "no_of_adults"] = 99
    df.loc[11, "no_of_adults"] = secret  # a credential in the data never reaches the page
    source = workdir / "bad.csv"
    df.to_csv(source, index=False)
    result = trainpipe("run", f"dataset.source={source}", cwd=workdir,
                       env={"AWS_SECRET_ACCESS_KEY": secret})
    assert result.returncode == 3, result.stderr
    page = printed_report(result.stdout).read_text()
    assert secret not in page
    assert_self_contained(page)
    text = shown(page)
    assert "hotel_bookings · random_forest FAILED" in text
    assert ("Why it failed data validation failed (rows numbered from 1, the header line not "
            "counted):") in text
    assert "FAILED: 2 check(s) broken; nothing was published" in text
    # rows as a user counts them in the file (the frame's 7, 9 and 11)
    assert re.search(r"no_of_adults less_than_or_equal_to\(10\) 2 row 8: 99; row 10: 99", text)
    assert re.search(r"no_of_adults values of the wrong type \(int\) 1 row 12: '\*\*\*'", text)
    assert "example rows are numbered from 1, the header line not counted" in text
    steps = Marks(page).marks["data-step"]
    assert steps["ingest"].startswith("ingest FINISHED")
    assert steps["validate"].startswith("validate FAILED")
    for name in ("split", "features", "train", "evaluate", "register"):
        assert steps[name].startswith(f"{name} NOT RUN")
    client, parent = pipeline_run_of(workdir)
    assert parent.info.status == "FAILED" and logged_page(client, parent) == page


def test_a_failed_step_is_on_the_page_with_its_error(demo_lake):
    result = subprocess.run([sys.executable, "-c", FAILING_FIT, "run", *FAST], cwd=demo_lake,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1
    page = printed_report(result.stdout).read_text()
    text = shown(page)
    assert "Why it failed MemoryError: the fit ran out of memory" in text
    steps = Marks(page).marks["data-step"]
    assert steps["train"].startswith("train FAILED")
    assert steps["features"].startswith("features FINISHED")
    assert "data-metric" not in page  # evaluate never ran


# trainpipe with one change, in every process (the tracker builds the page): it cannot draw
BROKEN_PAGE = """
import trainpipe.report
def render(record):
    raise RuntimeError("the page cannot be drawn [here]")
trainpipe.report.render = render
"""


def test_a_page_that_cannot_be_made_is_said_and_the_run_stands(demo_lake):
    hook = demo_lake / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BROKEN_PAGE)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    result = trainpipe("run", "--to", "validate", cwd=demo_lake, env={"PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    assert ("! report.html not written: RuntimeError: the page cannot be drawn [here]"
            in result.stdout)
    client, parent = pipeline_run_of(demo_lake)
    assert parent.info.status == "FINISHED"
    assert "report.html" not in {a.path for a in client.list_artifacts(parent.info.run_id)}


# ------------------------------------------------------------------ the plots


def png_title(png: bytes) -> str:
    image = Image.open(io.BytesIO(png))
    assert image.width >= 600 and image.height >= 360  # large enough to read
    return image.info["Title"]


def test_classification_plots_are_titled_with_model_dataset_and_split(tmp_path):
    path = tmp_path / "train.csv"
    demo.hotel_bookings(rows=2000, seed=3).to_csv(path, index=False)
    _, report = run_through(compose(f"dataset.source={path}", *FAST), "evaluate")
    titles = {name: png_title(png) for name, png in report.artifacts.items()}
    about = "random_forest · hotel_bookings · test split (300 rows)"
    assert titles == {
        "roc_curve.png": f"ROC curve · {about}",
        "precision_recall_curve.png": f"Precision-recall curve · {about}",
        "calibration.png": f"Calibration · {about}",
        "confusion_matrix.png": f"Confusion matrix · {about}",
        "feature_importance.png": "Feature importance (19 features) · random_forest · "
                                  "hotel_bookings"}


@pytest.mark.parametrize("task,plots", [
    ("multiclass", {"roc_curve.png", "precision_recall_curve.png", "calibration.png",
                    "confusion_matrix.png", "feature_importance.png"}),
    ("regression", {"predicted_vs_actual.png", "residuals.png", "feature_importance.png"}),
])
def test_plots_of_other_tasks(task, plots, task_config):
    cfg = compose(f"dataset=toy_{task}", "model=logistic_regression" if task != "regression"
                  else "model=lightgbm", config_dir=task_config(task))
    _, report = run_through(cfg, "evaluate")
    assert set(report.artifacts) == plots
    model = "logistic_regression" if task != "regression" else "lightgbm"
    for name, png in report.artifacts.items():
        assert f"{model} · toy_{task}" in png_title(png), name


PLOTS_ALONE = """
import sys
import numpy as np
from sklearn.linear_model import LogisticRegression
from trainpipe.steps import evaluate
rng = np.random.default_rng(0)
x = rng.normal(size=(200, 3)); y = (x[:, 0] > 0).astype(int)
model = LogisticRegression().fit(x, y)
proba = model.predict_proba(x)
plots = evaluate._plots("binary", model, y, model.predict(x), proba, 1, "m · d", "test")
assert len(plots) == 5
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""


def test_plots_are_drawn_without_pyplot():
    result = subprocess.run([sys.executable, "-c", PLOTS_ALONE], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ in a real browser


@pytest.fixture(scope="module")
def chromium():
    from tests import browser

    if browser.CHROMIUM is None:
        reason = "no chromium on PATH (Debian: apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    with browser.Chromium() as running:
        yield running


@pytest.mark.slow
def test_the_page_in_headless_chromium(finished, chromium, tmp_path):
    from tests.browser import outside

    _, stdout, client, parent = finished
    page = chromium.open(printed_report(stdout).as_uri())
    assert outside(page.requests) == []  # the page asks nothing of the network
    assert page.console == [] and page.errors == []
    (tmp_path / "report.png").write_bytes(page.screenshot)
    shot = Image.open(io.BytesIO(page.screenshot))
    assert shot.width == 1280 and shot.height > 3000  # the whole page, every section
    assert len(page.images) == 5
    for image in page.images:
        assert image["loaded"] and image["width"] >= 600, image

    # the key numbers as the browser shows them are MLflow's
    assert page.marks("data-fact")["run-id"] == parent.info.run_id
    assert page.marks("data-fact")["status"] == "FINISHED"
    for name, value in parent.data.metrics.items():
        seen = page.marks("data-metric")[name]
        assert abs(float(seen.replace(",", "")) - value) <= 5e-5, (name, seen, value)
    split = step_runs(client, parent)["split"].data.metrics
    for name, rows in page.marks("data-split").items():
        assert int(rows.replace(",", "")) == split[f"rows_{name}"]
    assert "Why it failed" not in page.text and "Registry gate".upper() in page.text.upper()


def test_the_browser_check_sees_requests_and_console_errors(chromium, tmp_path):
    """The checks above can fail: a page that fetches from elsewhere and logs an error."""
    from tests.browser import outside

    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><img src='http://127.0.0.1:9/x.png'>"
                   "<script>console.error('boom')</script></body></html>")
    page = chromium.open(bad.as_uri())
    assert outside(page.requests) == ["http://127.0.0.1:9/x.png"]
    assert any("boom" in line for line in page.console)
