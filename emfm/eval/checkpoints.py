"""Checkpoints of the probing benchmark: `random` (an architecture freshly initialised), a run
directory (its latest checkpoint), a sweep directory (each run below it) or a zoo name, each with a
unique name and an identity (a hash of its checkpoint's content, or of the architecture and seed)
that keys the benchmark's cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from emfm.config.common import ConfigError, ModelConfig
from emfm.train import checkpoint as ckpt

RANDOM = "random"


@dataclass
class Checkpoint:
    name: str
    identity: str  # content hash
    model: dict  # ModelConfig fields
    run_dir: str = ""  # "" = random init
    seed: int = 0
    _encoder: object = field(default=None, repr=False)

    def encoder(self):
        if self._encoder is None:
            from emfm.train.state import build_encoder, load_encoder

            if self.run_dir:
                self._encoder, _ = load_encoder(self.run_dir)
            else:
                self._encoder = build_encoder(ModelConfig(**self.model), seed=self.seed)
        return self._encoder


def key_hash(*parts) -> str:
    """A short hash of JSON-able parts: the key of a cache entry."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _latest_step_dir(run: Path) -> Path:
    steps = sorted(
        (int(p.name), p) for p in (run / "checkpoints").iterdir() if p.name.isdigit() and p.is_dir()
    )
    if not steps:
        raise ckpt.CheckpointError(
            f"checkpoint {run}: no finished checkpoint in {run / 'checkpoints'}"
        )
    return steps[-1][1]


def content_hash(run: Path) -> str:
    """sha256 of the files of a run's latest checkpoint (parameters, optimiser state, record)."""
    d = _latest_step_dir(run)
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != "commit_success.txt"):
        h.update(str(f.relative_to(d)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _runs_below(p: Path) -> list[Path]:
    return sorted({c.parent for c in p.rglob("checkpoints") if c.is_dir()})


def expand_checkpoints(
    entries: list[str], model: ModelConfig, random_seed: int = 1000
) -> list[Checkpoint]:
    """`random`, run directories, sweep directories and zoo names -> checkpoints, each named
    uniquely (`random`: the architecture of each other checkpoint, or `model` when there is
    none)."""
    if not entries:
        raise ConfigError("checkpoints=[]: give run directories, sweep directories and/or random")
    out, seen = [], set()
    for name, run in _runs(entries):
        meta = ckpt.read_meta(str(run))
        if "model" not in meta:
            raise ckpt.CheckpointError(f"checkpoint in {run} has no model record")
        base, k = name, 1
        while name in seen:
            k += 1
            name = f"{base}~{k}"
        seen.add(name)
        try:
            # defaults filled in: comparable
            model_dict = dataclasses.asdict(ModelConfig(**meta["model"]))
        except TypeError as e:
            raise ckpt.CheckpointError(
                f"checkpoint in {run} has an unusable model record: {e}"
            ) from None
        out.append(
            Checkpoint(name=name, identity=content_hash(run), model=model_dict, run_dir=str(run))
        )
    if RANDOM in entries:
        archs = {json.dumps(c.model, sort_keys=True): c.model for c in out} or {
            "": dataclasses.asdict(model)
        }
        for m in archs.values():
            name = (
                RANDOM
                if len(archs) == 1
                else f"{RANDOM}:{out[[c.model for c in out].index(m)].name}"
            )
            out.append(
                Checkpoint(
                    name=name,
                    identity=key_hash("random", m, random_seed),
                    model=m,
                    seed=random_seed,
                )
            )
    return out


def _runs(entries: list[str]) -> list[tuple[str, Path]]:
    """(name, run directory) of each checkpoint entry other than `random`: a zoo checkpoint named
    as given, a run by its directory's name, each run below a sweep directory by its path."""
    from emfm import zoo

    runs: list[tuple[str, Path]] = []
    for e in entries:
        if e == RANDOM:
            continue
        if zoo.is_zoo(e):  # a packaged checkpoint, named as given
            try:
                runs.append((e, Path(zoo.resolve(e))))
            except zoo.ZooError as err:
                raise ConfigError(f"checkpoints: {err}") from None
            continue
        p = Path(e)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint path not found: {p}")
        if (p / "checkpoints").is_dir() or p.name == "checkpoints":
            p = p if (p / "checkpoints").is_dir() else p.parent
            runs.append((p.name, p))
            continue
        below = _runs_below(p)
        if not below:
            raise ckpt.CheckpointError(
                f"checkpoint {p} is not a run (no checkpoints/ folder) and no run lies below it"
            )
        runs += [(f"{p.name}/{r.relative_to(p)}", r) for r in below]
    return runs


def seeded_random(c: Checkpoint, seed: int) -> Checkpoint:
    """Seed `seed`'s network of a random-init checkpoint (its own initialisation); others unchanged.
    Seed 0 is the checkpoint itself, so the cache of a run with one network stays valid."""
    if c.run_dir or seed == 0:
        return c
    return Checkpoint(
        name=c.name,
        identity=key_hash("random", c.model, c.seed + seed),
        model=c.model,
        seed=c.seed + seed,
    )
