"""Seeded, vectorised augmentation of patch batches `[b, z, y, x]` (numpy): the ops of
emfm.data.augment_ops chosen by name (`ops`) and composed in a fixed order, one generator per
example (`per_example`), with grey values and noise deferred to the device for the loader
(`*_deferred`); `two_views` makes the pair a contrastive objective needs.
"""

from __future__ import annotations

import numpy as np

from emfm.data.augment_ops import elastic, gaussian_blur, geometric, intensity, sections
from emfm.errors import UserError

# Augmentations a config may name (`data.aug.ops`, `data.aug.view_ops`); they are applied in this
# order whatever order the list gives: geometry first (labels follow), then section artefacts and
# blur of the image, then grey values and noise.
OPS = ("flip_rot", "elastic", "sections", "blur", "intensity", "noise")
DEFAULT_OPS = ("flip_rot", "intensity", "noise")
DEFAULT_VIEW_OPS = ("flip_rot", "blur", "intensity", "noise")
# ops that need float grey values on the host; the others run on integer patches (flip_rot) or on
# the device inside the jitted step (intensity, noise: emfm.data.device.finish)
FLOAT_OPS = frozenset({"elastic", "sections", "blur"})
DEVICE_OPS = frozenset({"intensity", "noise"})
# strengths and probabilities (keyword arguments of per_example / two_views), with their defaults
STRENGTHS = {
    "brightness": 0.1,
    "contrast": 0.2,
    "gamma": 0.2,
    "noise": 0.03,
    "blur_sigma": (0.0, 1.5),
    "p_blur": 0.5,
    "elastic_strength": 3.0,
    "elastic_grid": 4,
    "p_elastic": 0.5,
    "p_missing": 0.02,
    "p_duplicate": 0.02,
    "p_shift": 0.05,
    "max_shift": 8,
    "p_section_contrast": 0.05,
    "section_contrast": 0.3,
}


def check_ops(ops, key: str = "ops") -> tuple[str, ...]:
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise UserError(f"{key}: unknown augmentation(s) {bad}; known: {', '.join(OPS)}")
    return tuple(o for o in OPS if o in ops)


def _float_ops(r: np.random.Generator, arrays: list[np.ndarray], ops, s: dict) -> list:
    """The float-valued ops of one example or one contrastive view, in order: elastic deformation
    (every array: labels follow the image), then section artefacts and blur (the image,
    `arrays[0]`)."""
    if "elastic" in ops:
        arrays = list(
            elastic(
                r, *arrays, strength=s["elastic_strength"], grid=s["elastic_grid"], p=s["p_elastic"]
            )
        )
    if "sections" in ops:
        arrays[0] = sections(
            r,
            arrays[0],
            p_missing=s["p_missing"],
            p_duplicate=s["p_duplicate"],
            p_shift=s["p_shift"],
            max_shift=s["max_shift"],
            p_contrast=s["p_section_contrast"],
            contrast=s["section_contrast"],
        )
    if "blur" in ops:
        arrays[0] = gaussian_blur(r, arrays[0], sigma=tuple(s["blur_sigma"]), p=s["p_blur"])
    return arrays


def _middle(rngs, arrays: list[np.ndarray], ops, s: dict) -> list[np.ndarray]:
    """`_float_ops` of each example with its own generator, written back into `arrays`."""
    if not FLOAT_OPS & set(ops):
        return arrays
    for i, r in enumerate(rngs):
        one = _float_ops(r, [a[i : i + 1] for a in arrays], ops, s)
        for a, o in zip(arrays, one):
            a[i] = o[0]
    return arrays


def _host_part(rngs, x: np.ndarray, extra, ops, s: dict, norm: np.ndarray | None = None):
    """The per-example draws and the host ops of `per_example` (flips / rotations, then the
    float ops). Returns the arrays and the `[b, 6]` draws (rot, flip, contrast, brightness, gamma,
    noise sigma). With `norm` (`[b, 2]` lo, scale), `x` is in its native dtype: it stays so under
    flips / rotations (a permutation commutes with grey-value normalisation), and is normalised
    to float32 first only when a float op (elastic, sections, blur) needs it."""
    brightness, contrast, gamma, noise = (
        s[k] for k in ("brightness", "contrast", "gamma", "noise")
    )
    if "intensity" not in ops:
        brightness = contrast = gamma = 0.0
    if "noise" not in ops:
        noise = 0.0
    b = x.shape[0]
    square = x.shape[-1] == x.shape[-2]
    draws = np.array(
        [
            [
                r.integers(0, 4),
                r.random(),
                r.uniform(-contrast, contrast),
                r.uniform(-brightness, brightness),
                r.uniform(-gamma, gamma),
                r.uniform(0, noise),
            ]
            for r in rngs
        ],
        np.float64,
    ).reshape(b, 6)
    k = draws[:, 0].astype(int) if square else 2 * (draws[:, 0].astype(int) % 2)
    fy = draws[:, 1] < 0.5
    if norm is not None and FLOAT_OPS & set(ops):
        x = normalise(x, norm)
    arrays = [x.copy()] + [a.copy() for a in extra]
    if "flip_rot" in ops:
        for i in range(b):
            for a in arrays:
                v = a[i][..., ::-1, :] if fy[i] else a[i]
                a[i] = np.rot90(v, k[i], axes=(-2, -1))
    return _middle(rngs, arrays, ops, s), draws


def per_example(
    rngs, x: np.ndarray, *extra: np.ndarray, ops=DEFAULT_OPS, **strengths
) -> tuple[np.ndarray, ...]:
    """Augmentation with one generator per example (`rngs[i]` for `x[i]`), vectorised over the
    batch where the op allows: an example is augmented the same way whatever batch it is in (so a
    global batch split over processes equals the single-process batch). `extra` arrays (labels)
    get the same geometry (flips, rotations, elastic field) and no grey-value change. `ops` picks
    from OPS; `strengths` override STRENGTHS. All on the host, in numpy (the loader instead defers
    grey values and noise to the device: `per_example_deferred`)."""
    ops = check_ops(ops)
    s = {**STRENGTHS, **strengths}
    noise = s["noise"] if "noise" in ops else 0.0
    b = x.shape[0]
    arrays, draws = _host_part(rngs, x, extra, ops, s)
    y = arrays[0]
    shape = (b,) + (1,) * (y.ndim - 1)
    c, br, g, sig = (draws[:, j].reshape(shape).astype(np.float32) for j in (2, 3, 4, 5))
    mean = y.mean(axis=tuple(range(1, y.ndim)), keepdims=True)
    y = np.clip((y - mean) * (1.0 + c) + mean + br, 0.0, 1.0) ** np.exp(g)
    if noise > 0:
        y = y + np.stack([r.standard_normal(x.shape[1:], dtype=np.float32) for r in rngs]) * sig
    return (y.astype(np.float32), *arrays[1:])


def normalise(x: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """`clip((x - lo) * scale, 0, 1)` in float32 per example (`norm[i] = lo, scale`): the host
    copy of the device's normalisation, for the float ops that must run on the host."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    out = np.subtract(x, norm[:, 0].reshape(shape), dtype=np.float32, casting="unsafe")
    out *= norm[:, 1].reshape(shape)
    return np.clip(out, 0.0, 1.0, out=out)


def deferred_keys(
    name: str, x: np.ndarray, norm: np.ndarray, grey: np.ndarray | None, seeds: np.ndarray | None
) -> dict:
    """The batch entries of one image for emfm.data.device.finish: the image (native dtype, or
    float32 in [0, 1] after host float ops, then with identity normalisation), `NAME_norm` `[b, 2]`
    (lo, scale), `NAME_grey` `[b, 4]` (contrast, brightness, gamma, noise sigma) and `NAME_seed`
    `[b]` uint32 (the noise of each example) where those ops are on."""
    out = {name: x, f"{name}_norm": np.ascontiguousarray(norm, np.float32)}
    if grey is not None:
        out[f"{name}_grey"] = np.ascontiguousarray(grey, np.float32)
    if seeds is not None:
        out[f"{name}_seed"] = np.asarray(seeds, np.uint32)
    return out


def per_example_deferred(
    rngs,
    x: np.ndarray,
    norm: np.ndarray,
    *extra: np.ndarray,
    ops=DEFAULT_OPS,
    name: str = "image",
    **strengths,
) -> tuple[dict, tuple[np.ndarray, ...]]:
    """`per_example` for the loader, with grey values and noise deferred to the device.

    `x` is the batch in its native dtype and `norm` its per-example normalisation `[b, 2]` (lo,
    scale). The same generators draw the same numbers as `per_example`, so flips, rotations and
    float ops are identical and the deferred contrast / brightness / gamma are too; the noise is
    drawn on the device from a per-example seed (the last draw of each generator) instead of
    numpy's normals. Returns the image entries (`deferred_keys`) and the moved `extra` arrays."""
    ops = check_ops(ops)
    s = {**STRENGTHS, **strengths}
    arrays, draws = _host_part(rngs, x, extra, ops, s, norm=norm)
    if FLOAT_OPS & set(ops):
        # normalised on the host already
        norm = np.tile(np.array([0.0, 1.0], np.float32), (len(x), 1))
    grey = draws[:, 2:6] if DEVICE_OPS & set(ops) else None
    seeds = (
        np.array([r.integers(0, 2**32, dtype=np.uint32) for r in rngs], np.uint32)
        if "noise" in ops
        else None
    )
    return deferred_keys(name, arrays[0], norm, grey, seeds), tuple(arrays[1:])


def two_views(
    rng: np.random.Generator, x: np.ndarray, *, ops=DEFAULT_VIEW_OPS, **strengths
) -> tuple[np.ndarray, np.ndarray]:
    """Two independently augmented views of the same `[b, z, y, x]` batch for contrastive learning
    (by default flip / rotation, blur, grey values, noise; `ops` picks from OPS); each view's
    generator is spawned from `rng`."""
    ops = check_ops(ops)
    s = {**STRENGTHS, **strengths}
    r1, r2 = rng.spawn(2)

    def view(r):
        v = geometric(r, x)[0] if "flip_rot" in ops else x.astype(np.float32, copy=True)
        v = _float_ops(r, [v], ops, s)[0]
        if "intensity" not in ops and "noise" not in ops:
            return v.astype(np.float32)
        grey = ("brightness", "contrast", "gamma")
        return intensity(
            r,
            v,
            **{k: (s[k] if "intensity" in ops else 0.0) for k in grey},
            noise=s["noise"] if "noise" in ops else 0.0,
        )

    return view(r1), view(r2)


def two_views_deferred(
    rng: np.random.Generator, x: np.ndarray, norm: np.ndarray, *, ops=DEFAULT_VIEW_OPS, **strengths
) -> tuple[dict, dict]:
    """`two_views` for the loader, with grey values and noise deferred to the device: each view's
    image entries (`deferred_keys`, names "image" and "image2"). `x` is in its native dtype with
    normalisation `norm` `[b, 2]`; it is normalised on the host only when a float op needs it.
    Flips, rotations and float ops equal `two_views`'s; each view draws contrast, brightness,
    gamma, then noise sigma and a noise seed for the device."""
    ops = check_ops(ops)
    s = {**STRENGTHS, **strengths}
    r1, r2 = rng.spawn(2)
    host_float = bool(FLOAT_OPS & set(ops))
    if host_float:
        x = normalise(x, norm)
        norm = np.tile(np.array([0.0, 1.0], np.float32), (len(x), 1))

    def view(r, name):
        v = geometric(r, x)[0] if "flip_rot" in ops else x.copy()
        v = _float_ops(r, [v], ops, s)[0]
        grey = seeds = None
        if DEVICE_OPS & set(ops):
            on = "intensity" in ops
            b = len(v)
            c = r.uniform(-s["contrast"] * on, s["contrast"] * on, b)
            br = r.uniform(-s["brightness"] * on, s["brightness"] * on, b)
            g = r.uniform(-s["gamma"] * on, s["gamma"] * on, b)
            sig = r.uniform(0, s["noise"] if "noise" in ops else 0.0, b)
            grey = np.stack([c, br, g, sig], axis=1)
            if "noise" in ops:
                seeds = r.integers(0, 2**32, b, dtype=np.uint32)
        return deferred_keys(name, v.astype(np.float32) if host_float else v, norm, grey, seeds)

    return view(r1, "image"), view(r2, "image2")
