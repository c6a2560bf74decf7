"""The segmentation model of `emfm finetune`: an encoder (pretrained, shrunk-and-perturbed, or
fresh) with a task head (emfm.models.seg_heads), and loading a finetuned run's model."""

from __future__ import annotations

import logging

import jax
from flax import nnx

from emfm.config.common import ModelConfig
from emfm.config.finetune import FinetuneConfig, HeadConfig, SegTaskConfig
from emfm.data import bundled
from emfm.data.volume import open_volume
from emfm.errors import UserError
from emfm.finetune import targets
from emfm.models.seg_heads import SegModel, build_head
from emfm.train import checkpoint
from emfm.train.state import build_encoder, load_encoder, rest_state

log = logging.getLogger("emfm")


def build_model(
    model_cfg: ModelConfig,
    head_cfg: HeadConfig,
    task: SegTaskConfig,
    *,
    seed: int = 0,
    encoder=None,
):
    enc = encoder if encoder is not None else build_encoder(model_cfg, seed=seed)
    lay = targets.layout(task, enc.spec.ndim)
    head = build_head(
        head_cfg.name,
        enc,
        out=lay.channels,
        width=head_cfg.width,
        blocks=head_cfg.blocks,
        seed=seed,
    )
    return SegModel(enc, head)


def init_model(cfg: FinetuneConfig) -> tuple[SegModel, ModelConfig, tuple | None]:
    """The model to train: a pretrained encoder (`checkpoint`, whose architecture wins over
    `model`) or a fresh one, plus a new head; and the checkpoint's grey range, if any."""
    r, seed = cfg.regime, cfg.trainer.seed
    mixed = r.shrink != 1.0 or r.perturb != 0.0  # shrink and perturb the start
    if r.init == "pretrained":
        enc, mcfg, grey = _pretrained_encoder(cfg)
    else:
        # the control of a shrink-and-perturb start: the same mix with a second random network
        # standing in for the pretrained one (same parameter scales, no pretraining)
        mcfg, grey = cfg.model, None
        enc = build_encoder(mcfg, seed=seed + 10007) if mixed else None
    if mixed:
        enc = shrink_perturb(enc, build_encoder(mcfg, seed=seed), r.shrink, r.perturb)
        log.info(
            "encoder: shrink %.2f x %s + perturb %.2f x fresh init", r.shrink, r.init, r.perturb
        )
    return build_model(mcfg, cfg.head, cfg.task, seed=seed, encoder=enc), mcfg, grey


def _pretrained_encoder(cfg: FinetuneConfig) -> tuple[nnx.Module, ModelConfig, tuple | None]:
    """The checkpoint's encoder (with its U-Net decoder afresh under `regime.reinit_decoder`), its
    model config, and its grey range where the data are those it was pretrained on."""
    enc, meta = load_encoder(cfg.checkpoint)
    mcfg = ModelConfig(**meta["model"])
    log.info("encoder: pretrained %s from %s", mcfg.name, cfg.checkpoint)
    # the pretraining normalisation where the data are the same, else the new data's own range
    same = (
        meta.get("grey_range")
        and meta.get("data_path")
        == open_volume(bundled.resolve(cfg.data.path, bundled.sample_raw())).path
    )
    grey = tuple(meta["grey_range"]) if same else None
    if cfg.regime.reinit_decoder:
        if type(enc).__name__ != "UNet":
            raise UserError(
                f"regime.reinit_decoder=true needs a U-Net checkpoint; {cfg.checkpoint} holds a "
                f"{mcfg.name} encoder"
            )
        fresh = build_encoder(mcfg, seed=cfg.trainer.seed)  # the same U-Net, freshly initialised
        enc.up_proj, enc.up, enc.norm = fresh.up_proj, fresh.up, fresh.norm
        log.info("encoder: pretrained U-Net levels, decoder initialised afresh")
    return enc, mcfg, grey


def shrink_perturb(
    pretrained: nnx.Module, fresh: nnx.Module, shrink: float, perturb: float
) -> nnx.Module:
    """`shrink * pretrained + perturb * fresh` for every parameter (Ash & Adams 2020, "On
    warm-starting neural network training"); other state is the pretrained one's."""
    graphdef, p_pre, rest = nnx.split(pretrained, nnx.Param, ...)
    p_new = nnx.state(fresh, nnx.Param)
    mixed = jax.tree.map(lambda a, b: shrink * a + perturb * b, p_pre, p_new)
    return nnx.merge(graphdef, mixed, rest)


def load_seg_model(run_dir: str) -> tuple[SegModel, dict]:
    """A finetuned model (latest checkpoint of an `emfm finetune` run) and its meta record."""
    import orbax.checkpoint as ocp

    run_dir = str(checkpoint.find_checkpoint_dir(run_dir))
    meta = checkpoint.read_meta(run_dir)
    if "task" not in meta or "head" not in meta:
        raise checkpoint.CheckpointError(
            f"checkpoint in {run_dir} is not a segmentation model (emfm finetune run)"
        )
    mcfg, hcfg, tcfg = (
        ModelConfig(**meta["model"]),
        HeadConfig(**meta["head"]),
        SegTaskConfig(**meta["task"]),
    )
    abstract = nnx.eval_shape(lambda: build_model(mcfg, hcfg, tcfg))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    mngr = checkpoint.manager(run_dir, create=False)
    restored = mngr.restore(
        mngr.latest_step(),
        args=ocp.args.Composite(state=checkpoint.params_restore_args(abstract_params)),
    )
    mngr.close()
    return nnx.merge(graphdef, restored.state["params"], rest_state(abstract)), meta
