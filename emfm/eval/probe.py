"""Linear probe of frozen dense features on a labelled EM volume (the main job's second step).

Features: the frozen encoder's patch tokens of each whole section, `[n, gy, gx, d]`, standardised
with the training sections' mean/std. Classifier: one linear map `d -> 2` applied per token, with
its logits upsampled bilinearly to pixels (a linear map commutes with bilinear upsampling, so this
equals upsampling the features to pixels first, at a fraction of the memory). Trained full-batch
with Adam on the training sections' pixels, evaluated on held-out sections.

Reported per encoder on the held-out sections: membrane pixel F1 and IoU, and the adapted Rand
error and variation of information (split + merge) of the cell segmentation derived from the
predicted membranes (seeded watershed, per section; ground-truth cells = connected cell-interior
regions, membrane pixels ignored), averaged over sections. The watershed's seed threshold, minimum
seed size and smoothing can be chosen per encoder on the training sections (`tune_cells`), so that
each encoder's region scores come from its own best post-processing, not from one fixed threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange

from emfm.data.volume import Volume, VolumeError
from emfm.errors import UserError

log = logging.getLogger("emfm")


def normalise(x: np.ndarray, grey_range: tuple[float, float]) -> np.ndarray:
    lo, hi = grey_range
    return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


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
        f = (feats - self.mean) / self.std
        return np.asarray(
            _pixel_logits(
                {"w": self.w, "b": self.b},
                jnp.asarray(f),
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
) -> LinearProbe:
    """Fit per-pixel logits (see LinearProbe) to `labels` `[n, y, x]` (ints < num_classes) with
    AdamW on random mini-batches of `sections_per_step` sections (seeded)."""
    if upsample not in UPSAMPLING:
        raise UserError(f"probe upsampling {upsample!r}: use one of {UPSAMPLING}")
    if labels.size == 0 or len(np.unique(labels)) < 2:
        raise VolumeError(
            f"probe labels hold {len(np.unique(labels))} class(es) ({np.unique(labels)}); "
            "a probe needs at least two"
        )
    mean = feats.mean(axis=(0, 1, 2))
    std = feats.std(axis=(0, 1, 2)) + 1e-6
    f = jnp.asarray((feats - mean) / std)
    y = jnp.asarray(labels.astype(np.int32))
    valid = np.ones(labels.shape, np.float32) if ignore is None else (~ignore).astype(np.float32)
    if (
        class_balance
    ):  # weight each class by 1 / its frequency, so thin membranes count as much as interiors
        freq = (
            np.bincount(labels.ravel(), weights=valid.ravel(), minlength=num_classes) / valid.sum()
        )
        valid = valid * (1.0 / (num_classes * np.maximum(freq, 1e-6)))[labels]
    valid = jnp.asarray(valid)
    d = feats.shape[-1]
    out_shape = labels.shape[1:]
    kout = num_classes
    if upsample == "subpixel":
        kout *= -(-out_shape[0] // feats.shape[1]) * -(-out_shape[1] // feats.shape[2])
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    p = {"w": jax.random.normal(sub, (d, kout)) * 0.01, "b": jnp.zeros(kout)}
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    opt = tx.init(p)
    nb = min(sections_per_step, len(feats))

    @jax.jit
    def step(
        p, opt, f, y, valid, key
    ):  # data as arguments: closed-over arrays become slow-to-fold constants
        idx = jax.random.choice(key, f.shape[0], (nb,), replace=False)

        def loss_fn(p):
            lg = _pixel_logits(p, f[idx], out_shape, upsample, num_classes)
            ce = optax.softmax_cross_entropy_with_integer_labels(lg, y[idx])
            return (ce * valid[idx]).sum() / valid[idx].sum()

        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    for i in range(steps):
        p, opt, loss = step(p, opt, f, y, valid, jax.random.fold_in(key, i))
    log.debug("probe final training loss %.4f", float(loss))
    return LinearProbe(
        w=np.asarray(p["w"]),
        b=np.asarray(p["b"]),
        mean=mean,
        std=std,
        upsample=upsample,
        num_classes=num_classes,
    )


def cells_from_membranes(
    p_membrane: np.ndarray,
    *,
    threshold: float = 0.5,
    min_seed: int = 16,
    sigma: float = 0.0,
    rank: bool = False,
) -> np.ndarray:
    """Cell instances of one section from a membrane probability map: the map is optionally smoothed
    (Gaussian, `sigma` pixels), seeds are connected regions of confident interior (p < threshold, at
    least `min_seed` pixels), grown by watershed over the (smoothed) map.

    With `rank`, `threshold` is a quantile of this section's own (smoothed) map: the seeds are then
    the `threshold` fraction of least membrane-like pixels. The watershed flooding depends only on
    the order of the values, so rank seeds make the whole derivation invariant to a monotone change
    of the map's calibration, e.g. a probe less confident on held-out sections than on the sections
    it was fitted to (experiments/main_job_mae/README.md)."""
    from scipy import ndimage

    from emfm.instances.watershed import seeded_watershed, threshold_seeds

    p = ndimage.gaussian_filter(p_membrane.astype(np.float32), sigma) if sigma > 0 else p_membrane
    t = float(np.quantile(p, threshold)) if rank else threshold
    return seeded_watershed(p, threshold_seeds(p, t, min_seed)).astype(np.uint32)


def gt_cells(membrane: np.ndarray) -> np.ndarray:
    """Ground-truth cells of one section: connected cell-interior regions; membranes = 0
    (ignored)."""
    from scipy import ndimage

    lab, _ = ndimage.label(~membrane)
    return lab.astype(np.uint32)


def cell_scores(p_membrane: np.ndarray, membrane_gt: np.ndarray, **cells) -> dict:
    """Adapted Rand error and VOI (split, merge) of the cells derived from `p_membrane` `[n, y, x]`
    (`cells`: cells_from_membranes parameters) against the ground-truth cells, averaged over
    sections."""
    from emfm.eval import metrics

    per = [
        metrics.region_scores(
            cells_from_membranes(p_membrane[k], **cells), gt_cells(membrane_gt[k]), ignore_gt=(0,)
        )
        for k in range(len(p_membrane))
    ]
    return {
        k: float(np.mean([s[k] for s in per]))
        for k in ("adapted_rand_error", "voi", "voi_split", "voi_merge")
    }


def tune_cells(
    p_membrane: np.ndarray,
    membrane_gt: np.ndarray,
    *,
    thresholds=(0.5,),
    min_seeds=(16,),
    sigmas=(0.0,),
    rank: bool = False,
) -> dict:
    """The cells_from_membranes parameters with the lowest adapted Rand error (averaged per section)
    on these (training) sections, searched over thresholds x min_seeds x sigmas by
    emfm.instances.tune.grid_search (thresholds are quantiles with `rank`); ties keep the first."""
    from emfm.instances.tune import grid_search

    gt = np.stack([gt_cells(m) for m in membrane_gt])
    grid = {
        "threshold": [float(t) for t in thresholds],
        "min_seed": [int(m) for m in min_seeds],
        "sigma": [float(s) for s in sigmas],
        "rank": [bool(rank)],
    }
    try:
        best, _ = grid_search(
            lambda c: np.stack([cells_from_membranes(p, **c) for p in p_membrane]),
            gt,
            grid,
            "adapted_rand_error",
            per_section=True,
            ignore_gt=(0,),
        )
    except ValueError as e:  # an empty grid
        raise UserError(
            f"probe cell tuning (probe.cell_thresholds / cell_min_seeds / cell_sigmas): {e}"
        ) from None
    return best


def membrane_scores(
    p_membrane: np.ndarray, membrane_gt: np.ndarray, *, pixel_threshold: float = 0.5, **cells
) -> dict:
    """Pixel scores (membrane = p >= pixel_threshold) and region scores of the derived cells
    (`cells`: cells_from_membranes parameters) over sections `[n, y, x]`; region scores averaged per
    section."""
    from emfm.eval import metrics

    px = metrics.binary_scores(p_membrane >= pixel_threshold, membrane_gt)
    return {
        "f1": px["f1"],
        "iou": px["iou"],
        "precision": px["precision"],
        "recall": px["recall"],
        "pixel_error": px["pixel_error"],
        **cell_scores(p_membrane, membrane_gt, **cells),
    }


def read_sections(vol: Volume, z: tuple[int, int]) -> np.ndarray:
    if vol.ndim != 3:
        raise VolumeError(f"probe volume {vol.path} has {vol.ndim} dimensions; expected z, y, x")
    if not 0 <= z[0] < z[1] <= vol.shape[0]:
        raise VolumeError(
            f"sections {list(z)} are outside volume {vol.path} with {vol.shape[0]} sections"
        )
    return vol.read((slice(*z), slice(None), slice(None)))
