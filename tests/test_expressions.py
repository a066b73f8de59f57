"""Derived columns: formulas are parsed into a small grammar and never run as code; the
logged model carries the parsed form and predicts without trainpipe installed."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import FAST, compose, runs, task_dataset_yaml, task_table, trainpipe
from trainpipe.errors import ConfigError
from trainpipe.expressions import add_derived, parse_derived
from trainpipe.steps.features import build_transformer

# The attacks of issue 9: each would create the file it names if it ran.
ATTACKS = [
    "@warnings.sys.modules.get('os').system('touch {target}')",
    "x1.to_csv('{target}')",
    "__import__('os').system('touch {target}')",
    "x1.__class__.__init__.__globals__['os'].system('touch {target}')",
]


def toy_dataset(derived: dict) -> OmegaConf:
    dataset = OmegaConf.create(task_dataset_yaml("binary", Path("unused.csv")))
    dataset.derived = derived
    return dataset


def refusal(formula: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_derived(toy_dataset({"pwn": formula}))
    return str(caught.value)


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_parser_refuses_code(attack, tmp_path):
    target = tmp_path / "pwned"
    message = refusal(attack.format(target=target))
    assert message.startswith("dataset 'toy_binary': dataset.derived.pwn: ")
    assert "is not allowed: " in message
    assert "A formula may use feature columns" in message  # says what is allowed
    assert not target.exists()


@pytest.mark.no_store  # it checks that no store is made
@pytest.mark.parametrize("attack", ATTACKS[:2])
def test_the_command_refuses_code_before_any_run(attack, task_config):
    conf = task_config("binary")
    workdir = conf.parent
    target = workdir / "pwned.csv"
    yaml_file = conf / "dataset" / "toy_binary.yaml"
    formula = attack.format(target=target).replace('"', '\\"')
    yaml_file.write_text(yaml_file.read_text() + f'  pwn: "{formula}"\n')

    result = trainpipe("run", "--config-dir", str(conf), "dataset=toy_binary", cwd=workdir)

    assert result.returncode == 2, result.stderr
    assert "error: dataset 'toy_binary': dataset.derived.pwn: " in result.stderr
    assert "is not allowed" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists()
    assert not (workdir / "mlflow.db").exists() and not (workdir / "lake").exists()


@pytest.mark.parametrize("formula,words", [
    ("booked + 1", "'booked' is a datetime column: use its parts, e.g. booked.dt.month"),
    ("booked", "'booked' is a datetime column"),
    ("x1.dt.month", "'x1' is not a datetime column"),
    ("booked.dt.tz", ".dt.tz is not one of the .dt parts year, quarter, month"),
    ("label * 2", "'label' is the target"),
    ("key + 1", "'key' is the id_column, never a feature"),
    ("notes + 1", "'notes' has kind: drop"),
    ("colour + 1", "'colour' is a text column"),
    ("weigth / 2", "unknown column 'weigth' (did you mean 'weight'?); feature columns: x1, x2"),
    ("x1 & x2", "'x1' is a number where a comparison is expected"),
    ("where(x1, 1, 0)", "'x1' is a number where a comparison is expected"),
    ("foo(x1)", "'foo(x1)': unknown function 'foo'"),
    ("log(x1, 2)", "log() takes 1 argument"),
    ("x1[0]", "'x1[0]': indexing is not part of the grammar"),
    ("x1 + 'a'", "text is not part of the grammar"),
    ("x1 if member else x2", "if/else (use where(condition, a, b))"),
    ("1 + 2", "it uses no column"),
    ("x1 +", "not a formula (invalid syntax)"),
])
def test_refusals_say_what_is_wrong(formula, words):
    assert words in refusal(formula)


def test_a_formula_may_not_read_a_column_derived_after_it():
    with pytest.raises(ConfigError, match="'b' is derived later in dataset.derived; define it "
                                          "first"):
        parse_derived(toy_dataset({"a": "b * 2", "b": "x1 + 1"}))


@pytest.mark.parametrize("derived", [None, {}])
def test_no_derived_columns_is_fine(derived):
    assert parse_derived(toy_dataset(derived)) == {}


def test_a_formula_that_is_not_text_is_refused():
    with pytest.raises(ConfigError, match=r"dataset.derived.one: 1 is not a formula"):
        parse_derived(toy_dataset({"one": 1}))


FRAME = pd.DataFrame({
    "a": [1.0, 2.0, 0.0, np.nan],
    "b": [2, 0, 3, 4],
    "flag": [True, False, True, False],
    "when": pd.to_datetime(["2024-01-15 00:00", "2024-02-29 13:00", "2023-12-31 00:00", None]),
    "with space": [1.0, 2.0, 3.0, 4.0],
})
SPECS = {"a": {"type": "float", "nullable": True}, "b": {"type": "int"},
         "flag": {"type": "bool"}, "when": {"type": "datetime", "nullable": True},
         "with space": {"type": "float"}, "y": {"type": "int"}}


def derive(formulas: dict) -> pd.DataFrame:
    dataset = OmegaConf.create({"name": "t", "target": "y", "columns": SPECS,
                                "derived": formulas})
    return add_derived(FRAME, tuple(parse_derived(dataset).items()))


nan = np.nan


@pytest.mark.parametrize("formula,expected", [
    ("a / b", [0.5, nan, 0.0, nan]),  # division by zero: missing, imputed later
    ("b ** -1", [0.5, nan, 1 / 3, 0.25]),  # int columns compute as floats
    ("b // 2 % 2 + b * 1.5 - 1", [1.0 + 3 - 1, -1, 1 + 4.5 - 1, 6 - 1]),
    ("-a + abs(-b)", [1.0, -2.0, 3.0, nan]),
    ("flag - flag", [0.0, 0.0, 0.0, 0.0]),  # bool columns count as 0/1
    ("(a > 0) & (flag == 1)", [1.0, 0.0, 0.0, 0.0]),
    ("a > 0 and not (b > 1) or b == 4", [0.0, 1.0, 0.0, 1.0]),
    ("~(b > 1) | (a != a)", [0.0, 1.0, 0.0, 1.0]),
    ("0 < b <= 3", [1.0, 0.0, 1.0, 0.0]),  # chained, as in Python
    ("when.dt.month", [1.0, 2.0, 12.0, nan]),
    ("when.dt.dayofweek + when.dt.hour", [0.0, 3.0 + 13, 6.0, nan]),
    ("where(b > 1, log(b), -1)", [np.log(2), -1.0, np.log(3), np.log(4)]),
    ("max(a, b, 1) + min(b, 3)", [4.0, 2.0, 6.0, nan]),
    ("clip(b, 1, 3) + sqrt(b) * 0 + exp(0 * b) + log1p(0 * b)", [3.0, 2.0, 4.0, 4.0]),
    ("`with space` * 2", [2.0, 4.0, 6.0, 8.0]),
    ("log(a)", [0.0, np.log(2), nan, nan]),  # log(0) = -inf: missing
])
def test_formulas_compute_on_whole_columns(formula, expected):
    out = derive({"new": formula})
    assert out["new"].dtype == "float64"
    np.testing.assert_allclose(out["new"].to_numpy(), expected, equal_nan=True)


def test_derived_columns_build_on_each_other_and_leave_the_input_alone():
    before = FRAME.copy()
    out = derive({"copy": "a", "ratio": "a / b", "twice": "ratio * 2"})
    np.testing.assert_allclose(out["twice"], [1.0, nan, 0.0, nan], equal_nan=True)
    assert list(out.columns) == [*FRAME.columns, "copy", "ratio", "twice"]
    out.loc[0, "copy"] = 99.0
    pd.testing.assert_frame_equal(FRAME, before)


def test_the_transformer_stores_parsed_formulas_not_strings():
    cfg = compose()
    derive_step = build_transformer(cfg).named_steps["derive"]
    formulas = dict(derive_step.kw_args["formulas"])
    assert formulas["total_nights"] == ("arithmetic", "+", ("column", "no_of_weekend_nights"),
                                        ("column", "no_of_week_nights"))
    assert b"no_of_weekend_nights + no_of_week_nights" not in pickle.dumps(derive_step)


# Runs in a Python where `import trainpipe` fails, as on a serving machine without it.
WITHOUT_TRAINPIPE = """
import json, sys

class NoTrainpipe:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "trainpipe":
            raise ImportError(f"no module named {name!r} here")

sys.meta_path.insert(0, NoTrainpipe())
try:
    import trainpipe
    sys.exit("trainpipe imported")
except ImportError:
    pass

import mlflow.pyfunc, mlflow.sklearn, pandas as pd
uri, rows = sys.argv[1], pd.read_parquet(sys.argv[2])
predictions = mlflow.pyfunc.load_model(uri).predict(rows)
derived = mlflow.sklearn.load_model(uri).named_steps["derive"].transform(rows)
print(json.dumps({"predictions": [str(p) for p in predictions],
                  "derived": derived[["month", "big_x2", "ratio"]].to_numpy().tolist(),
                  "trainpipe": sorted(m for m in sys.modules if m.startswith("trainpipe"))}))
"""


def test_the_logged_model_predicts_without_trainpipe(task_config):
    conf = task_config("binary")
    workdir = conf.parent
    yaml_file = conf / "dataset" / "toy_binary.yaml"
    yaml_file.write_text(yaml_file.read_text() + (
        "  month: booked.dt.month\n"
        "  big_x2: where((x2 > 25) & (member == 1), log1p(x2), -1)\n"
        "  ratio: x1_times_x2 / `weight`\n"))
    result = trainpipe("run", "--config-dir", str(conf), "dataset=toy_binary", *FAST,
                       cwd=workdir)
    assert result.returncode == 0, result.stderr
    uri = runs(workdir).query("`tags.trainpipe.kind` == 'pipeline'").iloc[0][
        "tags.trainpipe.model_uri"]
    rows = task_table("binary", rows=20, seed=9).drop(columns=["label"])
    rows.to_parquet(workdir / "rows.parquet")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    alone = subprocess.run([sys.executable, "-c", WITHOUT_TRAINPIPE, uri, "rows.parquet"],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=240)

    assert alone.returncode == 0, alone.stderr
    loaded = json.loads(alone.stdout.strip().splitlines()[-1])
    assert loaded["trainpipe"] == []
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    here = [str(p) for p in mlflow.pyfunc.load_model(uri).predict(rows)]
    assert loaded["predictions"] == here
    ratio = np.where(rows.weight == 0, nan, rows.x1 * rows.x2 / rows.weight)
    expected = np.column_stack([
        rows.booked.dt.month.to_numpy(dtype=float, na_value=nan),
        np.where((rows.x2 > 25) & rows.member, np.log1p(rows.x2), -1),
        ratio])
    np.testing.assert_allclose(np.array(loaded["derived"], dtype=float), expected,
                               equal_nan=True)
