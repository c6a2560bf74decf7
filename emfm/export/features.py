"""Dense feature export of a whole volume, tile by tile with overlap, to zarr v3 through tensorstore.

For a 2D encoder each section is cut into in-plane tiles of `tile` pixels, each read with `margin`
pixels of context on every side (mirrored at the volume edge), encoded, and only the tile's own
tokens (margins dropped) are written, so features show no tile seams. The output is
`[z, ceil(y/p), ceil(x/p), d]` at token resolution (voxel size z, p*y, p*x), chunked one tile per chunk;
tiles already written are skipped when an interrupted export is restarted (`resume=True`), which
yields the same bytes.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emfm.data.volume import Volume, VolumeError, create_volume
from emfm.eval.probe import normalise
from emfm.train.logging import progress

log = logging.getLogger("emfm")


class TileEncoder:
    """Encodes batches of `[tile + 2 margin]^2` windows and keeps the tile's own tokens."""

    def __init__(self, encoder, *, tile: int, margin: int, batch_size: int = 8, blocks: tuple[int, ...] = ()):
        spec = encoder.spec
        if spec.ndim != 2:
            raise VolumeError("tiled encoding of 3D encoders is not available in this version; use a 2D encoder")
        p = spec.patch_size[-1]
        if tile % p or margin % p:
            raise VolumeError(f"tile {tile} and margin {margin} must be multiples of the patch size {p}")
        self.tile, self.margin, self.batch_size, self.patch = tile, margin, batch_size, p
        blocks = tuple(b % spec.depth for b in blocks)
        self.width = spec.width * max(1, len(blocks))
        graphdef, self.params = nnx.split(encoder)
        lo, hi = margin // p, (margin + tile) // p

        @jax.jit
        def fwd(prm, x):
            _, aux = nnx.merge(graphdef, prm)(x[..., None], return_blocks=blocks)
            if not blocks:
                return aux["patch_map"][:, lo:hi, lo:hi]
            gy, gx = aux["patch_map"].shape[1:3]
            maps = [aux["blocks"][b].reshape(x.shape[0], gy, gx, -1) for b in blocks]
            return jnp.concatenate(maps, axis=-1)[:, lo:hi, lo:hi]

        self._fwd = fwd

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        n = len(windows)
        if n < self.batch_size:  # keep one compiled shape
            windows = np.concatenate([windows, np.zeros((self.batch_size - n,) + windows.shape[1:], windows.dtype)])
        return np.asarray(self._fwd(self.params, jnp.asarray(windows)))[:n]


def window(read, shape_yx: tuple[int, int], y0: int, x0: int, tile: int, margin: int) -> np.ndarray:
    """The tile at (y0, x0) with `margin` context, mirrored where it runs past the section edge.
    `read(ys, xs)` returns the pixels of a 2D region."""
    ny, nx = shape_yx
    full = tile + 2 * margin
    ya, yb = max(0, y0 - margin), min(ny, y0 - margin + full)
    xa, xb = max(0, x0 - margin), min(nx, x0 - margin + full)
    a = read(slice(ya, yb), slice(xa, xb))
    pad = ((ya - (y0 - margin), (y0 - margin + full) - yb), (xa - (x0 - margin), (x0 - margin + full) - xb))
    mode = "reflect" if all(s > max(pw) for s, pw in zip(a.shape, pad)) else "symmetric"
    return np.pad(a, pad, mode=mode)


def encode_sections(encoder, images: np.ndarray, *, tile: int = 128, margin: int = 32, batch_size: int = 8,
                    blocks: tuple[int, ...] = ()) -> np.ndarray:
    """Features `[n, ceil(y/p), ceil(x/p), d]` of in-memory sections `[n, y, x]` (floats in [0, 1]),
    encoded tile by tile exactly as `export_features` does."""
    enc = TileEncoder(encoder, tile=tile, margin=margin, batch_size=batch_size, blocks=blocks)
    n, ny, nx = images.shape
    p = enc.patch
    out = np.zeros((n, -(-ny // p), -(-nx // p), enc.width), np.float32)
    jobs = [(z, y0, x0) for z in range(n) for y0 in range(0, ny, tile) for x0 in range(0, nx, tile)]
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        w = np.stack([window(lambda ys, xs, z=z: images[z, ys, xs], (ny, nx), y0, x0, tile, margin) for z, y0, x0 in chunk])
        for (z, y0, x0), f in zip(chunk, enc(w)):
            hy, hx = -(-min(tile, ny - y0) // p), -(-min(tile, nx - x0) // p)
            out[z, y0 // p: y0 // p + hy, x0 // p: x0 // p + hx] = f[:hy, :hx]
    return out


def export_features(encoder, vol: Volume, out_path: str | Path, *, grey_range: tuple[float, float], tile: int = 256,
                    margin: int = 32, dtype: str = "float16", batch_size: int = 8, resume: bool = True,
                    show_progress: bool = True) -> dict:
    if vol.ndim != 3:
        raise VolumeError(f"volume {vol.path} has {vol.ndim} dimensions; export expects z, y, x")
    enc = TileEncoder(encoder, tile=tile, margin=margin, batch_size=batch_size)
    p = enc.patch
    nz, ny, nx = vol.shape
    gy, gx = math.ceil(ny / p), math.ceil(nx / p)
    out_dtype = {"float16": np.float16, "float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
    out = create_volume(out_path, (nz, gy, gx, enc.width), np.dtype(out_dtype),
                        chunks=(1, tile // p, tile // p, enc.width),
                        voxel_size=(vol.voxel_size[0], vol.voxel_size[1] * p, vol.voxel_size[2] * p),
                        attributes={"source": vol.path, "patch_size": list(encoder.spec.patch_size), "tile": tile,
                                    "margin": margin, "grey_range": list(grey_range),
                                    "content": "encoder patch features (final norm)"},
                        exist_ok=resume)
    done = _written_chunks(out) if resume else set()
    jobs = [(z, y0, x0) for z in range(nz) for y0 in range(0, ny, tile) for x0 in range(0, nx, tile)
            if (z, y0 // tile, x0 // tile) not in done]
    bar = progress(len(jobs), desc="export", enabled=show_progress)
    t0 = time.perf_counter()
    voxels = 0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        w = np.stack([window(lambda ys, xs, z=z: vol.read((slice(z, z + 1), ys, xs))[0], (ny, nx), y0, x0, tile, margin)
                      for z, y0, x0 in chunk])
        feats = enc(normalise(w, grey_range))
        writes = []
        for (z, y0, x0), f in zip(chunk, feats):
            ty, tx = min(tile, ny - y0), min(tile, nx - x0)
            hy, hx = math.ceil(ty / p), math.ceil(tx / p)
            writes.append(out.array[z, y0 // p: y0 // p + hy, x0 // p: x0 // p + hx, :].write(f[:hy, :hx].astype(out_dtype)))
            voxels += ty * tx
        for wr in writes:
            wr.result()
        bar.update(len(chunk))
        bar.set_postfix(vox_s=f"{voxels / (time.perf_counter() - t0):.3g}")
    bar.close()
    secs = time.perf_counter() - t0
    return {"path": str(out_path), "shape": list(out.shape), "dtype": dtype, "tiles_written": len(jobs),
            "tiles_skipped": len(done), "seconds": secs, "voxels_per_s": voxels / secs if secs > 0 else None}


def _written_chunks(out: Volume) -> set[tuple[int, int, int]]:
    """Chunks present in the store (each holds one finished tile)."""
    kv = out.array.kvstore
    done = set()
    for key in kv.list().result():
        k = key.decode() if isinstance(key, bytes) else key
        if k.startswith("c/"):
            parts = k[2:].split("/")
            if len(parts) == 4:
                done.add(tuple(int(v) for v in parts[:3]))
    return done


def pca_rgb(features: np.ndarray, *, sample: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """First three principal components of `[..., d]` features as RGB in [0, 1], and the
    explained-variance ratios. PCA is fitted on a random sample of feature vectors."""
    f = features.reshape(-1, features.shape[-1]).astype(np.float32)
    rng = np.random.default_rng(seed)
    s = f[rng.choice(len(f), size=min(sample, len(f)), replace=False)]
    mu = s.mean(0)
    _, sv, vt = np.linalg.svd(s - mu, full_matrices=False)
    proj = (f - mu) @ vt[:3].T
    lo, hi = np.percentile(proj, [1, 99], axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    return rgb.reshape(features.shape[:-1] + (3,)), (sv[:3] ** 2) / (sv ** 2).sum()
