"""The model zoo: pretrained checkpoints shipped inside the package, used by name.

`zoo:NAME` is accepted wherever a checkpoint is (`checkpoint=zoo:NAME` for probe, export, finetune;
`checkpoints=[random,zoo:NAME]` for the probing benchmark); `emfm zoo list` prints one line per
checkpoint, starting with its name. Each entry is a folder `emfm/zoo_models/NAME/` holding a slim
orbax checkpoint (`checkpoints/<step>/`: the encoder's parameters and the record of model,
objective and grey range; no optimiser state), its `MODEL_CARD.md` and an `entry.json`
(one-line description, parameter count, data, recipe, commit).

`publish(run_dir, name, ...)` makes such a folder from a pretraining run.
"""
from __future__ import annotations

import json
import shutil
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
        raise ZooError(f"unknown zoo checkpoint {name!r}; known: {', '.join(known) if known else '(none)'} "
                       "(emfm zoo list)")
    if not (d / "checkpoints").is_dir():
        raise ZooError(f"zoo checkpoint {name!r}: {d} has no checkpoints/ folder (a broken install?)")
    return d


def is_zoo(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def resolve(spec: str) -> str:
    """`zoo:NAME` -> the packaged run directory; anything else unchanged."""
    if not is_zoo(spec):
        return spec
    return str(path_of(spec[len(PREFIX):]))


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
        out.append(f"{n}  {e.get('description', '')}  ({e.get('architecture', '?')}, "
                   f"{e.get('params_m', 0):.2f} M parameters, {e.get('size_mb', 0):.1f} MB)")
    return out


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20


def publish(run_dir: str | Path, name: str, *, description: str, card: str, extra: dict | None = None,
            root: Path | None = None, overwrite: bool = False) -> Path:
    """Write zoo entry `name` from the latest checkpoint of pretraining run `run_dir`: the encoder's
    (and objective heads') parameters only, the checkpoint record, `MODEL_CARD.md` and `entry.json`."""
    import jax
    from flax import nnx

    from emfm.config.schema import ModelConfig, ObjectiveConfig
    from emfm.train import checkpoint as ckpt
    from emfm.train.state import build_pretraining_model, load_encoder

    if not name or "/" in name or name.startswith("."):
        raise ZooError(f"zoo name {name!r}: a plain folder name")
    dst = (root or ROOT) / name
    if dst.exists():
        if not overwrite:
            raise ZooError(f"zoo entry {dst} exists (overwrite=True replaces it)")
        shutil.rmtree(dst)
    run = ckpt.find_checkpoint_dir(run_dir)
    meta = ckpt.read_meta(run)
    encoder, _ = load_encoder(str(run))
    model = build_pretraining_model(ModelConfig(**meta["model"]), ObjectiveConfig(**meta["objective"]))
    model.encoder = encoder  # heads are not needed by any consumer; the encoder's weights are
    params = nnx.state(model, nnx.Param)
    src = ckpt.manager(run, create=False)
    step = int(src.latest_step())
    src.close()
    mngr = ckpt.manager(dst, keep=1)
    ckpt.save(mngr, step, {"params": params}, meta, force=True)
    mngr.wait_until_finished()
    mngr.close()
    for f in dst.rglob("commit_success.txt"):  # orbax's markers name the absolute path it wrote to
        f.unlink()
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(encoder, nnx.Param)))
    (dst / "MODEL_CARD.md").write_text(card)
    e = {"name": name, "description": description, "architecture": f"{meta['model'].get('name')}",
         "objective": meta["objective"].get("name"), "params_m": n_params / 1e6, "step": step,
         "source_run": Path(run).name, **(extra or {})}
    e["size_mb"] = _dir_mb(dst)
    (dst / "entry.json").write_text(json.dumps(e, indent=1))
    return dst
