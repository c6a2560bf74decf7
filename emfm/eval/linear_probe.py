"""The main job's membrane probe: per-pixel class logits, linear in frozen token features of whole
sections (the probing benchmark's probes: emfm.eval.probes).

Input: feature maps `[n, gy, gx, d]` of sections `[n, y, x]` (one token covers `sy x sx` pixels),
standardised with the training sections' mean/std, and the labels of the training sections.
`train_linear_probe` fits one linear map per token, `d -> k` with its logits upsampled bilinearly to
pixels (a linear map commutes with bilinear upsampling, so this equals upsampling the features to
pixels first, at a fraction of the memory), or `d -> sy*sx*k` ("subpixel": the logits of every
pixel the token covers), with AdamW on random mini-batches of whole sections, class-balanced.
`LinearProbe.predict` gives per-pixel class probabilities of other sections.

Features whose channel groups were nearest-upsampled from coarser grids (a U-Net's level
hypercolumn: level l repeated over 2^l x 2^l pixels) can be given with their `groups`
(emfm.export.encode.feature_groups): training then reads each group on its own grid and repeats
its logits instead (a linear map commutes with nearest upsampling), the same probe on the same
windows for a fraction of the memory traffic (a U-Net's 256-channel hypercolumn: 5.6x fewer
values per window).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange

from emfm.data.volume import VolumeError
from emfm.errors import UserError

log = logging.getLogger("emfm")

UPSAMPLING = ("bilinear", "subpixel")


@dataclass
class LinearProbe:
    """Per-pixel class logits, linear in the standardised token features.

    "bilinear": one logit vector per token, upsampled bilinearly to pixels (equal to upsampling
    the features, since both maps are linear). "subpixel": each token's linear map gives the logits
    of every pixel it covers (`d -> s*s*k`, s = pixels per token), so a membrane can be placed
    inside a patch; still one linear classifier on the frozen features.
    """

    w: np.ndarray  # [d, k] or [d, s*s*k]
    b: np.ndarray
    mean: np.ndarray  # feature standardisation [d]
    std: np.ndarray
    upsample: str = "bilinear"
    num_classes: int = 2

    def logits(self, feats: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
        f = feats - self.mean
        f /= self.std
        return np.asarray(
            _pixel_logits(
                {"w": self.w, "b": self.b},
                jax.device_put(f),
                out_shape,
                self.upsample,
                self.num_classes,
            )
        )

    def predict(self, feats: np.ndarray, out_shape: tuple[int, int], batch: int = 8) -> np.ndarray:
        """Per-pixel class probabilities `[n, y, x, k]`."""
        return np.concatenate(
            [
                np.asarray(jax.nn.softmax(self.logits(feats[i : i + batch], out_shape), axis=-1))
                for i in range(0, len(feats), batch)
            ]
        )


def _pixel_logits(p, f, out_shape, upsample: str, k: int):
    g = jnp.einsum("nhwd,dk->nhwk", f, p["w"]) + p["b"]
    if upsample == "bilinear":
        return jax.image.resize(g, (g.shape[0], *out_shape, k), method="bilinear")
    sy, sx = -(-out_shape[0] // f.shape[1]), -(-out_shape[1] // f.shape[2])
    full = rearrange(g, "n gy gx (sy sx k) -> n (gy sy) (gx sx) k", sy=sy, sx=sx, k=k)
    return full[:, : out_shape[0], : out_shape[1]]


def train_linear_probe(
    feats: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int = 2,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
    ignore: np.ndarray | None = None,
    class_balance: bool = True,
    upsample: str = "bilinear",
    sections_per_step: int = 4,
    crop: int = 0,
    groups: list[tuple[int, tuple[int, int]]] | None = None,
) -> LinearProbe:
    """Fit per-pixel logits (see LinearProbe) to `labels` `[n, y, x]` (ints < num_classes) with
    AdamW on random mini-batches of `sections_per_step` sections (seeded).

    `crop` > 0: each step takes a random `crop x crop`-pixel window of each of its sections (a
    multiple of the pixels per token), not the whole sections: the same number of steps at a
    fraction of the memory traffic, which is what a probe on wide features (a U-Net's hypercolumn,
    hundreds of channels per pixel) costs on a CPU. 0 = whole sections.

    `groups`: `[(channels, (ry, rx)), ...]` in channel order, each group constant over `ry x rx`
    cells of the feature grid (nearest-upsampled from a grid that many times coarser, aligned to
    cell 0); used when the feature grid is the pixel grid. The result equals that of the dense
    path up to floating-point rounding."""
    if upsample not in UPSAMPLING:
        raise UserError(f"probe upsampling {upsample!r}: use one of {UPSAMPLING}")
    if crop < 0:
        raise UserError(f"probe crop={crop}: must be >= 0 (0 = whole sections)")
    if labels.size == 0 or len(np.unique(labels)) < 2:
        raise VolumeError(
            f"probe labels hold {len(np.unique(labels))} class(es) ({np.unique(labels)}); "
            "a probe needs at least two"
        )
    if groups is not None and _coarse(groups, feats.shape, labels.shape):
        return _train_pyramid(
            feats,
            labels,
            groups,
            num_classes=num_classes,
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            ignore=ignore,
            class_balance=class_balance,
            upsample=upsample,
            sections_per_step=sections_per_step,
            crop=crop,
        )
    mean = feats.mean(axis=(0, 1, 2))
    std = feats.std(axis=(0, 1, 2)) + 1e-6
    # one standardised host copy, moved to the device (jnp.asarray would hold a second transient
    # copy: a U-Net hypercolumn of 16 sections is gigabytes)
    f = feats - mean
    f /= std
    f = jax.device_put(f)
    y = jnp.asarray(labels.astype(np.int32))
    valid = jnp.asarray(_pixel_weights(labels, ignore, num_classes, class_balance))
    out_shape = labels.shape[1:]
    kout = num_classes
    if upsample == "subpixel":
        kout *= -(-out_shape[0] // feats.shape[1]) * -(-out_shape[1] // feats.shape[2])
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    p = {"w": jax.random.normal(sub, (feats.shape[-1], kout)) * 0.01, "b": jnp.zeros(kout)}
    nb = min(sections_per_step, len(feats))
    window = _crop_window(crop, feats.shape[1:3], out_shape) if crop else None

    def batch(f, y, valid, key):
        idx = jax.random.choice(key, f.shape[0], (nb,), replace=False)
        if window is None:
            return f[idx], y[idx], valid[idx], out_shape
        (cy, cx), (sy, sx) = window
        ky, kx = jax.random.split(jax.random.fold_in(key, 1))
        oy = jax.random.randint(ky, (nb,), 0, f.shape[1] - cy + 1)
        ox = jax.random.randint(kx, (nb,), 0, f.shape[2] - cx + 1)

        def cut(i, a, b):
            fb = jax.lax.dynamic_slice(f, (i, a, b, 0), (1, cy, cx, f.shape[3]))[0]
            lab = (i, a * sy, b * sx)
            yb = jax.lax.dynamic_slice(y, lab, (1, cy * sy, cx * sx))[0]
            return fb, yb, jax.lax.dynamic_slice(valid, lab, (1, cy * sy, cx * sx))[0]

        fb, yb, vb = jax.vmap(cut)(idx, oy, ox)
        return fb, yb, vb, (cy * sy, cx * sx)

    def loss_fn(p, data, key):
        fb, yb, vb, shape = batch(*data, key)
        lg = _pixel_logits(p, fb, shape, upsample, num_classes)
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, yb)
        return (ce * vb).sum() / vb.sum()

    w, b = _fit(loss_fn, p, (f, y, valid), key, steps=steps, lr=lr, weight_decay=weight_decay)
    return LinearProbe(w, b, mean, std, upsample=upsample, num_classes=num_classes)


def _fit(loss_fn, p, data, key, *, steps: int, lr: float, weight_decay: float):
    """(w, b) after `steps` AdamW steps (cosine-decayed lr) on `loss_fn(p, data, key)`, the key of
    step i `fold_in(key, i)`; the data are arguments of the jitted step (closed-over arrays of
    gigabytes fold slowly)."""
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

    @jax.jit
    def step(p, opt, data, key):
        loss, g = jax.value_and_grad(loss_fn)(p, data, key)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    opt = tx.init(p)
    for i in range(steps):
        p, opt, loss = step(p, opt, data, jax.random.fold_in(key, i))
    log.debug("probe final training loss %.4f", float(loss))
    return np.asarray(p["w"]), np.asarray(p["b"])


def _coarse(groups, fshape, lshape) -> bool:
    """Whether `groups` describe the channels of features `fshape` on the pixel grid of labels
    `lshape` with at least one coarser group (else the dense path is used)."""
    if sum(c for c, _ in groups) != fshape[-1]:
        raise UserError(
            f"probe feature groups {groups} hold {sum(c for c, _ in groups)} channels; the "
            f"features have {fshape[-1]}"
        )
    if any(r < 1 for _, rr in groups for r in rr):
        raise UserError(f"probe feature groups {groups}: strides must be >= 1")
    return tuple(fshape[1:3]) == tuple(lshape[1:]) and any(r > 1 for _, rr in groups for r in rr)


def _train_pyramid(
    feats,
    labels,
    groups,
    *,
    num_classes,
    steps,
    lr,
    weight_decay,
    seed,
    ignore,
    class_balance,
    upsample,
    sections_per_step,
    crop,
) -> LinearProbe:
    """train_linear_probe on features given as groups of nearest-upsampled channels (see there):
    each group is read on its own grid (every r-th cell), padded by one cell at the far end so
    that a window at any pixel offset can be cut, its logits repeated back to pixels and cut at
    the window's offset inside its first coarse cell. Same initial weights, same random windows
    (the same keys) as the dense path."""
    n, gy, gx, d = feats.shape
    out_shape = labels.shape[1:]
    # channel indices of each distinct stride, in channel order
    starts = np.cumsum([0] + [c for c, _ in groups])
    by_stride: dict = {}
    for (c, rr), a in zip(groups, starts):
        by_stride.setdefault(tuple(int(r) for r in rr), []).extend(range(a, a + c))
    levels = [(rr, np.asarray(ix)) for rr, ix in by_stride.items()]
    means, stds, data = np.zeros(d, np.float32), np.zeros(d, np.float32), []
    for (ry, rx), ix in levels:
        g = np.ascontiguousarray(feats[:, ::ry, ::rx][..., ix])
        # the dense path's statistics: each cell weighted by the pixels it covers (fewer at the
        # far end of a section that is not a whole number of cells)
        wy = np.minimum(ry, gy - ry * np.arange(g.shape[1])).astype(np.float64)
        wx = np.minimum(rx, gx - rx * np.arange(g.shape[2])).astype(np.float64)
        cover = (wy[:, None] * wx[None, :])[..., None] / (n * gy * gx)
        s1 = np.zeros(g.shape[1:], np.float64)
        s2 = np.zeros(g.shape[1:], np.float64)
        for sec in g:  # in float64, one section at a time
            sec = sec.astype(np.float64)
            s1 += sec
            s2 += sec * sec
        m = (s1 * cover).sum(axis=(0, 1))
        means[ix] = m
        stds[ix] = np.sqrt(np.maximum((s2 * cover).sum(axis=(0, 1)) - m * m, 0.0)) + 1e-6
        g -= means[ix]
        g /= stds[ix]
        # one cell of edge padding at the far end: a window starting inside the last cells
        g = np.pad(g, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
        data.append(jax.device_put(g))
    y = jnp.asarray(labels.astype(np.int32))
    valid = jnp.asarray(_pixel_weights(labels, ignore, num_classes, class_balance))
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    p = {
        "w": jax.random.normal(sub, (d, num_classes)) * 0.01,
        "b": jnp.zeros(num_classes),
    }
    nb = min(sections_per_step, n)
    (cy, cx), _ = _crop_window(crop, (gy, gx), out_shape) if crop else ((gy, gx), (1, 1))
    ixs = [jnp.asarray(ix) for _, ix in levels]

    def loss_fn(p, arrays, key):
        data, y, valid = arrays
        idx = jax.random.choice(key, n, (nb,), replace=False)
        if crop:
            ky, kx = jax.random.split(jax.random.fold_in(key, 1))
            oy = jax.random.randint(ky, (nb,), 0, gy - cy + 1)
            ox = jax.random.randint(kx, (nb,), 0, gx - cx + 1)
        else:
            oy = ox = jnp.zeros((nb,), jnp.int32)

        def cut_labels(i, a, b):
            yb = jax.lax.dynamic_slice(y, (i, a, b), (1, cy, cx))[0]
            return yb, jax.lax.dynamic_slice(valid, (i, a, b), (1, cy, cx))[0]

        yb, vb = jax.vmap(cut_labels)(idx, oy, ox)
        cuts = []
        for ((ry, rx), _), f in zip(levels, data):
            ny, nx = -(-cy // ry) + 1, -(-cx // rx) + 1

            def cut(i, a, b, f=f, ry=ry, rx=rx, ny=ny, nx=nx):
                box = (1, ny, nx, f.shape[3])
                return jax.lax.dynamic_slice(f, (i, a // ry, b // rx, 0), box)[0]

            cuts.append(jax.vmap(cut)(idx, oy, ox))

        lg = p["b"]
        for ((ry, rx), _), ix, fb in zip(levels, ixs, cuts):
            g = jnp.einsum("nhwd,dk->nhwk", fb, p["w"][ix])
            g = jnp.repeat(jnp.repeat(g, ry, axis=1), rx, axis=2)

            def shift(g, a, b, ry=ry, rx=rx):
                return jax.lax.dynamic_slice(g, (a % ry, b % rx, 0), (cy, cx, num_classes))

            lg = lg + jax.vmap(shift)(g, oy, ox)
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, yb)
        return (ce * vb).sum() / vb.sum()

    w, b = _fit(loss_fn, p, (data, y, valid), key, steps=steps, lr=lr, weight_decay=weight_decay)
    return LinearProbe(w, b, means, stds, upsample=upsample, num_classes=num_classes)


def _crop_window(crop: int, grid: tuple[int, int], out_shape) -> tuple[tuple, tuple]:
    """((tokens y, x), (pixels per token y, x)) of a `crop`-pixel training window; the window is
    the whole section along an axis shorter than `crop`."""
    strides = []
    for g, o in zip(grid, out_shape):
        if o % g:
            raise UserError(
                f"probe crop={crop}: sections of {tuple(out_shape)} pixels are not a whole number "
                f"of tokens per side ({tuple(grid)} tokens); use crop=0"
            )
        strides.append(o // g)
    if any(crop % s for s in strides):
        raise UserError(
            f"probe crop={crop}: must be a multiple of the pixels per token {tuple(strides)}"
        )
    return tuple(min(crop // s, g) for s, g in zip(strides, grid)), tuple(strides)


def _pixel_weights(labels, ignore, num_classes: int, class_balance: bool) -> np.ndarray:
    """Loss weight of each pixel: 0 where ignored; with `class_balance` each class weighted by 1 /
    its frequency, so thin membranes count as much as interiors."""
    valid = np.ones(labels.shape, np.float32) if ignore is None else (~ignore).astype(np.float32)
    if class_balance:
        freq = (
            np.bincount(labels.ravel(), weights=valid.ravel(), minlength=num_classes) / valid.sum()
        )
        valid = valid * (1.0 / (num_classes * np.maximum(freq, 1e-6)))[labels]
    return valid
