"""The one windowed encoder (emfm.export.encode): tiled features equal a whole-volume forward where
that is expected (a U-Net whose receptive field fits in the margin, a ViT whose one window covers
the volume; 2D and 3D encoders), and the in-memory encoder and the feature export give the same
blended features."""

import jax.numpy as jnp
import numpy as np
import pytest

from emfm.config.schema import ModelConfig
from emfm.data.volume import open_volume, write_array
from emfm.export.encode import encode
from emfm.export.features import export_features
from emfm.models import build_encoder


def _mirrored_forward(enc, x: np.ndarray, margin: tuple[int, int, int], layers=()):
    """Features of one forward over the whole volume `[z, y, x]` mirrored by `margin`, margin
    cropped: the decoder output, or U-Net levels upsampled (nearest) to full resolution."""
    ndim = enc.spec.ndim
    padded = np.pad(x, [(m, m) for m in margin], mode="reflect")
    inp = padded[..., None] if ndim == 2 else padded[None, ..., None]
    _, aux = enc(jnp.asarray(inp), return_blocks=layers)
    maps = [aux["patch_map"]] if not layers else [aux["blocks"][i] for i in layers]
    out = []
    for lvl, f in zip(layers or (0,), maps):
        f = np.asarray(f) if ndim == 2 else np.asarray(f)[0]
        for ax, p in enumerate((1,) * (3 - ndim) + enc.spec.pool_window(1) if lvl else (1, 1, 1)):
            f = np.repeat(f, p, axis=ax)
        out.append(f[tuple(slice(m, f.shape[a] - m) for a, m in enumerate(margin))])
    return np.concatenate(out, -1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_unet_tiles_equal_a_whole_volume_forward(ndim):
    """A per-pixel norm and a margin beyond the receptive field: tile-by-tile features (decoder
    output, and encoder levels on a common grid) equal one forward over the mirrored volume."""
    enc = build_encoder(
        ModelConfig(name="unet", patch_size=[1] * ndim, width=8, depth=2, norm="layer"), seed=3
    )
    x = np.random.default_rng(0).random((3 if ndim == 2 else 16, 48, 48)).astype(np.float32)
    margin = (0 if ndim == 2 else 12, 16, 16)
    kw = dict(tile=16, margin=16, tile_z=4, margin_z=margin[0], batch_size=4)
    tiled = encode(enc, x, **kw)
    assert tiled.shape == x.shape + (8,)
    np.testing.assert_allclose(tiled, _mirrored_forward(enc, x, margin), rtol=0, atol=2e-5)
    both = encode(enc, x, layers=(0, 1), **kw)
    want = _mirrored_forward(enc, x, margin, layers=(0, 1))
    np.testing.assert_allclose(both, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("patch", [(8, 8), (2, 8, 8)])
def test_vit_window_over_the_whole_volume_equals_its_forward(patch):
    """A ViT's features depend on where a token sits in its window, so only one window over the
    whole volume (tile=None) gives the whole-volume forward: final tokens and chosen blocks."""
    enc = build_encoder(ModelConfig(width=32, depth=2, heads=2, patch_size=list(patch)), seed=0)
    x = np.random.default_rng(1).random((4, 32, 48)).astype(np.float32)
    inp = x[..., None] if len(patch) == 2 else x[None, ..., None]
    _, aux = enc(jnp.asarray(inp), return_blocks=(0, 1))
    grid = aux["patch_map"].shape[:-1]
    whole = np.asarray(aux["patch_map"]).reshape(-1, 6, 32)
    blocks = np.concatenate(
        [np.asarray(aux["blocks"][i]).reshape(grid + (32,)) for i in (0, 1)], -1
    )
    f = encode(enc, x, tile=None, margin=0, batch_size=2)
    assert f.shape == (4 // (len(patch) - 1), 4, 6, 32)
    np.testing.assert_allclose(f.reshape(-1, 6, 32), whole, rtol=0, atol=1e-5)
    g = encode(enc, x, tile=None, margin=0, layers=(0, 1), batch_size=2)
    np.testing.assert_allclose(g.reshape(-1, 6, 64), blocks.reshape(-1, 6, 64), rtol=0, atol=1e-5)


def test_in_memory_encoding_equals_the_export(tmp_path):
    """Blended ViT windows: the in-memory encoder and the feature export are one code path."""
    enc = build_encoder(ModelConfig(width=32, depth=2, heads=2, patch_size=[8, 8]), seed=0)
    x = np.random.default_rng(2).random((2, 96, 160)).astype(np.float32)
    write_array(tmp_path / "x.zarr", x)
    vol = open_volume(tmp_path / "x.zarr")
    kw = dict(tile=32, margin=16, blend="cosine")
    export_features(
        enc,
        vol,
        tmp_path / "f.zarr",
        grey_range=(0.0, 1.0),
        dtype="float32",
        **kw,
        show_progress=False,
    )
    np.testing.assert_array_equal(open_volume(tmp_path / "f.zarr").read(), encode(enc, x, **kw))


def test_clustering_regime_encodes_sections_in_tiles():
    """The clustering regime's features (regimes.dense_features) come from tiles with a margin: for
    a U-Net whose receptive field fits in the margin they equal one window over each whole section
    away from the section's edges (mirrored context there, the convolutions' zero padding in the
    whole window), also with a tile larger than the sections; a tile that is not a multiple of the
    pooling is named."""
    from emfm.errors import UserError
    from emfm.finetune.regimes import dense_features, fit_clusters

    enc = build_encoder(
        ModelConfig(name="unet", patch_size=[1, 1], width=8, depth=2, norm="layer"), seed=3
    )
    x = np.random.default_rng(4).random((3, 48, 80)).astype(np.float32)
    whole = encode(enc, x, tile=None, margin=0, batch_size=4)
    tiled = np.concatenate(list(dense_features(enc, x, tile=16, margin=16, batch=2)))
    assert tiled.shape == x.shape + (8,)
    inner = np.s_[:, 16:-16, 16:-16]
    np.testing.assert_allclose(tiled[inner], whole[inner], rtol=0, atol=2e-5)
    larger = np.concatenate(list(dense_features(enc, x, tile=256, margin=16)))
    assert larger.shape == tiled.shape
    np.testing.assert_allclose(larger[inner], whole[inner], rtol=0, atol=2e-5)
    predict = fit_clusters(enc, x, "kmeans", 2, samples=600, tile=16, margin=16)
    assert predict(x[:2]).shape == (2, 48, 80)
    with pytest.raises(UserError, match=r"must be a multiple of \(1, 2, 2\)"):
        next(dense_features(enc, x, tile=15, margin=16))
