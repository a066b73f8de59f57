"""`trainpipe clean`: remove published outputs from the lake, safely.

Only step outputs are touched, never the raw zone. An output is retracted manifest
first, so no reader trusts files that are about to go. Attempt folders no manifest
names (a crashed or out-raced writer) are removed once they are an hour old, so a
writer still at work is never disturbed.
"""

import posixpath
import time

from omegaconf import DictConfig

from trainpipe.catalog import output_base
from trainpipe.errors import ConfigError
from trainpipe.lake import Lake
from trainpipe.pipeline import STEP_NAMES, ZONES

ABANDONED_AFTER = 3600  # seconds


def clean(cfg: DictConfig, step: str | None, keep: int) -> list[str]:
    if step is not None and step not in ZONES:
        what = "publishes nothing" if step in STEP_NAMES else "is not a step"
        raise ConfigError(f"--step {step}: {what}; steps with published outputs: "
                          f"{', '.join(ZONES)}")
    if keep < 0:
        raise ConfigError(f"--keep {keep}: must be 0 or more")
    lake = Lake(cfg.lake.root)
    removed = []
    for name in [step] if step else list(ZONES):
        outputs = lake.outputs(output_base(cfg.dataset.name, name, ZONES[name]))
        published = sorted(((m["created"], p) for p, m in outputs if m), reverse=True)
        for _, prefix in published[keep:]:
            lake.remove(prefix)
            removed.append(lake.url(prefix))
        for prefix, manifest in outputs:
            if (manifest is None or prefix in {p for _, p in published[:keep]}):
                removed += _abandoned_attempts(lake, prefix, manifest)
    return removed


def _abandoned_attempts(lake: Lake, prefix: str, manifest: dict | None) -> list[str]:
    in_use = {f["path"].split("/")[0] for f in (manifest or {}).get("files", {}).values()}
    removed = []
    for attempt, _ in lake.outputs(prefix):
        name = posixpath.basename(attempt)
        if name in in_use:
            continue
        try:
            started = time.mktime(time.strptime(name.split("-")[0], "%Y%m%dT%H%M%S"))
        except ValueError:
            continue  # not an attempt folder
        if time.mktime(time.gmtime()) - started > ABANDONED_AFTER:
            lake.remove(attempt)
            removed.append(lake.url(attempt))
    return removed
