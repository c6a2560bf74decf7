"""Test-time augmentation (emfm.finetune.tta): the predictions mapped back to the window's frame.

A model that is itself equivariant (its prediction of a flipped window is the flipped prediction,
with directions flipped too) must come out of TTA unchanged, for every kind of channel: scalars,
affinities whose offsets flip outside the task's set (read shifted), and centre-offset vectors."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emfm.errors import UserError
from emfm.finetune import tta
from emfm.finetune.targets import Layout

OFFSETS_3D = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -3, 0], [0, 0, -3]]


def _affinity_model(offsets):
    """An equivariant affinity 'network': exp(-|x(v) - x(v + o)|), 0 where v + o leaves the
    window."""

    def forward(x):  # [b, z, y, x] -> [b, z, y, x, k]
        chans = []
        for o in offsets:
            other = tta._shifted(x, o)
            inside = tta._shifted(jnp.ones_like(x), o)
            chans.append(jnp.exp(-jnp.abs(x - other)) * inside)
        return jnp.stack(chans, -1)

    return forward


def _center_model(ndim):
    """An equivariant 'centre' network: class probabilities and heatmap from the grey value, and
    at each voxel the vector to the window's grey-value centroid."""

    def forward(x):
        b, z, h, w = x.shape
        grid = jnp.stack(jnp.meshgrid(jnp.arange(z), jnp.arange(h), jnp.arange(w), indexing="ij"))
        grid = grid.astype(x.dtype)  # [3, z, y, x]
        mass = x.sum(axis=(1, 2, 3))  # [b]
        cen = jnp.einsum("bzyx,azyx->ba", x, grid) / mass[:, None]  # [b, 3]
        vec = cen[:, :, None, None, None] - grid[None]  # [b, 3, z, y, x]
        vec = jnp.moveaxis(vec, 1, -1)[..., 3 - ndim :]
        return jnp.concatenate([1 - x[..., None], x[..., None], x[..., None] ** 2, vec], -1)

    return forward


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_equivariant_affinities_come_back_unchanged(mode):
    x = jax.random.uniform(jax.random.key(0), (2, 6, 8, 8))
    forward = _affinity_model(OFFSETS_3D)
    task = SimpleNamespace(kind="affinity", offsets=OFFSETS_3D)
    lay = Layout(0, len(OFFSETS_3D))
    tfs = tta.transforms(mode, 3)
    assert len(tfs) == {"flips": 8, "dihedral": 16}[mode] and tfs[0] == tta.Transform()
    maps = tta.channel_maps(tfs, task, lay, 3)
    # every flip that reverses an offset reads that channel shifted by the offset
    assert maps[1].shift[2] == (0, 0, -1) and maps[1].src[2] == 2  # x flipped
    np.testing.assert_allclose(tta.apply(forward, x, tfs, maps), forward(x), atol=1e-6)


def test_affinities_of_a_2d_model_in_plane_turns():
    offs = [[0, -1, 0], [0, 0, -1], [0, -4, 0], [0, 0, -4]]
    x = jax.random.uniform(jax.random.key(1), (3, 1, 12, 12))
    task = SimpleNamespace(kind="affinity", offsets=offs)
    tfs = tta.transforms("dihedral", 2)
    assert len(tfs) == 8 and all(0 not in t.flips for t in tfs)  # a 2D model: z is not flipped
    maps = tta.channel_maps(tfs, task, Layout(0, 4), 2)
    swapped = next(m for t, m in zip(tfs, maps) if t.transpose and not t.flips)
    assert swapped.src == (1, 0, 3, 2)  # y and x swapped: the y offsets come from the x channels
    forward = _affinity_model(offs)
    np.testing.assert_allclose(tta.apply(forward, x, tfs, maps), forward(x), atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_equivariant_center_vectors_come_back_unchanged(ndim):
    z = 1 if ndim == 2 else 5
    x = jax.random.uniform(jax.random.key(2), (2, z, 10, 10)) + 0.1
    forward = _center_model(ndim)
    task = SimpleNamespace(kind="center")
    lay = Layout(2, 0, 1 + ndim)
    tfs = tta.transforms("dihedral", ndim)
    maps = tta.channel_maps(tfs, task, lay, ndim)
    y_flip = maps[tfs.index(tta.Transform((1,), False))]
    assert y_flip.sign[-2] == -1.0 and y_flip.sign[-1] == 1.0
    np.testing.assert_allclose(tta.apply(forward, x, tfs, maps), forward(x), atol=1e-5)


def test_a_model_that_is_not_equivariant_gets_the_mean_of_the_mapped_back_predictions():
    x = jax.random.uniform(jax.random.key(3), (1, 4, 8, 8))
    ramp = jnp.arange(8.0)[None, None, :, None] / 8

    def forward(v):  # position-dependent: a flipped window is not predicted as a flipped one
        p = jnp.clip(v * 0.5 + ramp * 0.5, 0, 1)
        return jnp.stack([1 - p, p], -1)

    task = SimpleNamespace(kind="boundary")
    tfs = tta.transforms("flips", 3)
    out = tta.apply(forward, x, tfs, tta.channel_maps(tfs, task, Layout(2), 3))
    want = np.mean(
        [
            np.flip(forward(jnp.flip(x, [1 + a for a in t.flips])), [1 + a for a in t.flips])
            for t in tfs
        ],
        axis=0,
    )
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert not np.allclose(out, forward(x), atol=1e-3)
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, atol=1e-6)
    # none: the model's own prediction
    one = tta.transforms("none", 3)
    np.testing.assert_array_equal(tta.apply(forward, x, one, []), forward(x))


def test_bad_settings_are_named():
    with pytest.raises(UserError, match="predict.tta='sideways'"):
        tta.transforms("sideways", 3)
    with pytest.raises(UserError, match=r"square window in-plane; predict.window=\[16, 64, 48\]"):
        tta.check_window("dihedral", [16, 64, 48])
    tta.check_window("flips", [16, 64, 48])
    diag = SimpleNamespace(kind="affinity", offsets=[[0, -1, -1], [0, -1, 0]])
    with pytest.raises(UserError, match=r"offset \[0, -1, -1\] of task.offsets becomes"):
        tta.channel_maps(tta.transforms("flips", 2), diag, Layout(0, 2), 2)
