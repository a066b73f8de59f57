"""deferred.py: imports that wait for their first use, during an unchanged run's check."""

import subprocess
import sys

import pytest

CHECK = """
import sys
from trainpipe import deferred

with deferred.imports_deferred():
    import pandas as pd
    import pyarrow
    from trainpipe import coerce
    assert type(pd).__name__ == "_Shell" and "pandas.core.frame" not in sys.modules
    {use}
    assert "numpy.linalg" in sys.modules and "pandas.core.frame" in sys.modules
# one copy of each module: numpy loaded first, before anything imports its submodules
import numpy
assert sys.modules["numpy._core"] is numpy._core, "numpy._core loaded twice"
assert sys.modules["pyarrow.lib"] is pyarrow.lib
table = pyarrow.Table.from_pandas(pd.DataFrame({{"a": [1, 2]}}))
assert table.num_rows == 2 and coerce.NA_VALUES == ("",)
import sklearn.ensemble  # a library importing numpy's submodules, after the shells loaded
print("ok")
"""


@pytest.mark.parametrize("use", ["pyarrow.__version__", "coerce.TRUE_VALUES",
                                 "pd.DataFrame", "deferred.load_now()"])
def test_any_first_use_loads_every_deferred_module_in_order(use):
    """pyarrow's first use loads numpy first (else pyarrow's `import numpy._core...`
    would load numpy through a submodule, twice); any first use loads them all."""
    done = subprocess.run([sys.executable, "-c", CHECK.format(use=use)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_outside_the_window_imports_are_as_usual():
    code = ("from trainpipe import deferred\nwith deferred.imports_deferred():\n    pass\n"
            "import pandas\nassert type(pandas).__name__ == 'module'\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
