"""Principal components of dense features: the basis an export reduces its features to (fitted on
a seeded sample of blocks), and the RGB preview of a feature map's first three components."""

from __future__ import annotations

import numpy as np

from emfm.export.encode import BlockEncoder, WindowReader, block_part


def fit_pca(
    enc: BlockEncoder,
    read: WindowReader,
    origins,
    size,
    k: int,
    n_blocks: int,
    seed: int,
    *,
    max_vectors: int = 200_000,
) -> dict:
    """Mean, top-k principal axes and their explained-variance ratios of the features of a seeded
    random sample of the blocks at `origins` of a region of `size` voxels (features of cells past
    its edge left out)."""
    rng = np.random.default_rng(seed)
    pick = sorted(
        rng.choice(len(origins), size=min(n_blocks, len(origins)), replace=False).tolist()
    )
    vecs = []
    for batch, windows in read(enc, [origins[j] for j in pick]):
        for o, f in zip(batch, enc(windows, raw=True)):
            f = block_part(enc, o, f, size)[1]
            vecs.append(f.reshape(-1, f.shape[-1]))
    x = np.concatenate(vecs)
    if len(x) > max_vectors:
        x = x[np.sort(rng.choice(len(x), max_vectors, replace=False))]
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = sv**2
    return {
        "k": k,
        "mean": mean.astype(np.float32).tolist(),
        "components": vt[:k].astype(np.float32).tolist(),
        "explained_variance_ratio": (var[:k] / var.sum()).astype(np.float32).tolist(),
        "vectors": int(len(x)),
        "blocks": len(pick),
    }


def pca_rgb(
    features: np.ndarray, *, sample: int = 20000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """First three principal components of `[..., d]` features as RGB in [0, 1], and the
    explained-variance ratios. PCA is fitted on a random sample of feature vectors."""
    f = features.reshape(-1, features.shape[-1]).astype(np.float32)
    rng = np.random.default_rng(seed)
    s = f[rng.choice(len(f), size=min(sample, len(f)), replace=False)]
    mu = s.mean(0)
    _, sv, vt = np.linalg.svd(s - mu, full_matrices=False)
    proj = (f - mu) @ vt[:3].T
    if proj.shape[1] < 3:  # fewer than three channels: pad with zeros
        proj = np.concatenate([proj, np.zeros((len(proj), 3 - proj.shape[1]), np.float32)], axis=1)
    lo, hi = np.percentile(proj, [1, 99], axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    return rgb.reshape(features.shape[:-1] + (3,)), (sv[:3] ** 2) / (sv**2).sum()
