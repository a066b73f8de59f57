"""The pipeline's steps, one module each. A step is a plain function
`run(cfg, **inputs) -> (outputs, Report)`: it gets its inputs as values, returns its
outputs as values, and says what to record in a Report. It never touches the lake,
MLflow or the command line: `pipeline.py` and `catalog.py` do that.
"""

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class Report:
    """What a step wants recorded on its MLflow run, plus one line for the terminal."""

    summary: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content
    # More artifacts, made after the step returns (evaluate's plots): the runner starts
    # making them in a thread while the next step works, and records them when they are done.
    later: Callable[[], dict[str, bytes]] | Future | None = None

    def finishing(self) -> "Report":
        """This report with `later` being made in a thread of its own."""
        if not callable(self.later):
            return self
        import threading

        future: Future = Future()

        def work() -> None:
            try:
                future.set_result(self.later())
            except BaseException as exc:  # noqa: BLE001 - raised where the report is recorded
                future.set_exception(exc)

        # Not a daemon: a failed run's exit waits for it (bounded work) rather than tearing
        # down the interpreter under a thread inside matplotlib's C++ (a SIGABRT at exit).
        threading.Thread(target=work, name="trainpipe-later").start()
        return replace(self, later=future)

    def finished(self) -> "Report":
        """This report with `later`'s artifacts made (waited for) and in `artifacts`."""
        if self.later is None:
            return self
        later = self.later.result() if isinstance(self.later, Future) else self.later()
        return replace(self, artifacts=self.artifacts | later, later=None)
