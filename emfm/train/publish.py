"""Publishing a pretraining run to the model zoo (emfm.zoo): a slim checkpoint of the encoder's (and
objective heads') parameters, the checkpoint record, `MODEL_CARD.md` and `entry.json`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from emfm.config.common import ModelConfig
from emfm.config.objective import objective_from_record
from emfm.train import checkpoint as ckpt
from emfm.train.state import build_pretraining_model, load_encoder
from emfm.zoo import ROOT, ZooError


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20


def publish(
    run_dir: str | Path,
    name: str,
    *,
    description: str,
    card: str,
    extra: dict | None = None,
    root: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write zoo entry `name` from the latest checkpoint of pretraining run `run_dir`: the encoder's
    (and objective heads') parameters only, the checkpoint record, `MODEL_CARD.md` and
    `entry.json`."""
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
    model = build_pretraining_model(
        ModelConfig(**meta["model"]), objective_from_record(meta["objective"])
    )
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
    e = {
        "name": name,
        "description": description,
        "architecture": f"{meta['model'].get('name')}",
        "objective": meta["objective"].get("name"),
        "params_m": n_params / 1e6,
        "step": step,
        "source_run": Path(run).name,
        **(extra or {}),
    }
    e["size_mb"] = _dir_mb(dst)
    (dst / "entry.json").write_text(json.dumps(e, indent=1))
    return dst
