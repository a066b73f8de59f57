"""What the run report says where a run recorded less or otherwise: why no git commit was
recorded, example rows of older validation reports, steps reused from a run the store does
not hold. Quick: the parts of the page are made from hand-made records, no pipeline runs."""

import subprocess

import pytest

from trainpipe import report
from trainpipe.tracking import _git_tags


def lineage(tags: dict[str, str]) -> str:
    record = report.Record(None, "FINISHED", 1.0, [], {}, {}, tags, [])
    return report._lineage(record)


def git_row(tags: dict[str, str]) -> str:
    """The text of the page's "git commit" row."""
    page = lineage(tags)
    return page.split("<td>git commit</td><td><code>", 1)[1].split("</code>", 1)[0]


def commit_all(folder) -> None:
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                                  "--allow-empty", "-m", "first"]):
        subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


def test_a_checkout_records_its_commit(tmp_path, monkeypatch):
    commit_all(tmp_path)
    monkeypatch.chdir(tmp_path)
    tags = _git_tags()
    assert len(tags["trainpipe.git_commit"]) == 40 and tags["trainpipe.git_dirty"] == "false"
    assert "trainpipe.git_no_commit" not in tags
    assert git_row(tags) == tags["trainpipe.git_commit"]
    assert git_row(tags | {"trainpipe.git_dirty": "true"}).endswith(" (uncommitted changes)")


FAKE_GIT = """#!/bin/sh
echo "fatal: detected dubious ownership in repository at '$PWD'" >&2
echo "To add an exception for this directory, call:" >&2
exit 128
"""


@pytest.mark.parametrize("case,said", [
    ("not a checkout", "the working folder was not a git checkout"),
    ("no commit yet", "the git checkout had no commit yet"),
    ("no git", "git was not found"),
    ("git fails", "git failed: detected dubious ownership in repository at '{folder}'"),
])
def test_without_a_commit_the_run_says_why(case, said, tmp_path, monkeypatch):
    """The report said "not run from a git checkout" whenever no commit was recorded, also
    when the folder was a checkout and git was missing or failed."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    if case == "no commit yet":
        subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    if case in ("no git", "git fails"):
        commit_all(folder)  # a checkout, but git cannot tell
        bin_ = tmp_path / "bin"
        bin_.mkdir()
        if case == "git fails":
            (bin_ / "git").write_text(FAKE_GIT)
            (bin_ / "git").chmod(0o755)
        monkeypatch.setenv("PATH", str(bin_))
    tags = _git_tags()
    said = said.format(folder=folder)
    assert tags == {"trainpipe.git_no_commit": said}
    assert git_row(tags) == f"no git commit recorded ({said})".replace("'", "&#x27;")


def test_a_run_recorded_before_the_reason_says_only_that_there_is_no_commit():
    assert git_row({}) == "no git commit recorded"


def validation_section(report_json: dict) -> str:
    import json

    record = report.Record(None, "FAILED", 1.0, [report.StepView("validate", "FAILED")], {}, {},
                           {}, [], files={("validate", "validation_report.json"):
                                          json.dumps(report_json).encode()})
    return " ".join(report._validation(record).split())


FAILURE = {"source": "train.csv", "column": "arrival_month", "check": "less_than(13)",
           "rows": 1, "message": "less_than(13)", "examples": [{"row": 5, "value": 13}]}


def test_example_rows_are_numbered_from_one_also_in_reports_made_before():
    """Reports record example rows from 1 (first_row: 1); one recorded before, from 0 (no
    first_row), is shown numbered from 1 too."""
    now = validation_section({"first_row": 1, "failures": [FAILURE]})
    before = validation_section({"failures": [FAILURE]})
    assert "row 5: 13" in now and "row 6: 13" in before
    for section in (now, before):
        assert "example rows are numbered from 1, the header line not counted" in section


def test_a_step_reused_from_a_run_the_store_does_not_hold_says_so_in_its_section():
    """Its sections said "no validation report recorded" (validate) or nothing at all
    (split), as if the step had recorded nothing."""
    steps = [report.StepView(name, "CACHED", 0.0, "reused", "f", made_by="abc123",
                             elsewhere=True) for name in ("validate", "split")]
    record = report.Record(None, "FINISHED", 1.0, steps, {}, {}, {}, [])
    for section, name, what in ((report._validation(record), "validate",
                                 "its validation report"),
                                (report._split(record, "binary"), "split", "the split's sizes")):
        assert (f"{name} was reused: its output was made by run abc123, which is not in this "
                "tracking store (a run of another store, or one deleted since), so this page "
                f"cannot show {what}; that run's own page has it (trainpipe report abc123 "
                "tracking.uri=ITS_STORE)") in " ".join(section.split()).replace("&#x27;", "'")
    assert "cached from run <code class=id>abc123</code> (not in this tracking store)" in (
        report._steps(record))
