"""Structure discovery in exported features: streaming mini-batch k-means, a cluster label volume,
per-cluster galleries of example crops and a PCA-RGB overview.

The features (`[z', y', x', c]`, written by `export_features`, possibly far larger than memory) are read
block by block twice: a fitting pass feeds shuffled mini-batches to scikit-learn's MiniBatchKMeans
(`partial_fit`, Sculley 2010), a labelling pass writes each block's cluster map to a zarr v3 label volume
and keeps, per cluster, a seeded random sample of cells (the cells with the smallest random keys, which
merges exactly across blocks). Gallery crops are cut from the image volume the features came from, centred
on those cells (feature cell -> voxel through the export's stride and ROI origin).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from emfm.data.volume import VolumeError, create_volume, open_volume
from emfm.train.logging import progress

log = logging.getLogger("emfm")

MAX_VECTORS_PER_READ = 1 << 18


def read_blocks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[slice, slice, slice]]:
    """Regions of the feature grid read at once: whole chunks, grouped in-plane up to ~2^18 vectors."""
    cz, cy, cx = chunks[:3]
    per = max(1, MAX_VECTORS_PER_READ // (cz * cy * cx))
    gy = max(1, min(math.ceil(shape[1] / cy), int(math.sqrt(per))))
    gx = max(1, min(math.ceil(shape[2] / cx), per // gy))
    by, bx = cy * gy, cx * gx
    return [(slice(z, min(z + cz, shape[0])), slice(y, min(y + by, shape[1])), slice(x, min(x + bx, shape[2])))
            for z in range(0, shape[0], cz) for y in range(0, shape[1], by) for x in range(0, shape[2], bx)]


def _stream(fv, regions):
    """(region, float32 [n, c] vectors) per region, the next read in flight while one is processed."""
    fut = fv.read_async(regions[0] + (slice(None),)) if regions else None
    for i, r in enumerate(regions):
        nxt = fv.read_async(regions[i + 1] + (slice(None),)) if i + 1 < len(regions) else None
        a = fv.result(fut, r + (slice(None),))
        yield r, a.reshape(-1, a.shape[-1]).astype(np.float32)
        fut = nxt


def discover(features: str, run_dir: str | Path, *, image: str = "", k: int = 8, batch_size: int = 4096,
             epochs: int = 1, sample_fraction: float = 1.0, examples: int = 12, crop: int = 64, seed: int = 0,
             out: str = "", show_progress: bool = True) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    run_dir = Path(run_dir)
    fv = open_volume(features)
    if fv.ndim != 4:
        raise VolumeError(f"features {features} have {fv.ndim} dimensions; discover reads [z, y, x, c] feature "
                          "arrays written by emfm export")
    attrs = fv.attributes
    src = image or attrs.get("source", "")
    if not src:
        raise VolumeError(f"features {features} do not name their source volume: give image=PATH")
    img = open_volume(src)
    if img.ndim != 3:
        raise VolumeError(f"image {src} has {img.ndim} dimensions; discover needs the z, y, x volume that was exported")
    stride = tuple(attrs.get("stride", (1, 1, 1)))
    origin = tuple(attrs.get("roi_origin", (0, 0, 0)))
    grid = fv.shape[:3]
    if any(o + g * s > n + s - 1 for o, g, s, n in zip(origin, grid, stride, img.shape)):
        raise VolumeError(f"features {features} of grid {grid} (stride {stride}, origin {origin}) do not fit "
                          f"image {src} of shape {img.shape}")
    regions = read_blocks(fv.shape, fv.chunks)
    rng = np.random.default_rng(seed)
    km = MiniBatchKMeans(n_clusters=k, batch_size=batch_size, random_state=seed, n_init=3)
    # ---- fitting pass(es): shuffled mini-batches of each block; a too-small remainder joins the next block
    bar = progress(len(regions) * epochs, desc="discover: fit", enabled=show_progress)
    carry = np.zeros((0, fv.shape[-1]), np.float32)
    seen = 0
    for _ in range(epochs):
        for _, x in _stream(fv, regions):
            if sample_fraction < 1.0:
                x = x[rng.random(len(x)) < sample_fraction]
            x = np.concatenate([carry, x[rng.permutation(len(x))]])
            n_full = len(x) // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                km.partial_fit(x[i:i + batch_size])
            carry, seen = x[n_full:], seen + n_full
            bar.update(1)
    if len(carry) >= k:  # the remainder (MiniBatchKMeans weighs each update by the centres' counts)
        km.partial_fit(carry)
        seen += len(carry)
    bar.close()
    if not hasattr(km, "cluster_centers_"):
        raise VolumeError(f"features {features} hold {len(carry)} vectors, fewer than k={k} clusters")
    # ---- labelling pass: cluster map, counts, inertia, a random sample of cells per cluster
    label_dtype = np.uint8 if k <= 255 else np.uint16
    out = out or str(run_dir / "clusters.zarr")
    lv = create_volume(out, grid, label_dtype, chunks=fv.chunks[:3], voxel_size=fv.voxel_size,
                       attributes={"features": str(features), "source": src, "stride": list(stride),
                                   "roi_origin": list(origin), "k": k, "content": "k-means cluster of each feature cell"})
    counts = np.zeros(k, np.int64)
    inertia = 0.0
    keys = [np.zeros(0) for _ in range(k)]
    cells = [np.zeros((0, 3), np.int64) for _ in range(k)]
    writes = []
    bar = progress(len(regions), desc="discover: label", enabled=show_progress)
    for i, (r, x) in enumerate(_stream(fv, regions)):
        lab = km.predict(x)
        inertia += float(-km.score(x))
        counts += np.bincount(lab, minlength=k)
        shape = tuple(s.stop - s.start for s in r)
        writes.append(lv.array[r].write(lab.reshape(shape).astype(label_dtype)))
        u = np.random.default_rng([seed, i]).random(len(lab))
        pos = np.stack(np.unravel_index(np.arange(len(lab)), shape), -1) + [s.start for s in r]
        for c in np.unique(lab):
            m = lab == c
            kk, pp = np.concatenate([keys[c], u[m]]), np.concatenate([cells[c], pos[m]])
            keep = np.argsort(kk, kind="stable")[:examples]
            keys[c], cells[c] = kk[keep], pp[keep]
        if len(writes) > 8:
            writes.pop(0).result()
        bar.update(1)
    for w in writes:
        w.result()
    bar.close()
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "centroids.npy", km.cluster_centers_.astype(np.float32))
    galleries = _galleries(img, cells, stride, origin, crop, run_dir / "galleries")
    overview = _overview(img, fv, lv, stride, origin, k, run_dir / "figures" / "discover_overview.png")
    res = {"features": str(features), "image": src, "labels": out, "k": k, "vectors": int(counts.sum()),
           "fit_vectors": int(seen), "epochs": epochs, "counts": counts.tolist(),
           "fractions": (counts / max(1, counts.sum())).round(6).tolist(), "inertia_per_vector": inertia / max(1, counts.sum()),
           "galleries": galleries, "overview": str(overview)}
    (run_dir / "discover.json").write_text(json.dumps(res, indent=1))
    log.info("discover: %d clusters over %d vectors; cluster sizes %s", k, res["vectors"], res["counts"])
    return res


def _crop(img, centre, side: int) -> np.ndarray:
    z, y, x = centre
    h = side // 2
    region = (slice(z, z + 1), slice(max(0, y - h), min(img.shape[1], y - h + side)),
              slice(max(0, x - h), min(img.shape[2], x - h + side)))
    a = img.read(region)[0].astype(np.float32)
    pad = ((max(0, h - y), side - a.shape[0] - max(0, h - y)), (max(0, h - x), side - a.shape[1] - max(0, h - x)))
    return np.pad(a, pad, mode="constant", constant_values=np.nan)


def _galleries(img, cells, stride, origin, side: int, folder: Path) -> list[str]:
    """One PNG per cluster: its example crops in a row-major grid, the example's feature cell outlined."""
    from emfm.eval.figures import _plt

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    lo, hi = np.percentile(img.read((slice(img.shape[0] // 2, img.shape[0] // 2 + 1),)), [0.5, 99.5])
    for c, cs in enumerate(cells):
        if not len(cs):
            continue
        centres = [tuple(int(o + v * s + s // 2) for o, v, s in zip(origin, cell, stride)) for cell in cs]
        crops = [_crop(img, ce, side) for ce in centres]
        cols = min(6, len(crops))
        rows = -(-len(crops) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.3), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, a, ce in zip(axes.ravel(), crops, centres):
            ax.imshow(a, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            hy, hx = stride[1] / 2, stride[2] / 2
            ax.add_patch(plt.Rectangle((side // 2 - hx - 0.5, side // 2 - hy - 0.5), 2 * hx, 2 * hy, fill=False,
                                       edgecolor=plt.cm.tab20(c % 20), linewidth=1.2))
            ax.set_title(f"z{ce[0]} y{ce[1]} x{ce[2]}", fontsize=6)
        fig.suptitle(f"cluster {c}", fontsize=9)
        fig.tight_layout()
        p = folder / f"cluster_{c:02d}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(str(p))
    return paths


def _overview(img, fv, lv, stride, origin, k: int, path: Path) -> Path:
    """Middle section of the feature grid (at most 512 x 512 cells): image, PCA-RGB features, cluster map."""
    from emfm.eval.figures import _plt, image_grid
    from emfm.export.features import pca_rgb

    z = fv.shape[0] // 2
    cy, cx = (min(n, 512) for n in fv.shape[1:3])
    feats = fv.read((slice(z, z + 1), slice(0, cy), slice(0, cx)))[0].astype(np.float32)
    rgb, _ = pca_rgb(feats)
    lab = lv.read((slice(z, z + 1), slice(0, cy), slice(0, cx)))[0]
    colours = _plt().cm.tab20(np.arange(k) % 20)[:, :3]
    zi = origin[0] + z * stride[0] + stride[0] // 2
    section = img.read((slice(zi, zi + 1), slice(origin[1], origin[1] + cy * stride[1]),
                        slice(origin[2], origin[2] + cx * stride[2])))
    image_grid(path, [(f"section {zi}", section), ("features: PCA 1-3 as RGB", rgb[None]),
                      (f"k-means clusters (k={k})", colours[lab][None])])
    return path
