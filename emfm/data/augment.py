"""Seeded, vectorised augmentation of patch batches `[b, z, y, x]` (numpy).

Geometric ops move labels with images: in-plane flips and 90-degree rotations, elastic deformation
(images linear, labels nearest, one field). Image-only ops: grey values (brightness, contrast,
gamma, Gaussian noise), Gaussian blur, and serial-section artefacts of z-stacks (missing,
duplicated, misaligned, dark / bright sections). `two_views` makes the pair a contrastive objective
needs.
"""

from __future__ import annotations

import numpy as np

from emfm.errors import UserError


def geometric(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same random in-plane flip / rot90 for each example, applied to every array given."""
    b = arrays[0].shape[0]
    k = rng.integers(0, 4, b)
    if arrays[0].shape[-1] != arrays[0].shape[-2]:
        k = 2 * (k % 2)  # non-square patches keep their shape only under 0 / 180 degree turns
    fy = rng.random(b) < 0.5
    out = [a.copy() for a in arrays]
    for i in range(b):  # per-example ops on views; b is small and each op is a memory view
        for a in out:
            v = a[i]
            if fy[i]:
                v = v[..., ::-1, :]
            a[i] = np.rot90(v, k[i], axes=(-2, -1))
    return tuple(out)


# Augmentations a config may name (`data.aug.ops`, `data.aug.view_ops`); they are applied in this
# order whatever order the list gives: geometry first (labels follow), then section artefacts and
# blur of the image, then grey values and noise.
OPS = ("flip_rot", "elastic", "sections", "blur", "intensity", "noise")
DEFAULT_OPS = ("flip_rot", "intensity", "noise")
DEFAULT_VIEW_OPS = ("flip_rot", "blur", "intensity", "noise")
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


def _middle(rngs, arrays: list[np.ndarray], ops, s: dict) -> list[np.ndarray]:
    """Elastic deformation (all arrays), section artefacts and blur (image only), one generator per
    example."""
    if not {"elastic", "sections", "blur"} & set(ops):
        return arrays
    for i, r in enumerate(rngs):
        one = [a[i : i + 1] for a in arrays]
        if "elastic" in ops:
            one = list(
                elastic(
                    r,
                    *one,
                    strength=s["elastic_strength"],
                    grid=s["elastic_grid"],
                    p=s["p_elastic"],
                )
            )
        if "sections" in ops:
            one[0] = sections(
                r,
                one[0],
                p_missing=s["p_missing"],
                p_duplicate=s["p_duplicate"],
                p_shift=s["p_shift"],
                max_shift=s["max_shift"],
                p_contrast=s["p_section_contrast"],
                contrast=s["section_contrast"],
            )
        if "blur" in ops:
            one[0] = gaussian_blur(r, one[0], sigma=tuple(s["blur_sigma"]), p=s["p_blur"])
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


# ops that need float grey values on the host; the others run on integer patches (flip_rot) or on
# the device inside the jitted step (intensity, noise: emfm.data.device.finish)
FLOAT_OPS = frozenset({"elastic", "sections", "blur"})
DEVICE_OPS = frozenset({"intensity", "noise"})


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


def intensity(
    rng: np.random.Generator,
    x: np.ndarray,
    *,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: float = 0.2,
    noise: float = 0.03,
) -> np.ndarray:
    """Grey-value augmentation of float images in [0, 1]; per example."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    c = 1.0 + rng.uniform(-contrast, contrast, shape)
    br = rng.uniform(-brightness, brightness, shape)
    g = np.exp(rng.uniform(-gamma, gamma, shape))
    mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    y = np.clip((x - mean) * c + mean + br, 0.0, 1.0) ** g
    if noise > 0:
        y = y + rng.normal(0.0, 1.0, x.shape).astype(np.float32) * rng.uniform(0, noise, shape)
    return y.astype(np.float32)


def _gaussian_kernels(sigma: np.ndarray, radius: int) -> np.ndarray:
    """`[b, 2r+1]` normalised 1D Gaussians; sigma 0 gives a delta."""
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    s = np.maximum(sigma, 1e-6)[:, None].astype(np.float32)
    k = np.exp(-0.5 * (t / s) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _conv1d(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """Per-example 1D convolution of `[b, z, y, x]` along `axis` (2 or 3), reflect-padded."""
    r = k.shape[1] // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    win = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, pad, mode="reflect"), k.shape[1], axis=axis
    )
    return np.einsum("bzyxk,bk->bzyx", win, k, optimize=True)


def gaussian_blur(
    rng: np.random.Generator,
    x: np.ndarray,
    *,
    sigma: tuple[float, float] = (0.0, 1.5),
    p: float = 0.5,
) -> np.ndarray:
    """In-plane Gaussian blur of `[b, z, y, x]` images, sigma ~ U(sigma) for a fraction p of
    examples."""
    b = x.shape[0]
    s = np.where(rng.random(b) < p, rng.uniform(*sigma, b), 0.0)
    if not s.any():
        return x.astype(np.float32, copy=True)
    radius = max(1, min(int(np.ceil(3 * s.max())), (min(x.shape[-2:]) - 1)))
    k = _gaussian_kernels(s, radius)
    return _conv1d(_conv1d(x.astype(np.float32), k, 2), k, 3).astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, b: int, h: int, w: int, grid: int, strength: float
) -> np.ndarray:
    """`[b, 2, h, w]` displacements in pixels: a `grid x grid` random lattice, bilinearly
    upsampled."""
    coarse = rng.normal(0.0, strength, (b, 2, grid, grid)).astype(np.float32)
    gy, gx = np.linspace(0, grid - 1, h), np.linspace(0, grid - 1, w)
    y0, x0 = np.minimum(gy.astype(int), grid - 2), np.minimum(gx.astype(int), grid - 2)
    wy, wx = (gy - y0)[:, None], (gx - x0)[None, :]
    c = lambda dy, dx: coarse[:, :, (y0 + dy)[:, None], (x0 + dx)[None, :]]  # noqa: E731
    return (
        (1 - wy) * (1 - wx) * c(0, 0)
        + (1 - wy) * wx * c(0, 1)
        + wy * (1 - wx) * c(1, 0)
        + wy * wx * c(1, 1)
    ).astype(np.float32)


def elastic(
    rng: np.random.Generator,
    *arrays: np.ndarray,
    strength: float = 3.0,
    grid: int = 4,
    p: float = 0.5,
) -> tuple[np.ndarray, ...]:
    """Smooth in-plane elastic deformation of `[b, z, y, x]` arrays, one field per example shared by
    all arrays and all sections: float arrays are interpolated linearly, integer (label) arrays by
    nearest neighbour, so ids are never mixed."""
    b, z, h, w = arrays[0].shape
    field = (
        _smooth_field(rng, b, h, w, max(2, grid), strength)
        * (rng.random(b) < p)[:, None, None, None]
    )
    yy = np.clip(np.arange(h, dtype=np.float32)[None, :, None] + field[:, 0], 0, h - 1)  # [b, h, w]
    xx = np.clip(np.arange(w, dtype=np.float32)[None, None, :] + field[:, 1], 0, w - 1)
    bi = np.arange(b)[:, None, None, None]
    zi = np.arange(z)[None, :, None, None]
    out = []
    for a in arrays:
        if np.issubdtype(a.dtype, np.floating):
            y0 = np.minimum(np.floor(yy).astype(int), h - 2 if h > 1 else 0)
            x0 = np.minimum(np.floor(xx).astype(int), w - 2 if w > 1 else 0)
            fy, fx = (yy - y0)[:, None], (xx - x0)[:, None]
            y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)

            def g(ya, xa, a=a):
                return a[bi, zi, ya[:, None], xa[:, None]]

            r = (
                (1 - fy) * (1 - fx) * g(y0, x0)
                + (1 - fy) * fx * g(y0, x1)
                + fy * (1 - fx) * g(y1, x0)
                + fy * fx * g(y1, x1)
            )
            out.append(r.astype(a.dtype))
        else:
            out.append(
                a[bi, zi, np.rint(yy).astype(int)[:, None], np.rint(xx).astype(int)[:, None]]
            )
    return tuple(out)


def sections(
    rng: np.random.Generator,
    x: np.ndarray,
    *,
    p_missing: float = 0.02,
    p_duplicate: float = 0.02,
    p_shift: float = 0.05,
    max_shift: int = 8,
    p_contrast: float = 0.05,
    contrast: float = 0.3,
) -> np.ndarray:
    """Serial-section artefacts of `[b, z, y, x]` images in [0, 1], drawn independently per section:
    missing sections (zeros), duplicated sections (a copy of the one before), misaligned sections
    (an in-plane shift, edges repeated) and dark / bright sections. Images only: labels stay where
    the tissue is, which is what a network should learn to recover."""
    b, z, h, w = x.shape
    y = x.astype(np.float32, copy=True)
    shape = (b, z)
    dup = (rng.random(shape) < p_duplicate) & (np.arange(z) > 0)
    src = np.where(dup, np.arange(z) - 1, np.arange(z))
    y = np.take_along_axis(y, src[:, :, None, None], axis=1)
    shift = (
        rng.integers(-max_shift, max_shift + 1, (b, z, 2))
        * (rng.random(shape) < p_shift)[..., None]
    )
    if shift.any():
        yi = np.clip(np.arange(h)[None, None, :] - shift[..., 0:1], 0, h - 1)  # [b, z, h]
        xi = np.clip(np.arange(w)[None, None, :] - shift[..., 1:2], 0, w - 1)
        y = y[
            np.arange(b)[:, None, None, None],
            np.arange(z)[None, :, None, None],
            yi[..., :, None],
            xi[..., None, :],
        ]
    gain = np.where(
        rng.random(shape) < p_contrast, 1.0 + rng.uniform(-contrast, contrast, shape), 1.0
    )
    y = np.clip(y * gain[..., None, None].astype(np.float32), 0.0, 1.0)
    y[rng.random(shape) < p_missing] = 0.0
    return y


def _view_float_ops(r: np.random.Generator, v: np.ndarray, ops, s: dict) -> np.ndarray:
    """The float-valued ops of one contrastive view, in order: elastic, section defects, blur."""
    if "elastic" in ops:
        v = elastic(r, v, strength=s["elastic_strength"], grid=s["elastic_grid"], p=s["p_elastic"])[
            0
        ]
    if "sections" in ops:
        v = sections(
            r,
            v,
            p_missing=s["p_missing"],
            p_duplicate=s["p_duplicate"],
            p_shift=s["p_shift"],
            max_shift=s["max_shift"],
            p_contrast=s["p_section_contrast"],
            contrast=s["section_contrast"],
        )
    if "blur" in ops:
        v = gaussian_blur(r, v, sigma=tuple(s["blur_sigma"]), p=s["p_blur"])
    return v


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
        v = _view_float_ops(r, v, ops, s)
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
        v = _view_float_ops(r, v, ops, s)
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
