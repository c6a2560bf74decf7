"""Run-directory logging: metrics as JSONL and TensorBoard events, and a progress bar."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("emfm")


class MetricWriter:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._f = open(self.dir / "metrics.jsonl", "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))

    def write(self, step: int, metrics: dict) -> None:
        rec = {"step": int(step), "time": time.time()}
        rec.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True, **kw):
    """A progress bar; when stderr is not a terminal (a log file under a scheduler) it writes at
    most one line every 30 s (EMFM_PROGRESS_INTERVAL seconds)."""
    import os
    import sys

    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    interval = 1.0 if tty else float(os.environ.get("EMFM_PROGRESS_INTERVAL", 30.0))
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=interval,
        maxinterval=max(interval, 10.0),
        smoothing=0.1,
        **kw,
    )
