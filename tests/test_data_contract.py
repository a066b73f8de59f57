"""The data is what the file says: each column is read as its contract type (never
guessed), and the logged model reads rows as the source holds them as well as typed."""

import json
import os
import subprocess
import sys
import warnings
from datetime import date
from decimal import Decimal
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import FAST, compose, copy_store, task_table
from tests.test_steps import run_through
from trainpipe import coerce
from trainpipe.cli import app
from trainpipe.errors import ConfigError
from trainpipe.pipeline import fingerprints
from trainpipe.steps import ingest, split

PEOPLE_YAML = """\
name: people
source: {source}
task: binary
target: label
id_column: id
na_values: ['', 'N/A']
true_values: ['yes', 'y', 'true']
false_values: ['no', 'n', 'false']
columns:
  id:     {{type: int, min: 0}}
  region: {{type: str, values: ['NA', 'EU', 'AS']}}
  code:   {{type: str}}
  member: {{type: bool}}
  joined: {{type: datetime, format: '%d/%m/%Y', nullable: true}}
  score:  {{type: float, nullable: true}}
  visits: {{type: int, nullable: true}}
  label:  {{type: int, values: [0, 1]}}
"""
PEOPLE_CSV = """\
id,region,code,member,joined,score,visits,label
0,NA,01001,yes,31/01/2024,1.5,3,0
1,EU,02002,No,01/02/2024,N/A,,1
2,AS,00003,Y,13/12/2023,,4.0,0
3,NA,1e5,FALSE,,2,5,1
"""


def people(folder: Path, csv: str = PEOPLE_CSV, yaml: str = PEOPLE_YAML) -> Path:
    conf = folder / "conf" / "dataset"
    conf.mkdir(parents=True, exist_ok=True)
    (folder / "people.csv").write_text(csv)
    (conf / "people.yaml").write_text(yaml.format(source=folder / "people.csv"))
    return folder / "conf"


def validated(conf: Path, *overrides: str) -> pd.DataFrame:
    cfg = compose("dataset=people", "validate.target_classes=false", *overrides,
                  config_dir=conf)
    return run_through(cfg, "validate")[0]["validated"]


def test_each_column_is_read_as_its_contract_type(tmp_path):
    df = validated(people(tmp_path))
    assert df["region"].tolist() == ["NA", "EU", "AS", "NA"]  # Namibia, not a missing value
    assert df["code"].tolist() == ["01001", "02002", "00003", "1e5"]  # codes stay text
    assert df["member"].dtype == bool and df["member"].tolist() == [True, False, True, False]
    assert df["joined"].tolist()[:3] == [pd.Timestamp("2024-01-31"), pd.Timestamp("2024-02-01"),
                                         pd.Timestamp("2023-12-13")]  # day first, as the format
    assert pd.isna(df["joined"][3])
    assert df["score"].tolist()[0] == 1.5 and df["score"][1:3].isna().all()  # N/A declared
    assert df["visits"].dtype == "float64" and df["visits"][[0, 2, 3]].tolist() == [3, 4, 5]
    assert df["id"].dtype == "int64"


def test_only_declared_spellings_are_missing(tmp_path):
    conf = people(tmp_path, yaml=PEOPLE_YAML.replace("na_values: ['', 'N/A']\n", ""))
    cfg = compose("dataset=people", "validate.target_classes=false", config_dir=conf)
    with pytest.raises(Exception, match=r"score · values of the wrong type \(float\); if 'N/A' "
                       r"means missing, list it in dataset\.na_values · 1 row · "
                       r"e\.g\. row 2: 'N/A'"):
        run_through(cfg, "validate")


def test_parquet_columns_keep_their_types_and_get_the_same_checks(tmp_path):
    frame = pd.DataFrame({
        "id": np.arange(4), "region": pd.Categorical(["NA", "EU", "AS", "NA"]),
        "code": ["01001", "02002", "00003", "4"], "member": [True, False, True, False],
        "joined": [date(2024, 1, 31), date(2024, 2, 1), None, date(2023, 12, 13)],
        "score": [Decimal("1.5"), None, Decimal(2), Decimal(3)],
        "visits": [3.0, np.nan, 4.0, 5.0],
        "label": np.array([0, 1, 0, 1], dtype="uint8")})
    frame.to_parquet(tmp_path / "people.parquet")
    conf = people(tmp_path)
    df = validated(conf, f"dataset.source={tmp_path / 'people.parquet'}")
    assert df["member"].tolist() == [True, False, True, False]
    assert df["region"].tolist() == ["NA", "EU", "AS", "NA"] and df["score"][0] == 1.5
    assert df["label"].dtype == "int64" and df["joined"].dtype == "datetime64[ns]"
    frame.assign(visits=[3.5, np.nan, 4.0, 5.0]).to_parquet(tmp_path / "bad.parquet")
    cfg = compose("dataset=people", "validate.target_classes=false",
                  f"dataset.source={tmp_path / 'bad.parquet'}", config_dir=conf)
    with pytest.raises(Exception, match=r"visits · values are not whole numbers \(type: int\) "
                       r"· 1 row · e\.g\. row 1: 3\.5"):
        run_through(cfg, "validate")


def test_rows_of_a_parquet_file_are_numbered_by_their_place_in_it(tmp_path):
    """A Parquet file written from a slice keeps the slice's index: the failing row is still
    named by its place in the file, from 1."""
    frame = pd.DataFrame({
        "id": np.arange(6), "region": ["NA", "EU", "AS", "NA", "EU", "AS"],
        "code": ["01001"] * 6, "member": [True, False] * 3,
        "joined": [date(2024, 1, 31)] * 6, "score": [1.5] * 6,
        "visits": [3.0, 4.0, 5.0, 3.5, 6.0, 7.0], "label": [0, 1] * 3})
    frame.iloc[2:].to_parquet(tmp_path / "tail.parquet")  # its index: 2 to 5
    conf = people(tmp_path)
    cfg = compose("dataset=people", "validate.target_classes=false",
                  f"dataset.source={tmp_path / 'tail.parquet'}", config_dir=conf)
    with pytest.raises(Exception, match=r"visits · values are not whole numbers \(type: int\) "
                       r"· 1 row · e\.g\. row 2: 3\.5$"):
        run_through(cfg, "validate")


@pytest.mark.parametrize("text,kind,value,cause", [
    ("12", "int", 12, None), (" 12 ", "int", 12, None), ("+12", "int", 12, None),
    ("12.0", "int", 12, None), ("1e3", "int", 1000, None), ("9223372036854775807", "int",
                                                            2**63 - 1, None),
    ("-9223372036854775808", "int", -(2**63), None), ("9223372036854775808", "int", None,
                                                      coerce.INT64),
    ("1e30", "int", None, coerce.INT64), ("12.5", "int", None, coerce.WHOLE),
    ("0x10", "int", None, coerce.TYPE), ("1_000", "int", None, coerce.TYPE),
    ("nan", "int", None, coerce.TYPE), ("inf", "int", None, coerce.TYPE),
    ("inf", "float", np.inf, None), ("nan", "float", None, coerce.TYPE),
    ("1,5", "float", None, coerce.TYPE), (".5", "float", 0.5, None),
    ("YES", "bool", True, None), ("0", "bool", False, None), ("Flase", "bool", None, coerce.TYPE),
    ("2024-01-31T10:00:00", "datetime", pd.Timestamp("2024-01-31 10:00"), None),
    ("31/01/2024", "datetime", None, coerce.TYPE),
])
def test_parse_reads_text_by_the_grammar_of_its_type(text, kind, value, cause):
    typed, missing, failed = coerce.parse(pd.Series([text, "1"], dtype="str"), kind)
    assert not missing.any()
    assert [c for c, mask in failed.items() if mask[0]] == ([cause] if cause else [])
    if cause is None:
        assert typed[0] == value
    else:
        assert pd.isna(typed[0])


def test_booleans_need_no_spelling_among_other_cells():
    """A JSON request sends true, not the file's spelling."""
    typed, missing, failed = coerce.parse(pd.Series([True, "yes", None, np.False_],
                                                    dtype=object), "bool",
                                          true_values=["yes"], false_values=["no"])
    assert typed.tolist() == [True, True, None, False] and not failed
    assert missing.tolist() == [False, False, True, False]


def test_a_big_int_keeps_every_digit_beside_a_missing_value():
    typed, _, failed = coerce.parse(pd.Series(["9007199254740993", "12"], dtype="str"), "int",
                                    nullable=False)
    assert not failed and typed.dtype == "int64" and typed[0] == 9007199254740993


def test_reading_and_validating_warns_nothing(tmp_path):
    """pandas' DtypeWarning (a column's type changing between its low-memory chunks) and
    pandera's date-parsing UserWarnings used to reach the terminal in normal use."""
    rows = 300_000
    codes = np.arange(rows).astype(object)
    codes[-5:] = "A1"  # a code column that looks numeric for its first chunks
    frame = pd.DataFrame({"id": np.arange(rows), "region": "EU", "code": codes,
                          "member": "true", "joined": "2024-01-13", "score": 1.5, "visits": 2,
                          "label": np.arange(rows) % 2})
    plain = "\n".join(line for line in PEOPLE_YAML.splitlines()
                      if not line.startswith(("na_values", "true_values", "false_values")))
    conf = people(tmp_path, yaml=plain.replace(", format: '%d/%m/%Y'", ""))
    frame.to_csv(tmp_path / "people.csv", index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = validated(conf)
    assert len(df) == rows and df["code"].iloc[-1] == "A1"
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("old,new,words", [
    ("{type: str}", "{type: str, kind: numeric}", "dataset.columns.code.kind numeric needs a "
     "number column; a str column is categorical or drop"),
    ("{type: str}", "{type: str, format: '%Y'}", "dataset.columns.code.format is a date "
     "format such as '%d/%m/%Y', for a datetime column"),
    ("{type: bool}", "{type: bool, nullable: 'no'}", "dataset.columns.member.nullable must "
     "be true or false, not 'no'"),
    ("{type: int, min: 0}", "{type: int, min: ten}", "dataset.columns.id.min 'ten' is not a "
     "number"),
    ("{type: int, values: [0, 1]}", "{type: int, values: [0, 1.5]}",
     "dataset.columns.label.values holds 1.5, which is no int"),
    ("format: '%d/%m/%Y', nullable: true}", "format: '%d/%m/%Y', min: someday}",
     "dataset.columns.joined.min 'someday' is not a date"),
    ("true_values: ['yes', 'y', 'true']", "true_values: [yes, 'y']",
     "dataset.true_values holds a boolean: YAML reads yes/no/true/false/on/off as booleans; "
     "quote them"),
    ("false_values: ['no', 'n', 'false']", "false_values: ['no', 'y']",
     "['y'] are in both dataset.true_values and dataset.false_values"),
    ("na_values: ['', 'N/A']", "na_values: []", "dataset.na_values must be a non-empty list"),
])
def test_the_dataset_file_contradicting_itself_is_a_config_error(tmp_path, old, new, words):
    assert old in PEOPLE_YAML
    conf = people(tmp_path, yaml=PEOPLE_YAML.replace(old, new))
    with pytest.raises(ConfigError) as info:
        compose("dataset=people", config_dir=conf)
    assert words in str(info.value)


def test_validate_reads_the_spellings_in_its_fingerprint(tmp_path):
    """Declaring another missing-value spelling changes what validate and the model read."""
    conf = people(tmp_path)
    cfg = compose("dataset=people", config_dir=conf)
    sources = ingest.read_sources(cfg)
    before = fingerprints(cfg, sources)
    cfg.dataset.na_values = ["", "N/A", "-"]
    after = fingerprints(cfg, sources)
    assert [s for s in before if before[s] != after[s]] == [
        "validate", "split", "features", "train", "evaluate", "register", "predict"]


def test_split_says_what_it_needs_when_validate_was_reused(tmp_path):
    """validate checks the split's feasibility; its output is reused when only the split's
    fractions change, so split checks them again before it cuts."""
    table = task_table("binary", rows=60)
    table.loc[:, "label"] = np.where(table.index < 9, "yes", "no")
    cfg = compose("split.val_size=0.05", "split.test_size=0.05")
    cfg.dataset.task, cfg.dataset.target = "binary", "label"
    with pytest.raises(Exception, match=r"cannot split the validated data: label · class 'yes' "
                       r"has 9 rows; split\.val_size=0\.05 and split\.test_size=0\.05 need at "
                       r"least 20 rows of each class"):
        split.run(cfg, table)
    assert split.feasibility(compose(), table["label"].value_counts()) is None  # 7 rows do


# -- the logged model reads rows as the training source looks (item 6) -------------------

TOY_YAML = """\
name: toy_dates
source: {source}
task: binary
target: label
positive_class: 'yes'
id_column: key
columns:
  key:    {{type: int, min: 0}}
  x1:     {{type: float}}
  x2:     {{type: int, min: 0, max: 49}}
  colour: {{type: str, values: [red, green, blue]}}
  weight: {{type: float, nullable: true}}
  booked: {{type: datetime, nullable: true}}
  member: {{type: bool}}
  label:  {{type: str, values: ['yes', 'no']}}
"""
# The same data as a file that writes dates day first and booleans as yes/no.
DAY_FIRST = {"booked": ("{type: datetime, nullable: true}",
                        "{type: datetime, nullable: true, format: '%d/%m/%Y'}"),
             "member": ("columns:", "true_values: ['yes']\nfalse_values: ['no']\ncolumns:")}

# A process where trainpipe cannot be imported: the model must carry what it needs.
LOAD_WITHOUT_TRAINPIPE = """
import sys
class NoTrainpipe:
    def find_spec(self, name, path=None, target=None):
        if name == "trainpipe" or name.startswith("trainpipe."):
            raise ImportError("trainpipe is not installed here")
sys.meta_path.insert(0, NoTrainpipe())
import json, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
assert "trainpipe" not in sys.modules
print(json.dumps(model.predict(pd.read_csv(sys.argv[3])).tolist()))
"""


@pytest.fixture(params=["iso", "day_first"])
def trained(request, tmp_path, monkeypatch, empty_store):
    """A model trained on a CSV with dates and booleans: ISO dates and True/False (the
    README's example), or day-first dates and yes/no."""
    monkeypatch.chdir(tmp_path)
    table = task_table("binary", rows=400).drop(columns=["notes"])
    yaml = TOY_YAML.format(source=tmp_path / "train.csv")
    if request.param == "day_first":
        table["booked"] = table["booked"].dt.strftime("%d/%m/%Y")
        table["member"] = np.where(table["member"], "yes", "no")
        for old, new in DAY_FIRST.values():
            yaml = yaml.replace(old, new)
    table.to_csv(tmp_path / "train.csv", index=False)
    conf = tmp_path / "conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "toy_dates.yaml").write_text(yaml)
    store = f"sqlite:///{copy_store(empty_store, tmp_path)}"
    result = CliRunner().invoke(app, ["run", "--config-dir", str(tmp_path / "conf"),
                                      "dataset=toy_dates", f"lake.root={tmp_path / 'lake'}",
                                      f"tracking.uri={store}", *FAST])
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(store)
    parent = mlflow.search_runs(experiment_names=["trainpipe"],
                                filter_string="tags.`trainpipe.kind` = 'pipeline'")
    return store, parent["tags.trainpipe.model_uri"].iloc[0], table, request.param


def test_the_model_reads_rows_as_the_source_holds_them_and_typed(trained, tmp_path):
    store, uri, table, style = trained
    model = mlflow.pyfunc.load_model(uri)
    rows = table.drop(columns=["label"]).head(50).copy()
    rows["x1"] = rows["x1"].round().astype(int)  # pandas reads ints where floats were
    rows.to_csv(tmp_path / "new.csv", index=False)
    raw = pd.read_csv(tmp_path / "new.csv")
    assert raw["x1"].dtype == "int64" and raw["booked"].dtype == "str"
    booked = pd.to_datetime(raw["booked"], format="%d/%m/%Y" if style == "day_first" else None)
    member = raw["member"] == "yes" if style == "day_first" else raw["member"]
    typed = raw.assign(x1=raw["x1"].astype(float), booked=booked, member=member)
    from_raw = model.predict(raw)
    assert set(from_raw) <= {"yes", "no"} and len(from_raw) == 50
    assert list(model.predict(typed)) == list(from_raw)
    # A JSON request (MLflow serving) sends dates as ISO text and booleans as true/false.
    request = mlflow.models.convert_input_example_to_serving_input(typed.head(10))
    assert list(mlflow.models.validate_serving_input(uri, request)) == list(from_raw[:10])

    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TRAINPIPE, store, uri,
                           str(tmp_path / "new.csv")], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == list(from_raw)
