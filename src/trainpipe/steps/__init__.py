"""The pipeline's steps, one module each. A step is a plain function
`run(cfg, **inputs) -> (outputs, Report)`: it gets its inputs as values, returns its
outputs as values, and says what to record in a Report. It never touches the lake,
MLflow or the command line: `pipeline.py` and `catalog.py` do that.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    """What a step wants recorded on its MLflow run, plus one line for the terminal."""

    summary: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content
