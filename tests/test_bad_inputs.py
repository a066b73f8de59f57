"""A catalogue of bad inputs: each gets its exit code and the words the user must see,
leaves the landing zone exactly as it was, and leaves no MLflow run RUNNING.

The runs go through the real command line in-process (typer's runner) against a real
MLflow store and a lake that already holds a good run's outputs.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import FAST, copy_store
from trainpipe import demo
from trainpipe.cli import app

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


@dataclass
class Case:
    name: str
    make: Callable[[Path], list[str]]  # writes the bad input in a folder, returns overrides
    exit_code: int
    words: list[str]
    extra: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # words that must not be shown


def good() -> pd.DataFrame:
    return demo.hotel_bookings(rows=300, seed=5).astype(object)


def csv(edit: Callable[[pd.DataFrame], pd.DataFrame | None]) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        df = good()
        df = edit(df) if edit(df.copy()) is not None else df
        path = folder / "bad.csv"
        df.to_csv(path, index=False)
        return [f"dataset.source={path}"]
    return make


def set_cell(row: int, col: str, value) -> Callable[[Path], list[str]]:
    def edit(df):
        df.loc[row, col] = value
        return df
    return csv(edit)


def raw_bytes(data: bytes, name: str = "bad.csv") -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        (folder / name).write_bytes(data)
        return [f"dataset.source={folder / name}"]
    return make


def edit_lines(fn: Callable[[list[str]], list[str]]) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        lines = good().to_csv(index=False).splitlines()
        (folder / "bad.csv").write_text("\n".join(fn(lines)) + "\n")
        return [f"dataset.source={folder / 'bad.csv'}"]
    return make


def parquet(edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        df = edit(demo.hotel_bookings(rows=300, seed=5))
        df.to_parquet(folder / "bad.parquet")
        return [f"dataset.source={folder / 'bad.parquet'}"]
    return make


def scoring(edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        train, score = folder / "train.csv", folder / "score.csv"
        demo.hotel_bookings(rows=300, seed=5).to_csv(train, index=False)
        edit(demo.hotel_bookings(rows=50, seed=6)).to_csv(score, index=False)
        return [f"dataset.source={train}", f"dataset.scoring_source={score}"]
    return make


def dataset_yaml(replace: tuple[str, str]) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        from trainpipe.config import CONF_DIR

        conf = folder / "conf" / "dataset"
        conf.mkdir(parents=True)
        text = (CONF_DIR / "dataset" / "hotel_bookings.yaml").read_text()
        assert replace[0] in text
        (conf / "mine.yaml").write_text(text.replace("name: hotel_bookings", "name: mine")
                                        .replace(*replace))
        return ["--config-dir", str(folder / "conf"), "dataset=mine"]
    return make


def overrides(*values: str) -> Callable[[Path], list[str]]:
    return lambda folder: list(values)


def drop(col):
    return lambda df: df.drop(columns=[col])


def drop_every_feature(folder: Path) -> list[str]:
    from omegaconf import OmegaConf

    from trainpipe.config import CONF_DIR

    columns = OmegaConf.load(CONF_DIR / "dataset" / "hotel_bookings.yaml").columns
    return [f"++dataset.columns.{c}.kind=drop" for c in columns
            if c not in ("id", "booking_status")]


MINI_YAML = """\
name: mini
source: {source}
task: binary
target: label
id_column: id
columns:
  id:     {{type: int, min: 0, unique: true}}
  code:   {{type: str, values: ['01001', '02002']}}
  member: {{type: bool}}
  joined: {{type: datetime}}
  score:  {{type: float, nullable: true}}
  label:  {{type: int, values: [0, 1]}}
"""


def mini_table(rows: int = 40) -> pd.DataFrame:
    """Text cells of a small dataset with the types the hotel data lacks: codes with
    leading zeros, bool spellings, dates."""
    i = np.arange(rows)
    return pd.DataFrame({"id": i, "code": np.where(i % 2, "02002", "01001"),
                         "member": np.where(i % 3, "yes", "no"),
                         "joined": [f"2024-01-{d:02d}" for d in i % 28 + 1],
                         "score": [f"{v:.2f}" for v in i / 7], "label": i % 2}).astype(str)


def mini(edit: Callable[[pd.DataFrame], pd.DataFrame] = lambda df: df,
         yaml: tuple[str, str] = ("", "")) -> Callable[[Path], list[str]]:
    """The mini dataset (its own dataset file) with an edit to its cells or its YAML."""
    def make(folder: Path) -> list[str]:
        conf = folder / "conf" / "dataset"
        conf.mkdir(parents=True)
        edit(mini_table()).to_csv(folder / "mini.csv", index=False)
        text = MINI_YAML.format(source=folder / "mini.csv")
        assert yaml[0] in text
        (conf / "mini.yaml").write_text(text.replace(*yaml))
        return ["--config-dir", str(folder / "conf"), "dataset=mini"]
    return make


def cell(row: int, col: str, value) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(df):
        df.loc[row, col] = value
        return df
    return edit


CASES = [
    Case("out_of_range", set_cell(4, "arrival_month", 13), 3,
         ["arrival_month · less_than_or_equal_to(12) · 1 row · e.g. row 5: 13"]),
    Case("negative", set_cell(2, "no_of_adults", -1), 3,
         ["no_of_adults", "greater_than_or_equal_to(0)", "row 3: -1"]),
    Case("outside_allowed_set", set_cell(7, "repeated_guest", 2), 3,
         ["repeated_guest", "isin([0, 1])", "row 8: 2"]),
    Case("string_in_numeric", set_cell(1, "lead_time", "soon"), 3,
         ["lead_time", "wrong type", "row 2: 'soon'"]),
    Case("null_not_nullable", set_cell(3, "avg_price_per_room", None), 3,
         ["avg_price_per_room", "missing values (not nullable)", "row 4: None"]),
    Case("not_whole_number", set_cell(6, "no_of_adults", 2.5), 3,
         ["no_of_adults", "not whole numbers", "row 7: 2.5"]),
    Case("missing_column", csv(drop("lead_time")), 3, ["lead_time", "column is missing"]),
    Case("extra_column_strict", csv(lambda df: df.assign(colour="red")), 3,
         ["colour", "not in the dataset config (strict: true)"]),
    Case("renamed_column", csv(lambda df: df.rename(columns={"lead_time": "leadtime"})), 3,
         ["lead_time · column is missing", "leadtime · column is not in the dataset config"]),
    Case("empty_file", raw_bytes(b""), 3, ["bad.csv: the file is empty"]),
    Case("header_only", edit_lines(lambda lines: lines[:1]), 3, ["the file has no data rows"]),
    Case("ragged_row", edit_lines(lambda lines: lines[:4] + [lines[4] + ",7"] + lines[5:]), 3,
         ["bad.csv: not a well-formed CSV file: line 5 has 20 fields, the header has 19"]),
    Case("semicolons", edit_lines(lambda lines: [ln.replace(",", ";") for ln in lines]), 3,
         ["line 1 has no commas but 18 ';'", "';'-delimited"]),
    Case("not_utf8", raw_bytes(good().to_csv(index=False).encode().replace(
        b"\n5,", b"\n5\xe9,", 1)), 3, ["line 7: bytes that are not UTF-8", "save the file as"]),
    Case("duplicate_ids", set_cell(11, "id", 10), 3, ["id", "duplicate values", "row 12: 10"]),
    Case("single_class", csv(lambda df: df.assign(booking_status=0)), 3,
         ["booking_status · the target has a single class (0)"]),
    Case("all_null_column", csv(lambda df: df.assign(avg_price_per_room=None)), 3,
         ["avg_price_per_room", "every value is missing"],
         extra=["+dataset.columns.avg_price_per_room.nullable=true"]),
    Case("all_null_required_column", csv(lambda df: df.assign(avg_price_per_room=None)), 3,
         ["avg_price_per_room · every value is missing · 300 rows"],
         absent=["not nullable"]),  # one cause, one line
    Case("inf_value", set_cell(8, "avg_price_per_room", np.inf), 3,
         ["avg_price_per_room · finite · 1 row · e.g. row 9: inf"],
         absent=["less_than_or_equal_to"]),  # one cause, one line
    Case("out_of_range_in_a_column_with_a_null",
         csv(lambda df: df.assign(arrival_month=df.arrival_month.where(df.index != 6))
             .assign(arrival_month=lambda d: d.arrival_month.where(d.index != 4, 13))), 3,
         ["arrival_month · less_than_or_equal_to(12) · 1 row · e.g. row 5: 13\n",
          "arrival_month · missing values (not nullable) · 1 row"]),
    Case("parquet_wrong_types", parquet(lambda df: df.assign(
        lead_time=df["lead_time"].astype(str).str.replace("1", "one"))), 3,
         ["bad.parquet", "lead_time", "wrong type", "one"]),
    Case("scoring_with_target", scoring(lambda df: df), 3,
         ["score.csv", "booking_status", "scoring data must not contain the target column"]),
    Case("scoring_bad_value", scoring(lambda df: df.drop(columns=["booking_status"]).assign(
        arrival_date=40)), 3, ["score.csv", "arrival_date", "less_than_or_equal_to(31)"]),
    Case("missing_file", lambda folder: [f"dataset.source={folder / 'absent.csv'}"], 2,
         ["absent.csv: no such file"]),
    Case("folder_not_file", lambda folder: [f"dataset.source={folder}"], 2,
         ["is a folder, not a CSV or Parquet file"]),
    Case("neither_csv_nor_parquet", raw_bytes(b"\x00\x01\x02binary" * 50, "data.bin"), 2,
         ["data.bin: neither CSV nor Parquet"]),
    Case("json_file", raw_bytes(b'[{"id": 1, "lead_time": 3}]\n', "data.json"), 2,
         ["data.json: neither CSV nor Parquet (it looks like JSON)"]),
    Case("csv_named_parquet", raw_bytes(b"id,a\n1,2\n", "data.parquet"), 2,
         ["data.parquet: named like Parquet but is not a Parquet file"]),
    Case("yaml_unknown_type", dataset_yaml(("{type: int, min: 0, max: 10}",
                                            "{type: integer, min: 0, max: 10}")), 2,
         ["dataset.columns.no_of_adults.type 'integer' is not one of"]),
    Case("yaml_target_not_a_column", dataset_yaml(("target: booking_status",
                                                   "target: cancelled")), 2,
         ["dataset.target 'cancelled' is not among dataset.columns"]),
    Case("yaml_unknown_column_key", dataset_yaml(("{type: int, min: 1, max: 12}",
                                                  "{type: int, minimum: 1, max: 12}")), 2,
         ["dataset.columns.arrival_month has unknown key(s) ['minimum']"]),
    Case("yaml_bad_task", dataset_yaml(("task: binary", "task: classification")), 2,
         ["error: config: dataset.task: 'classification' is not one of binary, multiclass, "
          "regression"]),
    Case("yaml_syntax_error", dataset_yaml(("columns:", "columns: [")), 2,
         ["invalid YAML", "mine.yaml\", line"]),
    Case("yaml_unquoted_yes_no", dataset_yaml(("booking_status:                       "
                                               "{type: int, values: [0, 1]}",
                                               "booking_status: {type: str, values: [yes, no]}")),
         2, ["quote them"]),
    Case("unknown_dataset", lambda folder: ["dataset=nope"], 2, ["nope"]),
    Case("bad_split_ratio", lambda folder: ["split.test_size=0.9", "split.val_size=0.2"], 2,
         ["split.val_size=0.2, split.test_size=0.9"]),
    # The whole config is checked against its declared schema before any run starts.
    Case("seed_not_a_number", overrides("seed=abc"), 2,
         ["seed='abc': must be a whole number from 0 to 4294967295"]),
    Case("seed_negative", overrides("seed=-1"), 2, ["seed=-1: must be a whole number"]),
    Case("seed_too_big", overrides("seed=4294967296"), 2, ["seed=4294967296: must be"]),
    Case("val_size_not_a_number", overrides("split.val_size=abc"), 2,
         ["split.val_size='abc': must be a fraction of all rows, in (0, 1)"]),
    Case("min_rows_not_a_number", overrides("validate.min_rows=abc"), 2,
         ["validate.min_rows='abc': must be a whole number, 1 or more"]),
    Case("empty_experiment", overrides("tracking.experiment=''"), 2,
         ["tracking.experiment='': must be an experiment name, not empty"]),
    Case("unknown_encoding", overrides("model.preprocessing.categorical_encoding=bogus"), 2,
         ["model.preprocessing.categorical_encoding='bogus': must be onehot or ordinal"]),
    Case("unknown_top_level_key", overrides("+sed=3"), 2,
         ["sed: unknown key (did you mean 'seed'?)"]),
    # Typed as users type them, without Hydra's `+`: the same words, not Hydra's advice.
    Case("unknown_key_without_plus", overrides("sed=3"), 2,
         ["sed: unknown key (did you mean 'seed'?)"], absent=["To append to your config"]),
    Case("unknown_dataset_key_without_plus", overrides("dataset.targte=x"), 2,
         ["'targte': did you mean 'target'?"], absent=["To append to your config"]),
    Case("unknown_model_param", overrides("model.params.n_estimator=50"), 2,
         ["model.params.n_estimator: RandomForestClassifier takes no such parameter (did you "
          "mean 'n_estimators'?)"]),
    Case("lightgbm_negative_trees", overrides("model=lightgbm", "model.params.n_estimators=-5"),
         2, ["model.params: lightgbm.LGBMClassifier refuses them: Number of boosting rounds "
             "must be greater than 0. Got -5."]),
    Case("lightgbm_negative_learning_rate",
         overrides("model=lightgbm", "model.params.learning_rate=-1"), 2,
         ["model.params: lightgbm.LGBMClassifier refuses them: Check failed: (learning_rate) > "
          "(0.0)"], absent=["[LightGBM] [Fatal]", "config_auto.cpp"]),
    Case("forest_bad_depth", overrides("model.params.max_depth=abc"), 2,
         ["The 'max_depth' parameter of RandomForestClassifier must be an int"]),
    Case("dataset_name_climbs_out", overrides("dataset.name=../../../escape"), 2,
         ["dataset.name: '../../../escape' is not a plain name"]),
    Case("lake_root_is_a_file",
         lambda folder: [f"lake.root={folder / 'lake/raw/hotel_bookings/train.csv'}"], 2,
         ["train.csv: is a file, not a folder"]),
    Case("yaml_derived_runs_code", dataset_yaml((
        "total_guests: no_of_adults + no_of_children",
        "total_guests: \"@warnings.sys.modules.get('os').system('echo pwned')\"")), 2,
         ["dataset.derived.total_guests: ", "is not allowed: not a formula",
          "A formula may use feature columns"], absent=["pwned\n"]),
    Case("yaml_derived_unknown_column", dataset_yaml(("no_of_adults + no_of_children",
                                                      "no_of_adults + no_of_childs")), 2,
         ["dataset.derived.total_guests: 'no_of_adults + no_of_childs': unknown column "
          "'no_of_childs' (did you mean 'no_of_children'?); feature columns: no_of_adults, "]),
    Case("yaml_derived_repeats_a_column", dataset_yaml(("total_nights:", "lead_time:")), 2,
         ["dataset.derived.lead_time: 'lead_time' is already a column in dataset.columns; "
          "give the derived column a new name"]),
    Case("yaml_no_feature_columns", drop_every_feature, 2,
         ["no feature columns: every column of dataset.columns is the target, the id_column "
          "or has kind: drop"]),
    # The data is what the file says (issue 8): no value guessed, none published wrongly.
    Case("bool_typo", mini(cell(5, "member", "Flase")), 3,
         ["mini.csv · member · values of the wrong type (bool): not one of true_values "
          "['true', '1', 'yes'] or false_values ['false', '0', 'no'] · 1 row · "
          "e.g. row 6: 'Flase'"]),
    Case("bool_outside_configured_spellings", mini(yaml=("columns:", "true_values: [Y]\n"
                                                          "false_values: [N]\ncolumns:")), 3,
         ["member · values of the wrong type (bool): not one of true_values ['Y'] or "
          "false_values ['N'] · 40 rows · e.g. row 1: 'no', row 2: 'yes'"]),
    Case("na_token_not_declared_missing", mini(cell(3, "score", "N/A")), 3,
         ["score · values of the wrong type (float); if 'N/A' means missing, list it in "
          "dataset.na_values · 1 row · e.g. row 4: 'N/A'"]),
    Case("leading_zero_lost", mini(cell(4, "code", "1001")), 3,
         ["code · isin(['01001', '02002']) · 1 row · e.g. row 5: '1001'"]),
    Case("int_overflow", set_cell(3, "lead_time", "1e30"), 3,
         ["lead_time · whole numbers outside the int64 range (type: int) · 1 row · "
          "e.g. row 4: '1e30'"], absent=["-9223372036854775808", "greater_than"]),
    Case("int_beyond_int64_by_one", set_cell(3, "lead_time", "9223372036854775808"), 3,
         ["lead_time · whole numbers outside the int64 range (type: int) · 1 row · "
          "e.g. row 4: 9223372036854775808"], absent=["greater_than", "less_than"]),
    Case("dayfirst_dates_without_format",
         mini(lambda df: df.assign(joined=[f"{d:02d}/01/2024" for d in range(1, 41)])), 3,
         ["joined · values of the wrong type (datetime): not dates in the format ISO 8601 "
          "(2024-01-31); set the column's format, e.g. format: '%d/%m/%Y' · 40 rows · "
          "e.g. row 1: '01/01/2024', row 2: '02/01/2024'"]),
    Case("date_not_in_format", mini(cell(2, "joined", "2024-01-03"),
                                    yaml=("{type: datetime}",
                                          "{type: datetime, format: '%Y-%m-%d %H:%M'}")), 3,
         ["joined · values of the wrong type (datetime): not dates in the format "
          "'%Y-%m-%d %H:%M' · 40 rows"]),
    Case("parquet_list_column", parquet(lambda df: df.assign(lead_time=[[1, 2]] * len(df))), 3,
         ["bad.parquet · lead_time · values of the wrong type (int) · 300 rows · "
          "e.g. row 1: [1, 2], row 2: [1, 2]"]),
    Case("yaml_unknown_dataset_key", dataset_yaml(("id_column: id", "id_colum: id")), 2,
         ["dataset has unknown key(s) ['id_colum'] ('id_colum': did you mean 'id_column'?)"]),
    Case("yaml_misspelt_column_key", dataset_yaml(("{type: float, min: 0, max: 10000}",
                                                   "{type: float, nullabel: true}")), 2,
         ["dataset.columns.avg_price_per_room has unknown key(s) ['nullabel'] ('nullabel': "
          "did you mean 'nullable'?)"]),
    Case("yaml_min_above_max", dataset_yaml(("{type: int, min: 1, max: 12}",
                                             "{type: int, min: 12, max: 1}")), 2,
         ["dataset.columns.arrival_month: min 12 is greater than max 1: no value could pass"]),
    Case("yaml_empty_values", dataset_yaml(("repeated_guest:                       {type: int, "
                                            "values: [0, 1]}", "repeated_guest: {type: int, "
                                            "values: []}")), 2,
         ["dataset.columns.repeated_guest.values is empty: no value could pass"]),
    Case("yaml_values_outside_min_max", dataset_yaml(("{type: int, min: 0, max: 3, kind: "
                                                      "categorical}", "{type: int, min: 0, "
                                                      "max: 3, values: [0, 4]}")), 2,
         ["dataset.columns.type_of_meal_plan.values holds 4, outside min..max (0..3)"]),
    Case("yaml_str_values_unquoted", mini(yaml=("['01001', '02002']", "[01001, 02002]")), 2,
         ["dataset.columns.code.values holds the number 513, not a text: YAML reads unquoted "
          "numbers as numbers (01001 as the octal 513); quote each value"]),
    Case("yaml_target_is_the_id", dataset_yaml(("id_column: id", "id_column: booking_status")),
         2, ["dataset.id_column 'booking_status' is the target"]),
    Case("class_of_one_row", csv(lambda df: df.assign(
        booking_status=(df.index == 3).astype(int))), 3,
         ["booking_status · class 1 has 1 row; split.val_size=0.15 and split.test_size=0.15 "
          "need at least 7 rows of each class (one in each of train, val and test)"]),
    Case("two_minority_rows", csv(lambda df: df.assign(
        booking_status=df.index.isin([3, 9]).astype(int))), 3,
         ["booking_status · class 1 has 2 rows; split.val_size=0.15"]),
    Case("four_rows", csv(lambda df: df.head(4).assign(booking_status=[0, 1, 0, 1])), 3,
         ["booking_status · class 0 has 2 rows, class 1 has 2 rows; split.val_size=0.15 and "
          "split.test_size=0.15 need at least 7 rows of each class"]),
    Case("few_rows_for_larger_fractions", csv(lambda df: df.assign(
        booking_status=(df.index < 8).astype(int))), 3,
         ["class 1 has 8 rows; split.val_size=0.05 and split.test_size=0.05 need at least "
          "20 rows of each class"], extra=["split.val_size=0.05", "split.test_size=0.05"]),
    Case("nullable_target_with_nulls", set_cell(3, "booking_status", None), 3,
         ["booking_status · missing values (the target needs a value in every row) · 1 row · "
          "e.g. row 4: None"], extra=["+dataset.columns.booking_status.nullable=true"]),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory, empty_store) -> Path:
    """A working folder after one good run: a lake with published landing outputs."""
    folder = tmp_path_factory.mktemp("good")
    copy_store(empty_store, folder)
    here = Path.cwd()
    os.chdir(folder)  # MLflow puts the experiment's artifacts under ./mlruns
    raw = folder / "lake/raw/hotel_bookings"
    raw.mkdir(parents=True)
    demo.hotel_bookings(rows=300, seed=5).to_csv(raw / "train.csv", index=False)
    result = invoke(folder, [*FAST])
    os.chdir(here)
    assert result.exit_code == 0, result.output
    return folder


def invoke(folder: Path, args: list[str]):
    options = [a for a in args if a.startswith("--") or Path(a).is_dir() and "=" not in a]
    overrides = [a for a in args if a not in options]
    return CliRunner().invoke(app, ["run", *options, f"lake.root={folder / 'lake'}",
                                    f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
                                    *overrides])


def snapshot(zone: Path) -> dict[str, str]:
    return {str(p.relative_to(zone)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(zone.rglob("*")) if p.is_file()}


def test_the_catalogue_is_big_enough():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, template: Path, tmp_path: Path, monkeypatch):
    folder = tmp_path / "work"
    shutil.copytree(template, folder)
    monkeypatch.chdir(folder)
    landing_before = snapshot(folder / "lake/landing")
    assert landing_before  # the good run published something to protect

    result = invoke(folder, [*case.make(folder), *case.extra])

    message = result.stderr
    assert result.exit_code == case.exit_code, result.output
    for words in case.words:
        assert words in message, f"{words!r} not in:\n{message}"
    for words in case.absent:
        assert words not in message, f"{words!r} in:\n{message}"
    assert "Traceback" not in message
    assert snapshot(folder / "lake/landing") == landing_before
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    statuses = mlflow.search_runs(search_all_experiments=True)["status"]
    assert "RUNNING" not in set(statuses)
    if "data validation failed" in message:  # schema checks: the report is recorded
        assert "full report:" in message and "validation_report.md" in message


def test_scoring_data_without_the_target_is_fine(template, tmp_path, monkeypatch):
    folder = tmp_path / "work"
    shutil.copytree(template, folder)
    monkeypatch.chdir(folder)
    make = scoring(lambda df: df.drop(columns=["booking_status"]))
    result = invoke(folder, [*make(folder), *FAST])
    assert result.exit_code == 0, result.output
    assert "scoring 50 rows" in result.stdout
    assert list((folder / "lake/landing/hotel_bookings/validate").glob("*/*/scoring.parquet"))


def test_checks_beyond_the_schema_can_be_turned_off(template, tmp_path, monkeypatch):
    folder = tmp_path / "work"
    shutil.copytree(template, folder)
    monkeypatch.chdir(folder)
    make = csv(lambda df: df.assign(avg_price_per_room=None))
    nullable = "+dataset.columns.avg_price_per_room.nullable=true"
    result = invoke(folder, [*make(folder), nullable, *FAST])
    assert result.exit_code == 3 and "every value is missing" in result.stderr
    result = invoke(folder, [*make(folder), nullable, "validate.all_null_columns=false", *FAST])
    assert result.exit_code == 0, result.output


def test_a_huge_cell_in_a_failure_is_shown_cut_and_quickly(tmp_path, empty_store):
    """A 1 MB text cell in a number column: the message shows its first characters, and the
    run ends (redaction and reporting cost what the shown part costs)."""
    df = good()
    df.loc[3, "lead_time"] = "x" * 1_000_000
    path = tmp_path / "huge.csv"
    df.to_csv(path, index=False)
    copy_store(empty_store, tmp_path)
    result = subprocess.run([sys.executable, "-m", "trainpipe", "run", f"dataset.source={path}",
                             f"lake.root={tmp_path / 'lake'}",
                             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "lead_time" in result.stderr and "row 4: 'xxxxxxxx" in result.stderr
    assert "x" * 100 not in result.stderr and "…" in result.stderr
