"""`trainpipe` with MLflow taken out: the floor that moving tracking off the critical path
could reach at best.

Runs the real CLI with `trainpipe.tracking` replaced by a stand-in that never imports
MLflow: runs are random ids, the model is only pickled (what logging it costs at least),
nothing is recorded. Everything else (config, lake, validation, zones, plots) is real.
For benchmarks only: the output is not a usable run.

    python bench/untracked_trainpipe.py run --force dataset.source=... lake.root=...
"""

import contextlib
import sys
import types
import uuid


class UntrackedTracking:
    def __init__(self, cfg) -> None:
        pass

    @contextlib.contextmanager
    def pipeline_run(self, *args):
        yield uuid.uuid4().hex

    @contextlib.contextmanager
    def step_run(self, *args):
        yield uuid.uuid4().hex

    def log_model(self, model, example, estimator_module: str) -> str:
        import cloudpickle

        cloudpickle.dumps(model)
        return "models:/untracked"

    def artifact_uri(self, run_id: str) -> str:
        return "untracked"

    def __getattr__(self, name: str):  # record, log_sources, log_metrics, set_tags
        return lambda *args, **kwargs: None


def install() -> None:
    from trainpipe.redaction import redact_uri

    stand_in = types.ModuleType("trainpipe.tracking")
    stand_in.Tracking = UntrackedTracking
    stand_in.warm_up = lambda: None
    stand_in.normalise_uri = lambda uri: uri
    stand_in.ui_hint = redact_uri
    sys.modules["trainpipe.tracking"] = stand_in


if __name__ == "__main__":
    install()
    from trainpipe.cli import main

    sys.argv[0] = "trainpipe"
    main()
