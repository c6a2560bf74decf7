"""Probes of frozen dense features for the probing benchmark: per-pixel linear, one-hidden-layer MLP
and k-nearest neighbours (the main job's whole-section linear probe: emfm.eval.linear_probe).

Input: feature maps `[n, gy, gx, d]` of sections `[n, y, x]` (one token covers `sy x sx` pixels),
standardised with the training sections' mean/std, the foreground of the training sections and a
mask of the training pixels whose labels may be used (a label fraction). Output: per-pixel
foreground probabilities of other sections. `fit_predict`:

- `linear`: a linear map per token, `d -> sy*sx*2` (the logits of every pixel the token covers),
  trained with AdamW on mini-batches of labelled tokens;
- `mlp`: the same with one hidden ReLU layer (`d -> hidden -> sy*sx*2`);
- `knn`: class-balanced k-nearest-neighbour vote (cosine similarity) between bilinearly
  interpolated pixel features of sampled labelled pixels and queries on a grid of stride
  `knn_stride`, upsampled bilinearly to pixels.

Losses and votes weight each class by the inverse of its frequency among the labelled pixels.
Compiled steps are cached per shape, so the many fits of a benchmark compile once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange

from emfm.config.common import ConfigError

PROBES = ("linear", "mlp", "knn")


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 200
    batch_tokens: int = 1024
    lr: float = 0.01
    weight_decay: float = 1e-4
    hidden: int = 256
    knn_k: int = 20
    knn_references: int = 3000
    knn_stride: int = 8

    def identity(self, kind: str) -> dict:
        """The settings that change a probe of this kind (its cache key)."""
        if kind == "knn":
            return {
                "kind": kind,
                "k": self.knn_k,
                "references": self.knn_references,
                "stride": self.knn_stride,
            }
        d = {
            "kind": kind,
            "steps": self.steps,
            "batch_tokens": self.batch_tokens,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
        }
        return d | ({"hidden": self.hidden} if kind == "mlp" else {})


def check_kind(kind: str) -> None:
    if kind not in PROBES:
        raise ConfigError(
            f"benchmark.probes: unknown probe {kind!r}; known probes are {', '.join(PROBES)}"
        )


def label_mask(
    shape: tuple[int, ...], fraction: float, seed: int, fg: np.ndarray | None = None
) -> np.ndarray:
    """A seeded random subset of `fraction` of the pixels (at least one of each class when `fg` is
    given)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction {fraction}: must be in (0, 1]")
    if fraction >= 1.0:
        return np.ones(shape, bool)
    rng = np.random.default_rng([seed, int(round(fraction * 1e6))])
    m = rng.random(shape) < fraction
    if fg is not None:
        for cls in (True, False):
            if not (m & (fg == cls)).any():
                idx = np.flatnonzero(fg.ravel() == cls)
                m.ravel()[rng.choice(idx)] = True
    return m


def _cell(feats: np.ndarray, out_yx: tuple[int, int]) -> tuple[int, int]:
    return -(-out_yx[0] // feats.shape[1]), -(-out_yx[1] // feats.shape[2])


def _standardise(train: np.ndarray, chunk: int = 1 << 18):
    """Per-channel mean and std (+1e-6) of token maps `[..., d]`, accumulated in float64 over
    chunks of tokens, so that a float16 map is never copied whole in float32."""
    f = train.reshape(-1, train.shape[-1])
    n = max(len(f), 1)
    s = sum(f[i : i + chunk].sum(0, dtype=np.float64) for i in range(0, len(f), chunk))
    mean = s / n
    ss = sum(
        np.square(f[i : i + chunk].astype(np.float64) - mean).sum(0)
        for i in range(0, len(f), chunk)
    )
    return mean.astype(np.float32), (np.sqrt(ss / n) + 1e-6).astype(np.float32)


# ---- linear and MLP heads on tokens -------------------------------------------------------------


def _init(kind: str, d: int, out: int, hidden: int, seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    if kind == "linear":
        return {"w": jax.random.normal(k1, (d, out)) * 0.01, "b": jnp.zeros(out)}
    return {
        "w1": jax.random.normal(k1, (d, hidden)) * np.sqrt(2.0 / d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, out)) * 0.01,
        "b2": jnp.zeros(out),
    }


def _head(kind: str, p: dict, f):
    """Token features `[..., d]` -> per-pixel logits `[..., sy*sx*2]`."""
    if kind == "linear":
        return f @ p["w"] + p["b"]
    return jax.nn.relu(f @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


_OPTIMISERS: dict = {}


def _optimiser(steps: int, lr: float, wd: float):
    key = (steps, lr, wd)
    if key not in _OPTIMISERS:
        _OPTIMISERS[key] = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=wd)
    return _OPTIMISERS[key]


@partial(jax.jit, static_argnames=("kind", "tx"))
def _step(p, opt, f, y, w, *, kind, tx):
    def loss_fn(p):
        lg = _head(kind, p, f).reshape(y.shape + (2,))
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, y)
        return (ce * w).sum() / jnp.maximum(w.sum(), 1e-6)

    loss, g = jax.value_and_grad(loss_fn)(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss


@partial(jax.jit, static_argnames=("kind",))
def _prob(p, f, *, kind):
    lg = _head(kind, p, f)
    lg = lg.reshape(lg.shape[:-1] + (-1, 2))
    return jax.nn.softmax(lg, axis=-1)[..., 1]


def _tokens(feats, fg, mask, cell):
    """Indices of the labelled tokens in `feats.reshape(-1, d)`, their pixel labels `[t, sy*sx]`
    and label weights. The features themselves are not copied (a hypercolumn of a wide encoder at
    full resolution is several GB)."""
    n, gy, gx, _ = feats.shape
    sy, sx = cell
    pad = ((0, 0), (0, gy * sy - fg.shape[1]), (0, gx * sx - fg.shape[2]))
    y = rearrange(np.pad(fg, pad), "n (gy sy) (gx sx) -> (n gy gx) (sy sx)", sy=sy, sx=sx).astype(
        np.int32
    )
    m = rearrange(np.pad(mask, pad), "n (gy sy) (gx sx) -> (n gy gx) (sy sx)", sy=sy, sx=sx)
    keep = m.any(axis=1)
    freq = np.array([(m & (y == c)).sum() for c in (0, 1)], float)
    cw = freq.sum() / (2.0 * np.maximum(freq, 1.0))
    w = (m * cw[y]).astype(np.float32)
    return np.flatnonzero(keep), y[keep], w[keep]


@dataclass
class _Fit:
    """The training data of one benchmark probe and the standardisation of its features."""

    train: np.ndarray  # token maps [n, gy, gx, d], float16 or float32
    fg: np.ndarray  # foreground [n, y, x]
    mask: np.ndarray  # labelled pixels [n, y, x]
    mean: np.ndarray
    std: np.ndarray

    @property
    def cell(self) -> tuple[int, int]:
        return _cell(self.train, self.fg.shape[1:])

    @property
    def out_yx(self) -> tuple[int, int]:
        return self.fg.shape[1:]

    def standard(self, f: np.ndarray) -> np.ndarray:
        """Standardised float32 features (the input may be float16, as the benchmark keeps them)."""
        return (f.astype(np.float32) - self.mean) / self.std


def _fit_predict_head(kind: str, s: ProbeSettings, t: _Fit, evals, seed: int) -> list:
    """Train a linear / MLP token head and return foreground probabilities of each `evals` map."""
    cell, out_yx = t.cell, t.out_yx
    tokens, y, w = _tokens(t.train, t.fg, t.mask, cell)
    f = t.train.reshape(-1, t.train.shape[-1])  # a view: standardised a batch at a time below
    d, out = f.shape[1], cell[0] * cell[1] * 2
    p = _init(kind, d, out, s.hidden, seed)
    tx = _optimiser(s.steps, s.lr, s.weight_decay)
    opt = tx.init(p)
    rng = np.random.default_rng(seed)
    b = s.batch_tokens
    for _ in range(s.steps):
        idx = rng.integers(0, len(tokens), b)
        fb = jnp.asarray(t.standard(f[tokens[idx]]))
        p, opt, _ = _step(p, opt, fb, jnp.asarray(y[idx]), jnp.asarray(w[idx]), kind=kind, tx=tx)
    res = []
    for fe in evals:
        probs = np.concatenate(
            [
                np.asarray(_prob(p, jnp.asarray(t.standard(fe[i : i + 1])), kind=kind))
                for i in range(len(fe))
            ]
        )
        full = rearrange(probs, "n gy gx (sy sx) -> n (gy sy) (gx sx)", sy=cell[0], sx=cell[1])
        res.append(full[:, : out_yx[0], : out_yx[1]])
    return res


# ---- k nearest neighbours
# -------------------------------------------------------------------------


def interpolate(
    fmap: np.ndarray, ys: np.ndarray, xs: np.ndarray, cell: tuple[int, int]
) -> np.ndarray:
    """Bilinear interpolation of a token map `[gy, gx, d]` at pixel positions (token centres at
    pixel (i + 0.5) * cell - 0.5)."""
    gy, gx = fmap.shape[:2]
    ty = np.clip((ys + 0.5) / cell[0] - 0.5, 0, gy - 1)
    tx = np.clip((xs + 0.5) / cell[1] - 0.5, 0, gx - 1)
    y0, x0 = np.floor(ty).astype(int), np.floor(tx).astype(int)
    y1, x1 = np.minimum(y0 + 1, gy - 1), np.minimum(x0 + 1, gx - 1)
    wy, wx = (ty - y0)[:, None], (tx - x0)[:, None]
    return (
        (1 - wy) * (1 - wx) * fmap[y0, x0]
        + (1 - wy) * wx * fmap[y0, x1]
        + wy * (1 - wx) * fmap[y1, x0]
        + wy * wx * fmap[y1, x1]
    )


@partial(jax.jit, static_argnames=("k",))
def _knn_vote(q, ref, vote, *, k):
    """q `[m, d]`, ref `[r, d]` unit vectors; vote `[r, 2]` class-weighted one-hot -> p(fg)
    `[m]`."""
    sim = q @ ref.T
    _, idx = jax.lax.top_k(sim, k)
    v = vote[idx].sum(axis=1)
    return v[:, 1] / jnp.maximum(v.sum(axis=1), 1e-12)


def _fit_predict_knn(s: ProbeSettings, t: _Fit, evals, seed: int) -> list:
    """kNN votes of the labelled reference pixels, at query pixels every `knn_stride`, upsampled
    bilinearly: foreground probabilities of each `evals` map."""
    cell, out_yx, fg = t.cell, t.out_yx, t.fg
    rng = np.random.default_rng(seed)
    zs, ys, xs = np.nonzero(t.mask)
    pick = rng.choice(len(zs), size=min(s.knn_references, len(zs)), replace=False)
    zs, ys, xs = zs[pick], ys[pick], xs[pick]
    ref = np.concatenate(
        [interpolate(t.standard(t.train[z]), ys[zs == z], xs[zs == z], cell) for z in np.unique(zs)]
    )
    lab = np.concatenate([fg[z, ys[zs == z], xs[zs == z]] for z in np.unique(zs)]).astype(int)
    freq = np.bincount(lab, minlength=2).astype(float)
    vote = np.eye(2, dtype=np.float32)[lab] * (1.0 / np.maximum(freq, 1.0))[lab, None].astype(
        np.float32
    )
    ref = ref / (np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6)
    k = min(s.knn_k, len(ref))
    st = s.knn_stride
    qy, qx = np.arange(st // 2, out_yx[0], st), np.arange(st // 2, out_yx[1], st)
    gyy, gxx = np.meshgrid(qy, qx, indexing="ij")
    ref_j, vote_j = jnp.asarray(ref, jnp.float32), jnp.asarray(vote)

    def pmap(sec):  # one section's probabilities at pixel resolution
        q = interpolate(t.standard(sec), gyy.ravel(), gxx.ravel(), cell)
        q = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-6)
        p = np.asarray(_knn_vote(jnp.asarray(q, jnp.float32), ref_j, vote_j, k=k))
        p = jax.image.resize(jnp.asarray(p.reshape(len(qy), len(qx))), out_yx, method="bilinear")
        return np.clip(np.asarray(p), 0.0, 1.0)

    return [np.stack([pmap(sec) for sec in fe]) for fe in evals]


def fit_predict(
    kind: str,
    s: ProbeSettings,
    train: np.ndarray,
    fg: np.ndarray,
    mask: np.ndarray,
    evals: list[np.ndarray],
    seed: int,
) -> list[np.ndarray]:
    """Foreground probabilities `[n, y, x]` of each feature map in `evals` (same pixel size as
    `fg`)."""
    check_kind(kind)
    t = _Fit(train, fg, mask, *_standardise(train))
    if kind == "knn":
        return _fit_predict_knn(s, t, evals, seed)
    return _fit_predict_head(kind, s, t, evals, seed)
