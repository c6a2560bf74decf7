"""Resumable state of `emfm discover`: what decides a job's output (its fingerprint), the k-means
fit and the log of labelled regions, kept in the run directory."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

from emfm.data.volume import VolumeError

STATE_DIR = "discover_state"


def fingerprint(features: str, fv, out: str, **params) -> dict:
    """What decides discover's output: a saved state of another fingerprint is another job."""
    path = str(Path(features).resolve()) if "://" not in features else features
    return json.loads(
        json.dumps(
            {
                "features": path,
                "shape": list(fv.shape),
                "dtype": str(fv.dtype),
                "export": fv.attributes.get("export"),
                "labels": str(out),
                **params,
            }
        )
    )


class DiscoverState:
    """Resumable progress of one discover job in `run_dir/discover_state`: the k-means fit (pickled
    estimator, random generator and carried-over vectors after the last finished region, saved at
    most every `every_s` seconds and at the end of the fit) and one JSON line per labelled region
    whose label chunks are on disk (its counts, inertia and sampled cells), appended once its write
    has finished."""

    def __init__(self, run_dir: Path, fingerprint: dict, *, resume: bool, every_s: float):
        self.dir, self.every_s, self.fp = run_dir / STATE_DIR, every_s, fingerprint
        self.fit_file, self.label_file = self.dir / "fit.pkl", self.dir / "labels.jsonl"
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        fp_file = self.dir / "job.json"
        if fp_file.exists():
            old = json.loads(fp_file.read_text())
            if old != fingerprint:
                keys = sorted(
                    k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)
                )
                raise VolumeError(
                    f"{run_dir} holds an interrupted discover of another job (differs in: "
                    f"{', '.join(keys)}); continuing it would mix two jobs. Use another run_dir "
                    "or resume=false to start over"
                )
        else:
            fp_file.write_text(json.dumps(fingerprint, indent=1))
        self._last = time.monotonic()

    def load_fit(self) -> dict | None:
        if not self.fit_file.exists():
            return None
        with open(self.fit_file, "rb") as f:
            return pickle.load(f)

    def save_fit(self, state: dict, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every_s:
            return
        tmp = self.fit_file.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, self.fit_file)  # atomic: a kill leaves the old state or the new one
        self._last = time.monotonic()

    def labelled(self) -> dict[int, dict]:
        """Records of the regions whose labels are written (a line torn by a kill is dropped)."""
        recs = {}
        if self.label_file.exists():
            for line in self.label_file.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                recs[r["region"]] = r
        return recs

    def open_labels(self):
        """The region log opened for appending, a line torn by a kill cut off first."""
        if self.label_file.exists():
            data = self.label_file.read_bytes()
            if data and not data.endswith(b"\n"):
                self.label_file.write_bytes(data[: data.rfind(b"\n") + 1])
        return open(self.label_file, "a")

    def reset_labels(self) -> None:
        self.label_file.unlink(missing_ok=True)

    def add_label(self, rec: dict, f) -> None:
        f.write(json.dumps(rec) + "\n")
        f.flush()
