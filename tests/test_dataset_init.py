"""`trainpipe dataset init`: a dataset file inferred from a table validates that table, and
`trainpipe run` trains on it without an edit; guesses carry `check:` comments; YAML's traps
are quoted; a large file is sampled; a file a person edited is never overwritten silently."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from tests.conftest import FAST, HOTEL, task_table, trainpipe
from trainpipe import dataset_init
from trainpipe.cli import app

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def generated_table(task: str, rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """conftest's task table (nulls, a date, a bool, a constant text) with what a real
    export holds besides: a text id with leading zeros, codes with leading zeros, date-times,
    booleans with gaps, YAML's words as values, numbers as text, integer codes, an int
    column with gaps."""
    rng = np.random.default_rng(seed + 1)
    df = task_table(task, rows, seed).drop(columns=["key"])
    df.insert(0, "customer_id", [f"{i:06d}" for i in range(1, rows + 1)])
    df["zip"] = rng.choice(["01234", "02139", "10001"], rows)
    visited = pd.Timestamp("2024-03-01 08:00") + pd.to_timedelta(
        rng.integers(0, 10**6, rows), unit="min")
    df["visited_at"] = visited.where(rng.random(rows) > 0.05)
    df["newsletter"] = pd.Series(rng.random(rows) < 0.5, dtype=object).where(
        rng.random(rows) > 0.1)
    df["answer"] = pd.Series(rng.choice(["yes", "no", "on", "off"], rows)).where(
        rng.random(rows) > 0.1)
    df["grade"] = rng.choice(["1", "2", "3", "A"], rows)
    df["room_type"] = rng.integers(0, 5, rows)
    df["nights"] = pd.Series(rng.integers(1, 15, rows), dtype="Int64").where(
        rng.random(rows) > 0.1)
    df["label"] = df.pop("label")  # the target last, as in most exports
    return df


def init(folder: Path, *args: str):
    """`trainpipe dataset init ARGS --out folder/conf`, in-process."""
    return CliRunner().invoke(app, ["dataset", "init", *args, "--out", str(folder / "conf")])


def written(folder: Path, name: str):
    path = folder / "conf" / "dataset" / f"{name}.yaml"
    return path.read_text(), OmegaConf.load(path)


@pytest.mark.parametrize("table", ["hotel", "binary", "multiclass", "regression",
                                   "multiclass-parquet"])
def test_init_then_run_trains_on_the_file_without_an_edit(workdir, table):
    if table == "hotel":
        if not (HOTEL / "train.csv").exists():
            pytest.skip(f"the shared hotel data is not at {HOTEL}")
        source = HOTEL / "train.csv"
    else:
        task, _, kind = table.partition("-")
        source = workdir / f"{task}.{kind or 'csv'}"
        df = generated_table(task)
        df.to_parquet(source) if kind else df.to_csv(source, index=False)
    name = table.replace("-", "_")
    result = trainpipe("dataset", "init", str(source), "--name", name, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"then: trainpipe run --config-dir conf dataset={name}" in result.stdout
    result = trainpipe("run", "--config-dir", "conf", f"dataset={name}", *FAST, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "test_" in result.stdout and "models:/" in result.stdout


def test_the_hotel_file_is_what_a_person_would_write(workdir):
    if not (HOTEL / "train.csv").exists():
        pytest.skip(f"the shared hotel data is not at {HOTEL}")
    result = init(workdir, str(HOTEL / "train.csv"), "--name", "hotel")
    assert result.exit_code == 0, result.output
    text, ds = written(workdir, "hotel")
    assert (ds.target, ds.task, ds.id_column) == ("booking_status", "binary", "id")
    assert "positive_class" not in ds  # 0/1 labels: 1 is the positive class
    assert ds.columns.booking_status == {"type": "int", "values": [0, 1]}
    assert ds.columns.id == {"type": "int", "unique": True}
    coded = {c for c, spec in ds.columns.items() if spec.get("kind") == "categorical"}
    assert coded == {"type_of_meal_plan", "room_type_reserved", "market_segment_type"}
    assert ds.columns.required_car_parking_space == {"type": "int", "values": [0, 1]}
    assert ds.columns.avg_price_per_room == {"type": "float", "min": 0.0, "max": 600.0}
    assert ds.columns.lead_time == {"type": "int", "min": 0, "max": 490}  # 0..443, +10%
    assert "# Inferred from all 42,100 rows in" in text
    for guess in ("target: booking_status", "task: binary", "id_column: id",
                  "market_segment_type:"):
        line = next(line for line in text.splitlines() if line.startswith(("  " + guess, guess)))
        assert "# check:" in line, line
    assert "check target: guessed: the last column" in result.stdout


def test_each_column_is_written_as_trainpipe_reads_it(workdir):
    generated_table("binary").to_csv(workdir / "bookings.csv", index=False)
    result = init(workdir, str(workdir / "bookings.csv"))
    assert result.exit_code == 0, result.output
    text, ds = written(workdir, "bookings")  # the name: the file's
    assert (ds.name, ds.source) == ("bookings", str(workdir / "bookings.csv"))
    assert (ds.target, ds.task, ds.positive_class, ds.id_column) == (
        "label", "binary", "yes", "customer_id")
    columns = OmegaConf.to_container(ds.columns)
    assert columns["customer_id"] == {"type": "str", "unique": True}  # text: '000001'
    assert columns["zip"] == {"type": "str"}  # leading zeros: no values trainpipe would not see
    assert columns["colour"] == {"type": "str", "values": ["blue", "green", "red"]}
    assert columns["answer"] == {"type": "str", "nullable": True,
                                 "values": ["no", "off", "on", "yes"]}  # strings, not booleans
    assert columns["grade"] == {"type": "str", "values": ["1", "2", "3", "A"]}
    # type bool reads a missing value as True: booleans with gaps are text
    assert columns["newsletter"] == {"type": "str", "nullable": True,
                                     "values": ["False", "True"]}
    assert columns["member"] == {"type": "bool"}
    assert columns["booked"] == {"type": "datetime", "nullable": True}
    assert columns["visited_at"] == {"type": "datetime", "nullable": True}
    assert columns["nights"] == {"type": "int", "nullable": True, "min": 0, "max": 16}
    assert columns["x2"] == {"type": "int", "min": 0, "max": 54}  # 0..49 widened by 4.9
    assert columns["weight"]["nullable"] is True and columns["weight"]["type"] == "float"
    assert columns["room_type"]["kind"] == "categorical"
    assert columns["notes"]["kind"] == "drop"  # one value throughout
    assert columns["label"] == {"type": "str", "values": ["no", "yes"]}
    assert "\npositive_class: \"yes\"" in text and '"no", "off", "on", "yes"' in text
    checks = dict(re.findall(r"^ *([\w\"]+): .*# check: (.*)$", text, re.M))
    assert set(checks) == {"task", "target", "positive_class", "id_column", "customer_id",
                           "zip", "notes", "newsletter", "room_type"}
    assert "leading zeros ('02139')" in checks["zip"]
    assert "check positive_class: the label recall, precision and ROC are about" in (
        result.stdout)


def test_yaml_that_would_be_misread_is_quoted():
    """Every text reads back as the same text through OmegaConf (which Hydra uses)."""
    traps = ["yes", "No", "ON", "off", "y", "n", "true", "null", "~", "007", "1e3", "1.5",
             ".inf", "nan", "2024-01-01", "", " padded ", "a: b", "- item", "#hash", "[x]",
             "{x}", "${oc.env:HOME}", "it's", 'say "hi"', "back\\slash", "line\nbreak",
             "tab\tstop", "üñí", "@at", "%p", "*star", "&amp", "!tag", "|pipe", ">gt", "`x`"]
    doc = "".join(f"{dataset_init._yaml(t, key=True)}: {dataset_init._yaml([t, 1, 2.5e-07])}\n"
                  for t in traps)
    loaded = OmegaConf.to_container(OmegaConf.create(doc), resolve=True)
    assert loaded == {t: [t, 1, 2.5e-07] for t in traps}


def test_ranges_are_widened_by_the_stated_margin(workdir):
    pd.DataFrame({"count": [0, 50, 100], "delta": [-50, 0, 50], "ratio": [1.0, 1.5, 2.0],
                  "year": [2018, 2018, 2018], "y": [0, 1, 0]}).to_csv(workdir / "t.csv",
                                                                   index=False)
    result = init(workdir, str(workdir / "t.csv"))
    assert result.exit_code == 0, result.output
    text, ds = written(workdir, "t")
    assert (ds.columns["count"].min, ds.columns["count"].max) == (0, 110)  # not below 0
    assert (ds.columns.delta.min, ds.columns.delta.max) == (-60, 60)
    assert (ds.columns.ratio.min, ds.columns.ratio.max) == (0.9, 2.1)
    assert "widened by 10% of its width on each side" in text


def test_a_large_file_is_sampled_and_the_rest_never_read(workdir):
    rows = dataset_init.SAMPLE_ROWS + 50
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"id": np.arange(rows), "x": rng.normal(size=rows),
                       "note": ['a "quoted"\nline break'] * rows, "y": rng.integers(0, 2, rows)})
    df.to_csv(workdir / "big.csv", index=False)
    with open(workdir / "big.csv", "ab") as f:  # past the sample: what a parser would refuse
        f.write(b"\xff\xfe not UTF-8,and,too,many,fields\n")
    result = init(workdir, str(workdir / "big.csv"))
    assert result.exit_code == 0, result.output
    text, ds = written(workdir, "big")
    assert "# Inferred from the first 100,000 rows in" in text
    assert "if the file is sorted, later rows may differ" in text
    assert ds.columns.note["values"] == ['a "quoted"\nline break']  # records over line ends

    df.to_parquet(workdir / "big.parquet", row_group_size=30_000)
    result = init(workdir, str(workdir / "big.parquet"), "--name", "bigp")
    assert result.exit_code == 0, result.output
    assert "# Inferred from the first 100,000 rows (of 100,050) in" in written(workdir, "bigp")[0]
    assert dataset_init.read_sample(str(workdir / "big.parquet"), rows=70_000).df.shape == (
        70_000, 4)


def test_a_file_a_person_edited_is_not_overwritten(workdir):
    generated_table("multiclass").to_csv(workdir / "m.csv", index=False)
    path = workdir / "conf" / "dataset" / "m.yaml"
    assert init(workdir, str(workdir / "m.csv")).exit_code == 0
    first = path.read_text()
    result = init(workdir, str(workdir / "m.csv"))  # untouched: rewritten
    assert result.exit_code == 0 and result.stdout.startswith("rewrote")
    assert path.read_text() == first

    edited = first.replace("kind: categorical}", "kind: numeric}")
    path.write_text(edited)
    result = init(workdir, str(workdir / "m.csv"))
    assert result.exit_code == 2
    assert (f"error: {path}: exists and was edited since `trainpipe dataset init` wrote it; "
            "not overwritten (--force replaces it") in " ".join(result.stderr.split())
    assert path.read_text() == edited and "Traceback" not in result.output

    path.write_text("name: mine\n")  # written by hand
    result = init(workdir, str(workdir / "m.csv"))
    assert result.exit_code == 2 and "not written by `trainpipe dataset init`" in result.stderr
    assert path.read_text() == "name: mine\n"
    result = init(workdir, str(workdir / "m.csv"), "--force")
    assert result.exit_code == 0 and path.read_text() == first


def test_dates_trainpipe_cannot_read_safely_are_text(workdir):
    rows = 40
    pd.DataFrame({
        "iso": ["2024-01-31", "2024-02-01"] * (rows // 2),
        "zoned": ["2024-01-31T10:00:00+02:00", "2024-02-01T08:00:00Z"] * (rows // 2),
        "mixed": ["2024-01-31", "2024-02-01 10:30"] * (rows // 2),  # both ISO 8601: fine
        "dmy": ["31/01/2024", "01/02/2024"] * (rows // 2),  # day or month first?
        "y": [0, 1] * (rows // 2)}).to_csv(workdir / "d.csv", index=False)
    result = init(workdir, str(workdir / "d.csv"))
    assert result.exit_code == 0, result.output
    _, ds = written(workdir, "d")
    assert [ds.columns[c].type for c in ("iso", "zoned", "mixed", "dmy")] == [
        "datetime", "datetime", "datetime", "str"]
    out = " ".join(result.stdout.split())
    assert "check columns.dmy: dates not in ISO 8601 (e.g. '31/01/2024')" in out


@pytest.mark.parametrize("table,args,task,target,guess", [
    ({"a": [1, 2, 3, 4] * 10, "outcome": [0.5, 1.5, 2.5, 3.7] * 10}, [], "regression",
     "outcome", "named 'outcome'"),
    ({"a": [1, 2, 3, 4, 5] * 8, "grade": [1, 2, 3, 4, 5] * 8}, [], "multiclass", "grade",
     "the last column"),
    ({"a": [1, 2, 3, 4, 5] * 8, "grade": [1, 2, 3, 4, 5] * 8}, ["--task", "regression"],
     "regression", "grade", None),
    ({"churned": ["no", "no", "no", "gone"] * 10, "b": [1.0, 2.0, 3.0, 4.5] * 10},
     ["--target", "churned"], "binary", "churned", None),
])
def test_the_target_and_the_task_are_guessed_unless_given(workdir, table, args, task, target,
                                                         guess):
    pd.DataFrame(table).to_csv(workdir / "t.csv", index=False)
    result = init(workdir, str(workdir / "t.csv"), *args)
    assert result.exit_code == 0, result.output
    text, ds = written(workdir, "t")
    assert (ds.task, ds.target) == (task, target)
    assert ("# check: guessed from the target's" in text) == ("--task" not in args)
    if guess:
        assert f"# check: guessed: {guess}" in text
    if target == "churned":  # labels that are not 0/1: the rarer one, to check
        assert ds.positive_class == "gone" and "guessed: the rarer one" in text


def test_data_breaking_trainpipes_rules_is_reported_and_the_file_kept(workdir):
    pd.DataFrame({"x": [1.5, np.inf, 2.0, 3.0], "empty": [None] * 4,
                  "label": ["a", None, "b", "a"]}).to_csv(workdir / "bad.csv", index=False)
    result = init(workdir, str(workdir / "bad.csv"))
    assert result.exit_code == 3
    message = " ".join(result.stderr.split())
    assert ("invalid data: the table breaks the dataset file as written, and `trainpipe run` "
            "would stop at validation:") in message
    for words in ("x · finite · 1 row · e.g. row 2: inf", "empty · every value is missing",
                  "label · missing values (the target needs a value in every row) · 1 row"):
        assert words in message
    assert (workdir / "conf" / "dataset" / "bad.yaml").exists()
    assert "Traceback" not in result.output


def bad(folder: Path, name: str, content: bytes | None = None) -> str:
    if content is not None:
        (folder / name).write_bytes(content)
    return str(folder / name)


THREE_CLASSES = b"a,label\n1,x\n2,y\n3,z\n"
BAD_INPUTS = [
    ("missing source", lambda f: [bad(f, "nope.csv")], 2, ["nope.csv: no such file"]),
    ("JSON", lambda f: [bad(f, "t.json", b'[{"a": 1}]')], 2,
     ["t.json: neither CSV nor Parquet (it looks like JSON)"]),
    ("unknown target", lambda f: [bad(f, "t.csv", THREE_CLASSES), "--target", "lable"], 2,
     ["--target 'lable' is not a column of the table (did you mean 'label'?)"]),
    ("binary with 3 classes", lambda f: [bad(f, "t.csv", THREE_CLASSES), "--task", "binary"], 2,
     ["--task binary: the target 'label' has 3 values in the sampled rows ('x', 'y', 'z'); "
      "a binary target has 2"]),
    ("regression on text", lambda f: [bad(f, "t.csv", THREE_CLASSES), "--task", "regression"],
     2, ["--task regression: the target 'label' holds no numbers"]),
    ("unknown task", lambda f: [bad(f, "t.csv", THREE_CLASSES), "--task", "ranking"], 2,
     ["--task 'ranking' is not one of binary, multiclass, regression"]),
    ("name not plain", lambda f: [bad(f, "t.csv", THREE_CLASSES), "--name", "../up"], 2,
     ["--name '../up': must be a plain name"]),
    ("name of trainpipe's own", lambda f: [bad(f, "t.csv", THREE_CLASSES), "--name",
                                           "hotel_bookings"], 2,
     ["trainpipe ships a dataset of that name"]),
    ("one column", lambda f: [bad(f, "t.csv", b"a\n1\n2\n")], 2,
     ["the table has one column ('a'); a dataset needs a target and a feature"]),
    ("free text as target", lambda f: [bad(f, "t.csv", b"a,comment\n" + b"".join(
        b"%d,text %d\n" % (i, i) for i in range(30)))], 2,
     ["the target 'comment' holds text with 30 values in 30 rows", "--target names the column"]),
    ("password in the URL", lambda f: ["http://ml:hunter2secret@127.0.0.1:1/t.csv"], 2,
     ["http://ml:***@127.0.0.1:1/t.csv: the source URL holds a secret"]),
    ("ragged CSV", lambda f: [bad(f, "t.csv", b"a,b\n1,2\n3,4,5\n")], 3,
     ["not a well-formed CSV file: line 3 has 3 fields, the header has 2"]),
    ("no rows", lambda f: [bad(f, "t.csv", b"a,b\n")], 3,
     ["t.csv: the file has no data rows to infer the columns from"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_named_and_nothing_is_written(workdir, case):
    _, make, code, words = case
    result = init(workdir, *make(workdir))
    message = " ".join(result.stderr.split())
    assert result.exit_code == code, result.output
    assert message.startswith("error:" if code == 2 else "invalid data:"), message
    for w in words:
        assert w in message
    assert "Traceback" not in result.output and "hunter2secret" not in result.output
    assert not (workdir / "conf").exists()


def test_the_written_digest_covers_every_line_below_it(workdir):
    pd.DataFrame({"a": [1, 2], "y": [0, 1]}).to_csv(workdir / "t.csv", index=False)
    assert init(workdir, str(workdir / "t.csv")).exit_code == 0
    first, _, rest = (workdir / "conf/dataset/t.yaml").read_text().partition("\n")
    digest = first.rsplit(" ", 1)[1]
    assert first.startswith("# trainpipe dataset init · sha256 of the lines below: ")
    assert digest == dataset_init._sha(rest)


def test_yes_no_columns_are_booleans_and_doubtful_numbers_are_marked(workdir):
    """Found by a new user: a yes/no column was written as text (then `Yes` in new rows
    failed), and a column of numbers with a few stray words became a category without a
    word."""
    rows = 400
    df = pd.DataFrame({
        "id": range(rows),
        "support": np.where(np.arange(rows) % 3 == 0, "yes", "no"),
        "age": [str(20 + i % 50) for i in range(rows)],
        "label": np.where(np.arange(rows) % 4 == 0, "churn", "stay"),
    })
    df.loc[[5, 9], "age"] = ["abc", "n/a"]
    df.to_csv(workdir / "customers.csv", index=False)
    result = init(workdir, str(workdir / "customers.csv"), "--target", "label")
    assert result.exit_code == 0, result.output
    text, ds = written(workdir, "customers")
    assert OmegaConf.to_container(ds.columns)["support"] == {"type": "bool"}
    assert ds.columns.label.type == "str"  # labels stay labels
    checks = dict(re.findall(r"^ *([\w\"]+): .*# check: (.*)$", text, re.M))
    assert checks["age"].startswith("numbers but for 2 value(s) such as 'abc': written as text")
