"""The model zoo: pretrained checkpoints shipped inside the package, used by name.

`zoo:NAME` is accepted wherever a checkpoint is (`checkpoint=zoo:NAME` for probe, export, finetune;
`checkpoints=[random,zoo:NAME]` for the probing benchmark); `emfm zoo list` prints one line per
checkpoint, starting with its name. Each entry is a folder `emfm/zoo_models/NAME/` holding a slim
orbax checkpoint (`checkpoints/<step>/`: the encoder's parameters and the record of model,
objective and grey range; no optimiser state), its `MODEL_CARD.md` and an `entry.json`
(one-line description, parameter count, data, recipe, commit).

`emfm.train.publish.publish(run_dir, name, ...)` makes such a folder from a pretraining run.
"""

from __future__ import annotations

import json
from pathlib import Path

from emfm.errors import UserError

PREFIX = "zoo:"
ROOT = Path(__file__).resolve().parent / "zoo_models"


class ZooError(UserError):
    """An unknown zoo name or a broken zoo entry (a ValueError: the CLI prints it as one line)."""


def names() -> list[str]:
    if not ROOT.is_dir():
        return []
    return sorted(p.name for p in ROOT.iterdir() if (p / "entry.json").is_file())


def entry(name: str) -> dict:
    d = path_of(name)
    return json.loads((d / "entry.json").read_text())


def path_of(name: str) -> Path:
    """The run directory of zoo checkpoint `name` (no prefix); a clear error listing the names."""
    d = ROOT / name
    if not name or not (d / "entry.json").is_file():
        known = names()
        raise ZooError(
            f"unknown zoo checkpoint {name!r}; known: {', '.join(known) if known else '(none)'} "
            "(emfm zoo list)"
        )
    if not (d / "checkpoints").is_dir():
        raise ZooError(
            f"zoo checkpoint {name!r}: {d} has no checkpoints/ folder (a broken install?)"
        )
    return d


def is_zoo(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def resolve(spec: str) -> str:
    """`zoo:NAME` -> the packaged run directory; anything else unchanged."""
    if not is_zoo(spec):
        return spec
    return str(path_of(spec[len(PREFIX) :]))


def is_packaged(path: str | Path) -> bool:
    """Whether `path` is a zoo entry's folder (a resolved `zoo:NAME`)."""
    try:
        return bool(path) and Path(path).resolve().parent == ROOT.resolve()
    except OSError:
        return False


def list_lines() -> list[str]:
    out = []
    for n in names():
        e = entry(n)
        out.append(
            f"{n}  {e.get('description', '')}  ({e.get('architecture', '?')}, "
            f"{e.get('params_m', 0):.2f} M parameters, {e.get('size_mb', 0):.1f} MB)"
        )
    return out
