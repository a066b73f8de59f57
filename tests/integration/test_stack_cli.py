"""`trainpipe stack up | status | down` from the command line, with a cluster of its own."""

import pytest
from integration_support import make_reachable_folder, remove_folder, unavailable

from tests.conftest import trainpipe
from trainpipe import stack
from trainpipe.errors import ConfigError

pytestmark = pytest.mark.slow  # runs the pipeline end to end: not in the quick command


def test_stack_commands(tmp_path, own_folder_or_skip):
    folder = own_folder_or_skip
    up = trainpipe("stack", "up", "--folder", str(folder), "--port", "0", cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        assert "started: postgresql, mlflow" in up.stdout
        assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:" in up.stdout
        again = trainpipe("stack", "up", "--folder", str(folder), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "reused: " in again.stdout and "started: nothing" in again.stdout
        status = trainpipe("stack", "status", "--folder", str(folder), cwd=tmp_path)
        assert status.returncode == 0
        assert "✓ postgresql" in status.stdout and "✓ mlflow" in status.stdout
        password = (folder / "postgres" / "password").read_text().strip()
        shown = "".join(r.stdout + r.stderr for r in (up, again, status))
        assert password and password not in shown
    finally:
        down = trainpipe("stack", "down", "--folder", str(folder), cwd=tmp_path)
    assert down.returncode == 0
    assert "stopped mlflow server" in down.stdout and "stopped postgresql" in down.stdout
    status = trainpipe("stack", "status", "--folder", str(folder), cwd=tmp_path)
    assert status.returncode == 1 and "✗ mlflow" in status.stdout


@pytest.fixture
def own_folder_or_skip():
    """A stack folder the user `postgres` can reach (tests run as root)."""
    try:
        stack._pg_program("initdb")  # where `stack up` itself looks for it
    except ConfigError:
        unavailable("initdb is not installed: the stack's own cluster cannot be tested")
    folder = make_reachable_folder("trainpipe-stack-cli-")
    yield folder / "stack"
    remove_folder(folder)
