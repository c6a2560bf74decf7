"""Dense self-distillation: DINO's teacher-student distillation applied to every location of a
feature map (as iBOT's patch loss, Zhou et al. 2022, and Leopart, Ziegler & Asano 2022), with exact
correspondences between the views.

Both views are made on-device from `batch["image"]`:
- teacher view: the patch with a mild grey-value jitter;
- student view: a random square crop of side `s * H`, s ~ U(`local_crop_scale`), resized back to
  `H x H` (a zoom-in of 1 / s), turned by a random flip / rot90, with its own grey-value jitter and
  a `mask_ratio` fraction of `mim_patch`-pixel squares replaced by the view's mean grey value.
The student's feature map is turned back, and at `dense_samples` of its locations per example
(all of them if fewer) the teacher's features are read at the exactly corresponding position
(bilinear interpolation on the teacher's grid). Both go through the DINO head (MLP, l2-normalised
bottleneck, `prototypes` weight-normalised logits); the teacher's logits are centred (running mean,
`center_momentum`) and sharpened (`teacher_temp`), the student's softened (`student_temp`), and the
loss is their cross-entropy. The teacher is the EMA of the student.

With `mim_weight` > 0 the student also does masked image modelling (emfm/objectives/mim_unet.py):
in a second pass a `mim_mask_ratio` fraction of the plain patch's `mim_patch`-pixel squares is
zeroed, and a 1x1 convolution on the student's features predicts the masked pixels (MSE, targets
normalised by `target_norm`); the loss is the distillation loss plus `mim_weight` x that MSE. The
distillation makes features invariant to grey values, orientation and scale; the reconstruction
keeps in them the pixel detail a per-pixel probe of thin structures (membranes) needs.

With `dense_features="hypercolumn"` (a 2D U-Net) the distilled feature map is not the decoder output
alone but the hypercolumn a probe of `blocks=[0, ..., depth]` reads: every level upsampled to full
resolution and the decoder output, each normalised per pixel (`dense_map`).

So the student must give, for a location it sees magnified, turned, re-contrasted and partly masked,
the same assignment to the prototypes as the teacher gives from the plain view: the assignment
must depend on what is at that location in its context (membrane, organelle, cytoplasm), not on
grey values, orientation, scale or the exact pixels. Works for ViT patch tokens and U-Net pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emfm.errors import UserError
from emfm.models.heads import DINOHead
from emfm.models.unet import upsample
from emfm.objectives.base import ObjectiveDef
from emfm.objectives.contrastive import ContrastiveModel, dihedral, dihedral_codes, photometric
from emfm.objectives.dino import Center
from emfm.objectives.mim_unet import masked_pixel_loss, pixel_head


class Heads(nnx.Module):
    def __init__(self, width: int, cfg, rngs: nnx.Rngs, *, spec=None):
        if cfg.dense_features == "hypercolumn":
            width = sum(spec.widths) + spec.width  # the levels and the decoder output
        self.head = DINOHead(width, cfg.proj_hidden, cfg.proj_dim, cfg.prototypes, rngs=rngs)
        self.center = Center(jnp.zeros((1, cfg.prototypes), jnp.float32))
        # masked image modelling (mim_weight > 0): 1x1 convolution from features to pixels
        self.pred = nnx.data(pixel_head(spec, rngs) if cfg.mim_weight > 0 else None)


def zoom_crops(rng, x, scale: tuple[float, float]):
    """Per example a random square crop of side `s * H` (s ~ U(scale)) of `[b, H, W, c]` (H == W),
    resized (linear, antialiased) back to `H x W`; returns the views and the crops' (y0, x0,
    side)."""
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    ks, ky, kx = jax.random.split(rng, 3)
    side = jax.random.uniform(ks, (b,), minval=scale[0], maxval=scale[1]) * min(h, w)
    y0 = jax.random.uniform(ky, (b,)) * (h - side)
    x0 = jax.random.uniform(kx, (b,)) * (w - side)

    def one(img, s, oy, ox):
        f = h / s
        return jax.image.scale_and_translate(
            img,
            img.shape,
            (0, 1),
            jnp.stack([f, f]),
            jnp.stack([-oy * f, -ox * f]),
            method="linear",
            antialias=True,
        )

    return jax.vmap(one)(x, side, y0, x0), (y0, x0, side)


def mask_squares(rng, x, ratio: float, side: int):
    """Replace a `ratio` fraction of the `side x side` squares of `[b, H, W, c]` by each view's
    mean."""
    if ratio <= 0:
        return x
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    gy, gx = h // side, w // side
    m = jax.random.uniform(rng, (b, gy, gx)) < ratio
    m = jnp.repeat(jnp.repeat(m, side, axis=1), side, axis=2)[..., None]
    m = jnp.pad(m, ((0, 0), (0, h - gy * side), (0, w - gx * side), (0, 0)))
    return jnp.where(m, x.mean(axis=(1, 2, 3), keepdims=True), x)


def bilinear(fmap, gy, gx):
    """Features of `fmap` `[b, G, G, d]` at continuous grid positions `gy`, `gx` `[b, s]` -> `[b, s,
    d]`."""
    take = jax.vmap(lambda f, yy, xx: f[yy, xx])
    return bilinear_at(lambda yy, xx: take(fmap, yy, xx), fmap.shape[1], fmap.shape[2], gy, gx)


def bilinear_at(fetch, gy_size: int, gx_size: int, gy, gx):
    """`bilinear` on a `gy_size x gx_size` grid whose features at integer positions `[b, s]` come
    from `fetch(yy, xx)` -> `[b, s, d]`, so that the grid itself need not be built."""
    gmax_y, gmax_x = gy_size - 1, gx_size - 1
    gy, gx = jnp.clip(gy, 0, gmax_y), jnp.clip(gx, 0, gmax_x)
    y0, x0 = jnp.floor(gy).astype(jnp.int32), jnp.floor(gx).astype(jnp.int32)
    y1, x1 = jnp.minimum(y0 + 1, gmax_y), jnp.minimum(x0 + 1, gmax_x)
    wy, wx = (gy - y0)[..., None], (gx - x0)[..., None]
    return (
        (1 - wy) * (1 - wx) * fetch(y0, x0)
        + (1 - wy) * wx * fetch(y0, x1)
        + wy * (1 - wx) * fetch(y1, x0)
        + wy * wx * fetch(y1, x1)
    )


def stride_of(encoder) -> int:
    return int(encoder.spec.patch_size[-1])


def _unit(f):
    """Per location, zero mean and unit variance over the channels (no parameters)."""
    f = f - f.mean(axis=-1, keepdims=True)
    return f * jax.lax.rsqrt(jnp.mean(f * f, axis=-1, keepdims=True) + 1e-6)


def dense_map(encoder, x, which: str):
    """The feature map `[b, G, G, d]` that is distilled: the encoder's final output, or (a 2D
    U-Net, `which="hypercolumn"`) its levels upsampled (nearest, as the probe's hypercolumn) to
    full resolution and its final output, each normalised per pixel, concatenated."""
    if which == "output":
        return encoder(x)[1]["patch_map"]
    maps = [
        _unit(upsample(f, (x.shape[1] // f.shape[1], x.shape[2] // f.shape[2])))
        for f in hypercolumn_levels(encoder, x)  # the decoder output: factor 1, as it is
    ]
    return jnp.concatenate(maps, axis=-1)


def hypercolumn_levels(encoder, x) -> list:
    """The maps a U-Net's hypercolumn is made of: its levels `[b, H / 2^l, W / 2^l, c_l]` and its
    decoder output `[b, H, W, c]`."""
    _, aux = encoder(x, return_blocks=tuple(range(encoder.spec.depth)))
    return [*(aux["blocks"][lvl] for lvl in range(encoder.spec.depth)), aux["patch_map"]]


def hypercolumn_at(levels: list, size: tuple[int, int], yy, xx):
    """`dense_map(encoder, x, "hypercolumn")[b, yy, xx]` -> `[b, s, d]` for pixel positions `yy`,
    `xx` `[b, s]` of the `size` input, from `hypercolumn_levels(encoder, x)`: each map read at the
    position its nearest upsampling would copy there, normalised per pixel. Equal to building the
    full-resolution hypercolumn and reading it, without the `[b, H, W, d]` map and its gradient
    (d = 256 channels for a width-16 U-Net: most of a training step's time on a CPU)."""
    take = jax.vmap(lambda f, i, j: f[i, j])
    out = []
    for f in levels:
        ry, rx = size[0] // f.shape[1], size[1] // f.shape[2]
        out.append(_unit(take(f, yy // ry, xx // rx)))
    return jnp.concatenate(out, axis=-1)


def dense_dino_loss(encoder, heads: Heads, x, rng, cfg, teacher):
    if teacher is None:
        raise UserError("dino_dense needs the momentum teacher (ObjectiveDef.teacher=True)")
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
        raise UserError(f"dino_dense takes square 2D patches [b, y, x, c]; got {x.shape}")
    kt, kz, kd, kp, km, ks = jax.random.split(rng, 6)
    b, h = x.shape[0], x.shape[1]
    xt = photometric(kt, x, brightness=0.05, contrast=0.1, gamma=0.1, noise=0.01)
    zoomed, (y0, x0, side) = zoom_crops(kz, x, tuple(cfg.local_crop_scale))
    code = dihedral_codes(kd, b, square=True)
    xs = mask_squares(km, photometric(kp, zoomed), cfg.mask_ratio, cfg.mim_patch)
    xs = dihedral(xs, code)
    t_enc, t_heads = teacher
    p = stride_of(encoder)
    g = h // p
    n = g * g
    s = min(cfg.dense_samples, n)
    idx = jnp.argsort(jax.random.uniform(ks, (b, n)), axis=1)[:, :s]  # student cells
    iy, ix = idx // g, idx % g
    # the student cell's centre, in crop pixels -> teacher pixels -> teacher grid coordinates
    f = (side / h)[:, None]
    ty = y0[:, None] + ((iy + 0.5) * p) * f - 0.5
    tx = x0[:, None] + ((ix + 0.5) * p) * f - 0.5
    gy, gx = (ty + 0.5) / p - 0.5, (tx + 0.5) / p - 0.5
    if cfg.dense_features == "hypercolumn":
        # read at the sampled cells only (hypercolumn_at); equal to the full maps below
        size = (x.shape[1], x.shape[2])
        t_lv = jax.lax.stop_gradient(hypercolumn_levels(t_enc, xt))
        s_lv = hypercolumn_levels(encoder, xs)
        # where each cell of the crop's grid lies in the turned view: the turn undone on a grid
        # of coordinates, as it is undone on the feature map
        yx = jnp.stack(jnp.meshgrid(jnp.arange(g), jnp.arange(g), indexing="ij"), axis=-1)
        src = dihedral(jnp.broadcast_to(yx, (b, g, g, 2)), code, inverse=True).reshape(b, n, 2)
        src = jnp.take_along_axis(src, idx[..., None], axis=1)  # [b, s, 2]
        q = hypercolumn_at(s_lv, size, src[..., 0], src[..., 1])  # [b, s, d]
        k = bilinear_at(lambda yy, xx: hypercolumn_at(t_lv, size, yy, xx), g, g, gy, gx)
    else:
        ft = jax.lax.stop_gradient(dense_map(t_enc, xt, cfg.dense_features))  # [b, G, G, d]
        fs = dihedral(dense_map(encoder, xs, cfg.dense_features), code, inverse=True)
        q = jnp.take_along_axis(fs.reshape(b, n, -1), idx[..., None], axis=1)  # [b, s, d]
        k = bilinear(ft, gy, gx)
    d = q.shape[-1]
    s_logits = heads.head(q.reshape(b * s, d))
    t_logits = jax.lax.stop_gradient(t_heads.head(k.reshape(b * s, d)))
    center = heads.center[...]
    t_probs = jax.nn.softmax((t_logits - center) / cfg.teacher_temp, axis=-1)
    value = jnp.mean(
        -jnp.sum(t_probs * jax.nn.log_softmax(s_logits / cfg.student_temp, axis=-1), axis=-1)
    )
    heads.center = Center(
        center * cfg.center_momentum
        + t_logits.mean(axis=0, keepdims=True) * (1 - cfg.center_momentum)
    )
    entropy = -jnp.mean(jnp.sum(t_probs * jnp.log(t_probs + 1e-12), axis=-1))
    used = jnp.mean(t_probs, axis=0)
    # perplexity of the teacher's mean assignment: how many prototypes are in use (collapse -> 1)
    metrics = {
        "loss": value,
        "teacher_entropy": entropy,
        "prototypes_used": jnp.exp(-jnp.sum(used * jnp.log(used + 1e-12))),
    }
    return value, metrics


def loss(model, batch: dict, rng, cfg, teacher=None):
    t = None if teacher is None else (teacher.encoder, teacher.heads)
    x = batch["image"]
    value, metrics = dense_dino_loss(model.encoder, model.heads, x, rng, cfg, t)
    if cfg.mim_weight > 0:
        pred, k_mim = model.heads.pred, jax.random.fold_in(rng, 1)
        l_mim, _ = masked_pixel_loss(
            lambda v: pred(model.encoder(v)[1]["patch_map"]), x, k_mim, cfg, cfg.mim_mask_ratio
        )
        metrics = {**metrics, "dino_loss": value, "mim_loss": l_mim}
        value = value + cfg.mim_weight * l_mim
        metrics["loss"] = value
    return value, metrics


def build(encoder, cfg, rngs: nnx.Rngs) -> ContrastiveModel:
    if cfg.dense_features == "hypercolumn" and (
        encoder.spec.patch_size[-1] != 1 or len(encoder.spec.patch_size) != 2
    ):
        raise UserError(
            "objective.dense_features=hypercolumn distils the levels of a 2D U-Net; use "
            "dense_features=output for a patch encoder or a 3D model"
        )
    if cfg.mim_weight > 0 and encoder.spec.patch_size[-1] != 1:
        raise UserError(
            f"objective.mim_weight={cfg.mim_weight}: masked image modelling here predicts pixels "
            "from per-pixel features (a U-Net); use mim_weight=0 for a patch encoder"
        )
    return ContrastiveModel(encoder, Heads(encoder.spec.width, cfg, rngs, spec=encoder.spec))


DEFINITION = ObjectiveDef(name="dino_dense", build=build, loss=loss, views=1, teacher=True)
