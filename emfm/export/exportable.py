"""What `emfm export-model` exports: a checkpoint's model as a JAX forward function over normalised
channels-first tiles, with what a consumer needs to know about it (emfm.export.model describes the
formats), and the tiles of the bundled sample every export is checked on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emfm.errors import UserError

DEFAULT_TILE_2D = (256, 256)
DEFAULT_TILE_3D = (16, 128, 128)
# a held-out section of the bundled ISBI sample (finetune's test sections are 20-29)
SAMPLE_SECTION = 25


@dataclass
class Exportable:
    """A model ready to export: `forward(x [b, 1, *tile]) -> [b, c, *out]` (jax, channels first)."""

    kind: str  # "encoder" | "segmentation"
    name: str
    checkpoint: str  # as given (zoo:NAME or a run directory)
    run_dir: Path  # the resolved directory
    meta: dict
    model: Any
    ndim: int
    tile: tuple[int, ...]  # spatial input shape (z, y, x) or (y, x)
    out_stride: tuple[int, ...]  # input voxels per output cell, per spatial axis
    channel_names: list[str]
    grey_range: tuple[float, float]
    architecture: str  # "unet" | "vit"
    is_zoo: bool
    forward: Callable = field(repr=False, default=None)

    @property
    def out_tile(self) -> tuple[int, ...]:
        return tuple(t // s for t, s in zip(self.tile, self.out_stride))


def _alignment(model) -> tuple[int, ...]:
    spec = model.spec
    return tuple(spec.total_pool()) if hasattr(model, "decode") else tuple(spec.patch_size)


def parse_shape(shape: str | Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    """`"1,1,256,256"` (or a sequence) -> the spatial tile `(256, 256)`; None stays None."""
    if shape is None or shape == "":
        return None
    try:
        dims = [
            int(s)
            for s in (shape.replace("x", ",").split(",") if isinstance(shape, str) else shape)
        ]
    except ValueError:
        raise UserError(f"shape={shape!r}: give whole numbers, e.g. shape=1,1,256,256") from None
    want = 2 + ndim
    if len(dims) != want:
        ex = "1,1,256,256" if ndim == 2 else "1,1,16,128,128"
        raise UserError(
            f"shape={shape!r}: a {ndim}D model takes {want} numbers "
            f"[batch, channel, {'z, ' if ndim == 3 else ''}y, x], e.g. shape={ex}"
        )
    if dims[1] != 1:
        raise UserError(
            f"shape={shape!r}: emfm models take one grey channel (the second number must be 1)"
        )
    if dims[0] < 1 or any(d < 1 for d in dims[2:]):
        raise UserError(f"shape={shape!r}: sizes must be positive")
    return tuple(dims[2:])


def load_exportable(checkpoint: str, *, shape: str | Sequence[int] | None = None) -> Exportable:
    """The model of `checkpoint` (zoo:NAME, a pretraining run or an `emfm finetune` run) and its jax
    forward function over `[batch, 1, *tile]` normalised images."""
    from emfm import zoo
    from emfm.train import checkpoint as ckpt

    if not checkpoint:
        raise UserError(
            "export-model needs checkpoint=RUN_DIR (a pretraining or finetune run) or "
            "checkpoint=zoo:NAME"
        )
    is_zoo = zoo.is_zoo(checkpoint)
    resolved = zoo.resolve(checkpoint)
    run = Path(ckpt.find_checkpoint_dir(resolved))
    meta = ckpt.read_meta(str(run))
    seg = "task" in meta and "head" in meta
    model, enc, meta, head = _load_segmentation(run) if seg else _load_encoder(run)
    grey = meta.get("grey_range")
    if not grey or len(grey) != 2 or not float(grey[1]) > float(grey[0]):
        raise UserError(
            f"checkpoint {checkpoint}: no usable grey_range in its record ({grey!r}); the exported "
            "model's normalisation would be unknown"
        )
    ndim = enc.spec.ndim
    is_unet = hasattr(enc, "decode")
    tile = _tile(enc, shape, checkpoint)
    if seg or is_unet:
        stride = (1,) * ndim
    else:
        stride = tuple(int(p) for p in enc.spec.patch_size)
    if seg:
        names, layout = head
    else:
        width = enc.spec.widths[0] if is_unet else enc.spec.width
        names, layout = [f"feature_{i}" for i in range(width)], None
    name = checkpoint[len(zoo.PREFIX) :] if is_zoo else Path(resolved).resolve().name
    return Exportable(
        kind="segmentation" if seg else "encoder",
        name=name,
        checkpoint=checkpoint,
        run_dir=Path(resolved),
        meta=meta,
        model=model,
        ndim=ndim,
        tile=tuple(tile),
        out_stride=stride,
        channel_names=list(names),
        grey_range=(float(grey[0]), float(grey[1])),
        architecture="unet" if is_unet else "vit",
        is_zoo=is_zoo,
        forward=_forward(model, ndim, layout),
    )


def _load_segmentation(run: Path):
    """A fine-tuned model: (model, its encoder, its record, (channel names, output layout))."""
    from emfm.config.finetune import SegTaskConfig
    from emfm.finetune import targets
    from emfm.finetune.model import load_seg_model

    model, meta = load_seg_model(str(run))
    enc = model.encoder
    task = SegTaskConfig(**meta["task"])
    ndim = enc.spec.ndim
    return model, enc, meta, (targets.channel_names(task, ndim), targets.layout(task, ndim))


def _load_encoder(run: Path):
    """A pretrained encoder: (model, the same encoder, its record, None)."""
    from emfm.train.state import load_encoder

    model, meta = load_encoder(str(run))
    return model, model, meta, None


def _tile(enc, shape, checkpoint: str) -> tuple[int, ...]:
    """The spatial input tile: `shape`'s or the default, a multiple of the encoder's alignment."""
    ndim = enc.spec.ndim
    is_unet = hasattr(enc, "decode")
    align = _alignment(enc)
    tile = parse_shape(shape, ndim) or (DEFAULT_TILE_2D if ndim == 2 else DEFAULT_TILE_3D)
    if any(t % a for t, a in zip(tile, align)):
        raise UserError(
            f"shape: spatial tile {tile} must be a multiple of {align}, the "
            f"{'pooling' if is_unet else 'patch size'} of checkpoint {checkpoint}"
        )
    return tile


def _forward(model, ndim: int, layout) -> Callable:
    """`forward(x [b, 1, *tile]) -> [b, c, *out]` float32: the probabilities of a segmentation
    model (`layout` given), else the encoder's patch map; channels first on both sides."""
    import jax.numpy as jnp
    from flax import nnx

    if layout is not None:
        from emfm.finetune.losses import probabilities

    graphdef, state = nnx.split(model)
    to_last = (0, *range(2, 2 + ndim), 1)
    to_first = (0, ndim + 1, *range(1, ndim + 1))

    def forward(x):
        m = nnx.merge(graphdef, state)
        xin = jnp.transpose(x, to_last)
        if layout is not None:
            out = probabilities(m(xin), layout)
        else:
            out = m(xin)[1]["patch_map"]
        return jnp.transpose(out.astype(jnp.float32), to_first)

    return forward


def sample_tiles(tile: Sequence[int], n: int = 1) -> np.ndarray:
    """`n` raw tiles `[n, 1, *tile]` (the sample's dtype) of the bundled ISBI 2012 sample, from its
    held-out sections (section 25 on for 2D tiles; the last `z` sections for 3D tiles), mirrored
    where the tile is larger than the sample."""
    from emfm.data import bundled
    from emfm.data.volume import open_volume

    vol = open_volume(bundled.sample_raw())
    zn, yn, xn = vol.spatial_shape
    tiles = []
    for i in range(n):
        if len(tile) == 2:
            z = min(SAMPLE_SECTION + i, zn - 1)
            box = (slice(z, z + 1), slice(0, min(tile[0], yn)), slice(0, min(tile[1], xn)))
            want = (1, *tile)
        else:
            d = min(tile[0], zn)
            z0 = max(0, zn - d - i)
            box = (slice(z0, z0 + d), slice(0, min(tile[1], yn)), slice(0, min(tile[2], xn)))
            want = tuple(tile)
        a = np.asarray(vol.read(box))
        pad = [(0, w - s) for w, s in zip(want, a.shape)]
        if any(p[1] for p in pad):
            a = np.pad(a, pad, mode="symmetric")
        tiles.append(a)
    out = np.stack(tiles)  # [n, 1, y, x] (2D: the section axis is the channel) or [n, z, y, x]
    return out if len(tile) == 2 else out[:, None]


def normalise(raw: np.ndarray, grey_range: tuple[float, float]) -> np.ndarray:
    """emfm's normalisation (emfm.export.encode.normalise): linear to [0, 1] by the grey range,
    clipped."""
    from emfm.export.encode import normalise as _normalise

    return _normalise(raw, grey_range)
