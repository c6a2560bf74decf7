"""Test-time augmentation for `emfm predict` (`predict.tta`): every window is also predicted
flipped (and turned), each prediction is mapped back to the window's frame, and their mean is
written, as PyTorch Connectomics and torch-em do for EM segmentation.

  none:      the window as it is (1 prediction);
  flips:     every combination of flips of the window's axes: y and x for a 2D model (4), z, y and
             x for a 3D model (8);
  dihedral:  those, each also with y and x swapped (8 for a 2D model, 16 for a 3D one): with the
             flips, the in-plane turns by 90 degrees. Needs a square window in-plane.

Mapping a prediction back is more than undoing the flip where a channel has a direction:
- an affinity for offset `o` (edge between v and v + o) predicted in the flipped frame is, in the
  window's frame, the affinity for the flipped offset o'. If o' is among the task's offsets, it is
  that channel's; if -o' is, it is that channel's shifted by o (the edge (v, v - o) is the edge
  (v - o, v)), and voxels whose shifted value would come from outside the window take the mean
  of the other predictions only. An offset set that a transform maps outside itself (e.g. a
  diagonal offset without its mirror image) is an error that names it.
- the centre offsets of `task=center` are vectors: their components are swapped and negated
  with the axes.
- class probabilities, boundaries, distances and heatmaps are scalars: only the flip is undone.
The mean is taken over probabilities (softmax and sigmoid outputs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from emfm.errors import UserError

MODES = ("none", "flips", "dihedral")


@dataclass(frozen=True)
class Transform:
    """Flip the window's `flips` axes (0 = z, 1 = y, 2 = x of `[z, y, x]`), then, with
    `transpose`, swap y and x."""

    flips: tuple[int, ...] = ()
    transpose: bool = False

    def offset_back(self, o) -> tuple[int, ...]:
        """An offset `[dz, dy, dx]` of the transformed frame in the window's frame."""
        o = list(o)
        if self.transpose:
            o[1], o[2] = o[2], o[1]
        for a in self.flips:
            o[a] = -o[a]
        return tuple(int(v) for v in o)


def transforms(mode: str, ndim: int) -> list[Transform]:
    """The transforms of `mode` for a model of `ndim` spatial dimensions; the identity first."""
    if mode not in MODES:
        raise UserError(f"predict.tta={mode!r}: use one of {MODES}")
    axes = (1, 2) if ndim == 2 else (0, 1, 2)
    flips = [
        tuple(a for a, on in zip(axes, bits) if on)
        for bits in itertools.product((False, True), repeat=len(axes))
    ]
    if mode == "none":
        return [Transform()]
    turns = (False, True) if mode == "dihedral" else (False,)
    return [Transform(f, t) for t in turns for f in flips]


@dataclass(frozen=True)
class ChannelMap:
    """Output channel j of the window's frame from transformed channel `src[j]`, times `sign[j]`,
    read at v + `shift[j]` (voxels, z y x)."""

    src: tuple[int, ...]
    sign: tuple[float, ...]
    shift: tuple[tuple[int, int, int], ...]


def channel_maps(tfs: list[Transform], task, lay, ndim: int) -> list[ChannelMap]:
    """Per transform, where each output channel comes from (see the module docstring)."""
    n = lay.channels
    maps = []
    for t in tfs:
        src, sign, shift = list(range(n)), [1.0] * n, [(0, 0, 0)] * n
        if task.kind == "affinity":
            offs = [tuple(int(v) for v in o) for o in task.offsets]
            c0 = lay.classes
            for k, o in enumerate(offs):
                back = t.offset_back(o)
                if back in offs:
                    src[c0 + offs.index(back)] = c0 + k
                elif tuple(-v for v in back) in offs:
                    j = offs.index(tuple(-v for v in back))
                    src[c0 + j], shift[c0 + j] = c0 + k, offs[j]
                else:
                    raise UserError(
                        f"predict.tta: offset {list(o)} of task.offsets becomes {list(back)} "
                        f"under {t}, which is not among task.offsets {task.offsets} (nor its "
                        "opposite); give the mirrored offsets too, or use predict.tta=none"
                    )
        elif task.kind == "center":
            # the last `ndim` channels: the offset vector's components along "zyx"[3 - ndim:]
            axes = list(range(3 - ndim, 3))
            first = n - ndim
            for i, a in enumerate(axes):
                b = {1: 2, 2: 1}.get(a, a) if t.transpose else a  # transformed axis of a
                src[first + i] = first + axes.index(b)
                sign[first + i] = -1.0 if a in t.flips else 1.0
        maps.append(ChannelMap(tuple(src), tuple(sign), tuple(shift)))
    return maps


def check_window(mode: str, window) -> None:
    if mode == "dihedral" and window[-1] != window[-2]:
        raise UserError(
            f"predict.tta=dihedral swaps y and x, so it needs a square window in-plane; "
            f"predict.window={list(window)} (use predict.tta=flips, or make y and x equal)"
        )


def apply(forward, x, tfs: list[Transform], maps: list[ChannelMap]):
    """Mean prediction `[b, z, y, x, c]` over the transforms of windows `x` `[b, z, y, x]`;
    `forward` maps windows to probabilities `[b, z, y, x, c]` (jittable)."""
    import jax
    import jax.numpy as jnp

    if len(tfs) == 1 and tfs[0] == Transform():
        return forward(x)

    def there(t: Transform, v):  # window -> transformed frame
        v = jnp.flip(v, [1 + a for a in t.flips]) if t.flips else v
        return jnp.swapaxes(v, 2, 3) if t.transpose else v

    def back(t: Transform, p):  # transformed frame -> window (spatial axes only)
        p = jnp.swapaxes(p, 2, 3) if t.transpose else p
        return jnp.flip(p, [1 + a for a in t.flips]) if t.flips else p

    preds = jax.lax.map(forward, jnp.stack([there(t, x) for t in tfs]))  # [T, b, z, y, x, c]
    total = jnp.zeros(preds.shape[1:], preds.dtype)
    count = jnp.zeros(preds.shape[1:], preds.dtype)
    for i, (t, m) in enumerate(zip(tfs, maps)):
        p = back(t, preds[i])
        q = p[..., list(m.src)] * jnp.asarray(m.sign, p.dtype)
        ok = jnp.ones_like(q)
        for j, s in enumerate(m.shift):
            if any(s):
                vj, okj = _shifted(q[..., j], s), _shifted(jnp.ones_like(q[..., j]), s)
                q, ok = q.at[..., j].set(vj), ok.at[..., j].set(okj)
        total, count = total + q * ok, count + ok
    return total / count  # count >= 1: the identity is always valid


def _shifted(v, s):
    """`out[v] = v[v + s]` over the spatial axes 1-3 of `[b, z, y, x]`, 0 where v + s leaves the
    window."""
    import jax.numpy as jnp

    for a, d in enumerate(s):
        if d == 0:
            continue
        ax, n = 1 + a, v.shape[1 + a]
        d = max(-n, min(n, d))
        keep = [slice(None)] * v.ndim
        pad = [(0, 0)] * v.ndim
        keep[ax], pad[ax] = (slice(d, n), (0, d)) if d > 0 else (slice(0, n + d), (-d, 0))
        v = jnp.pad(v[tuple(keep)], pad)
    return v
