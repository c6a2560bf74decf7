"""Structure discovery in exported features: streaming mini-batch k-means, a cluster label volume,
per-cluster galleries of example crops and a PCA-RGB overview.

The features (`[z', y', x', c]`, written by `export_features`, possibly far larger than memory) are
read block by block twice: a fitting pass feeds shuffled mini-batches to scikit-learn's
MiniBatchKMeans (`partial_fit`, Sculley 2010), a labelling pass writes each block's cluster map to
an OME-Zarr label volume (on the features' grid, same scale and translation)
and keeps, per cluster, a seeded random sample of cells (the cells with the smallest random keys,
which merges exactly across blocks). Gallery crops are cut from the image volume the features came
from, centred on those cells (feature cell -> voxel through the export's stride and ROI origin).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emfm.data.volume import Volume, VolumeError, create_ome_zarr, open_volume
from emfm.export.discover_figures import galleries, overview
from emfm.export.discover_state import DiscoverState, fingerprint
from emfm.train.logging import progress

log = logging.getLogger("emfm")

MAX_VECTORS_PER_READ = 1 << 18


def read_blocks(
    shape: tuple[int, ...], chunks: tuple[int, ...]
) -> list[tuple[slice, slice, slice]]:
    """Regions of the feature grid read at once: whole chunks, grouped in-plane up to ~2^18
    vectors."""
    cz, cy, cx = chunks[:3]
    per = max(1, MAX_VECTORS_PER_READ // (cz * cy * cx))
    gy = max(1, min(math.ceil(shape[1] / cy), int(math.sqrt(per))))
    gx = max(1, min(math.ceil(shape[2] / cx), per // gy))
    by, bx = cy * gy, cx * gx
    return [
        (
            slice(z, min(z + cz, shape[0])),
            slice(y, min(y + by, shape[1])),
            slice(x, min(x + bx, shape[2])),
        )
        for z in range(0, shape[0], cz)
        for y in range(0, shape[1], by)
        for x in range(0, shape[2], bx)
    ]


def _stream(fv, regions):
    """(region, float32 [n, c] vectors) per region, the next read in flight while one is
    processed."""
    fut = fv.read_async(regions[0] + (slice(None),)) if regions else None
    for i, r in enumerate(regions):
        nxt = fv.read_async(regions[i + 1] + (slice(None),)) if i + 1 < len(regions) else None
        a = fv.result(fut, r + (slice(None),))
        yield r, a.reshape(-1, a.shape[-1]).astype(np.float32)
        fut = nxt


def discover(
    features: str,
    run_dir: str | Path,
    *,
    image: str = "",
    k: int = 8,
    batch_size: int = 4096,
    epochs: int = 1,
    sample_fraction: float = 1.0,
    examples: int = 12,
    crop: int = 64,
    seed: int = 0,
    out: str = "",
    resume: bool = True,
    state_every_s: float = 30.0,
    show_progress: bool = True,
) -> dict:
    """Cluster the feature array at `features` (see the module docstring). Interrupted and restarted
    with the same arguments (`resume`), it continues from the saved fit state and skips the regions
    whose label chunks were written, and gives the same output as an uninterrupted run."""
    run_dir = Path(run_dir)
    src = _Sources.open(features, image)
    fv = src.fv
    out = out or str(run_dir / "clusters.zarr")
    params = dict(k=k, batch_size=batch_size, epochs=epochs, sample_fraction=sample_fraction)
    fp = fingerprint(features, fv, out, **params, examples=examples, seed=seed)
    state = DiscoverState(run_dir, fp, resume=resume, every_s=state_every_s)
    regions = read_blocks(fv.shape, fv.chunks)
    st, fit_skipped = _fit(src, regions, state, seed=seed, show_progress=show_progress, **params)
    km = st["km"]
    # ---- labelling pass: cluster map, counts, inertia, a random sample of cells per cluster
    lv, label_skipped = _label_pass(src, state, out, km, regions, k, seed, examples, show_progress)
    res = _results(
        src, lv, st, state.labelled(), len(regions), run_dir, out, epochs, examples, crop
    )
    log.info(
        "discover: %d clusters over %d vectors; cluster sizes %s (resumed: %d fit regions and %d "
        "labelled regions skipped)",
        k,
        res["vectors"],
        res["counts"],
        fit_skipped,
        label_skipped,
    )
    return res | {"fit_regions_skipped": fit_skipped, "label_regions_skipped": label_skipped}


def _results(src, lv, st, recs, n_regions, run_dir: Path, out, epochs, examples, crop) -> dict:
    """The run's record (written as discover.json beside the centroids, galleries and overview it
    names), from the fit state `st` and the labelling records `recs` of the `n_regions` regions."""
    km = st["km"]
    k = km.n_clusters
    counts, inertia, cells = _merge(recs, n_regions, k, examples)
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "centroids.npy", km.cluster_centers_.astype(np.float32))
    img, stride, origin = src.img, src.stride, src.origin
    gallery_files = galleries(img, cells, stride, origin, crop, run_dir / "galleries")
    overview_file = overview(
        img, src.fv, lv, stride, origin, k, run_dir / "figures" / "discover_overview.png"
    )
    res = {
        "features": str(src.features),
        "image": src.path,
        "labels": out,
        "k": k,
        "vectors": int(counts.sum()),
        "fit_vectors": int(st["seen"]),
        "epochs": epochs,
        "counts": counts.tolist(),
        "fractions": (counts / max(1, counts.sum())).round(6).tolist(),
        "inertia_per_vector": inertia / max(1, counts.sum()),
        "galleries": gallery_files,
        "overview": str(overview_file),
        "examples": [c.tolist() for c in cells],
    }  # feature cells (z, y, x) shown in each cluster's gallery
    (run_dir / "discover.json").write_text(json.dumps(res, indent=1))
    return res


@dataclass
class _Sources:
    """The feature array, the image volume it was exported from and how they align."""

    features: str
    fv: Volume
    path: str  # of the image volume
    img: Volume
    stride: tuple
    origin: tuple

    @classmethod
    def open(cls, features: str, image: str = "") -> _Sources:
        fv = open_volume(features)
        if fv.ndim != 4:
            raise VolumeError(
                f"features {features} have {fv.ndim} dimensions; discover reads [z, y, x, c] "
                "feature arrays written by emfm export"
            )
        attrs = fv.attributes
        src = image or attrs.get("source", "")
        if not src:
            raise VolumeError(
                f"features {features} do not name their source volume: give image=PATH"
            )
        img = open_volume(src)
        if img.ndim != 3:
            raise VolumeError(
                f"image {src} has {img.ndim} dimensions; discover needs the z, y, x volume that "
                "was exported"
            )
        stride = tuple(attrs.get("stride", (1, 1, 1)))
        origin = tuple(attrs.get("roi_origin", (0, 0, 0)))
        grid = fv.shape[:3]
        want = tuple(float(v) / st for v, st in zip(fv.voxel_size, stride))
        if image and any(abs(a - b) > 0.01 * b for a, b in zip(img.voxel_size, want)):
            raise VolumeError(
                f"image {src} has voxel size {tuple(img.voxel_size)} nm, but features {features} "
                f"were exported from a volume of {want} nm ({attrs.get('source') or 'unnamed'}): "
                "give the volume the features were exported from"
            )
        if any(o + g * s > n + s - 1 for o, g, s, n in zip(origin, grid, stride, img.shape)):
            raise VolumeError(
                f"features {features} of grid {grid} (stride {stride}, origin {origin}) do not fit "
                f"image {src} of shape {img.shape}"
            )
        return cls(features, fv, src, img, stride, origin)


def _fit(
    src: _Sources,
    regions,
    state: DiscoverState,
    *,
    k,
    batch_size,
    epochs,
    sample_fraction,
    seed,
    show_progress,
) -> tuple[dict, int]:
    """The fitting pass(es): shuffled mini-batches of each region (a too-small remainder joins the
    next region), resumed from the saved state. Returns (fit state, regions skipped)."""
    from sklearn.cluster import MiniBatchKMeans

    fv = src.fv
    st = state.load_fit() or {
        "epoch": 0,
        "next": 0,
        "fitted": False,
        "seen": 0,
        "rng": np.random.default_rng(seed),
        "carry": np.zeros((0, fv.shape[-1]), np.float32),
        "km": MiniBatchKMeans(n_clusters=k, batch_size=batch_size, random_state=seed, n_init=3),
    }
    km, rng = st["km"], st["rng"]
    fit_skipped = st["epoch"] * len(regions) + st["next"]
    if st["fitted"]:
        return st, fit_skipped
    bar = progress(
        len(regions) * epochs, initial=fit_skipped, desc="discover: fit", enabled=show_progress
    )
    for epoch in range(st["epoch"], epochs):
        first = st["next"] if epoch == st["epoch"] else 0
        for i, (_, x) in enumerate(_stream(fv, regions[first:]), start=first):
            if sample_fraction < 1.0:
                x = x[rng.random(len(x)) < sample_fraction]
            x = np.concatenate([st["carry"], x[rng.permutation(len(x))]])
            n_full = len(x) // batch_size * batch_size
            for j in range(0, n_full, batch_size):
                km.partial_fit(x[j : j + batch_size])
            st.update(carry=x[n_full:], seen=st["seen"] + n_full, epoch=epoch, next=i + 1)
            if i + 1 == len(regions):
                st.update(epoch=epoch + 1, next=0)
            state.save_fit(st, force=i + 1 == len(regions))
            bar.update(1)
    if len(st["carry"]) >= k:  # the remainder (MiniBatchKMeans weighs each update by its counts)
        km.partial_fit(st["carry"])
        st["seen"] += len(st["carry"])
    bar.close()
    if not hasattr(km, "cluster_centers_"):
        raise VolumeError(
            f"features {src.features} hold {len(st['carry'])} vectors, fewer than k={k} clusters"
        )
    st.update(fitted=True, carry=st["carry"][:0])
    state.save_fit(st, force=True)
    state.reset_labels()
    return st, fit_skipped


def _label_pass(src, state, out, km, regions, k, seed, examples, show_progress):
    """The cluster label volume with every region labelled, and how many regions an earlier run had
    labelled already."""
    lv, done = _label_volume(src, state, out, k)
    todo = [i for i in range(len(regions)) if i not in done]
    bar = progress(
        len(regions),
        initial=len(regions) - len(todo),
        desc="discover: label",
        enabled=show_progress,
    )
    with state.open_labels() as log_f:
        _label_regions(
            src.fv,
            lv,
            km,
            regions,
            todo,
            k=k,
            seed=seed,
            examples=examples,
            label_dtype=lv.dtype,
            on_done=lambda rec: state.add_label(rec, log_f),
            bar=bar,
        )
    bar.close()
    return lv, len(regions) - len(todo)


def _label_volume(src: _Sources, state: DiscoverState, out: str, k: int) -> tuple[Volume, dict]:
    """The cluster label volume (the one being written when resuming, else a new one) and the
    records of the regions already labelled in it."""
    fv, grid = src.fv, src.fv.shape[:3]
    label_dtype = np.uint8 if k <= 255 else np.uint16
    done = state.labelled()
    if done:
        try:
            lv = open_volume(out, write=True)
        except (OSError, ValueError):
            lv = None
        if lv is not None and lv.shape == grid and lv.dtype == label_dtype:
            return lv, done
        state.reset_labels()
    lv = create_ome_zarr(
        out,
        grid,
        label_dtype,
        chunks=fv.chunks[:3],
        voxel_size=fv.voxel_size,
        translation=fv.translation or None,
        name="emfm k-means clusters",
        attributes={
            "features": str(src.features),
            "source": src.path,
            "stride": list(src.stride),
            "roi_origin": list(src.origin),
            "k": k,
            "content": "k-means cluster of each feature cell",
        },
    )
    return lv, {}


def _merge(recs: dict, n_regions: int, k: int, examples: int):
    """Counts, inertia and the example cells per cluster, merged from the region records in region
    order (the same arithmetic however the job was interrupted)."""
    counts = np.zeros(k, np.int64)
    inertia = 0.0
    keys = [np.zeros(0) for _ in range(k)]
    cells = [np.zeros((0, 3), np.int64) for _ in range(k)]
    for i in range(n_regions):
        rec = recs[i]
        counts += np.asarray(rec["counts"], np.int64)
        inertia += rec["inertia"]
        smp = np.asarray(rec["samples"], np.float64).reshape(-1, 5)
        for c in range(k):
            m = smp[:, 0] == c
            if not m.any():
                continue
            kk = np.concatenate([keys[c], smp[m, 1]])
            pp = np.concatenate([cells[c], smp[m, 2:].astype(np.int64)])
            keep = np.argsort(kk, kind="stable")[:examples]
            keys[c], cells[c] = kk[keep], pp[keep]
    return counts, inertia, cells


def _label_regions(
    fv, lv, km, regions, todo, *, k, seed, examples, label_dtype, on_done, bar
) -> None:
    """Cluster map of each region in `todo` written to `lv`; `on_done(record)` once its write has
    finished (counts, inertia, and per cluster the `examples` cells with the smallest seeded random
    keys), also for the regions in flight when an exception stops the pass."""
    pending: list = []
    try:
        for i, (r, x) in zip(todo, _stream(fv, [regions[i] for i in todo])):
            # distances to the centres: the labels and the inertia in one pass
            dist = km.transform(x)
            lab = dist.argmin(1)
            rec = {
                "region": i,
                "inertia": float((dist[np.arange(len(lab)), lab].astype(np.float64) ** 2).sum()),
                "counts": np.bincount(lab, minlength=k).tolist(),
                "samples": [],
            }
            shape = tuple(s.stop - s.start for s in r)
            u = np.random.default_rng([seed, i]).random(len(lab))
            for c in np.unique(lab):
                idx = np.flatnonzero(lab == c)
                keep = idx[np.argsort(u[idx], kind="stable")[:examples]]
                pos = np.stack(np.unravel_index(keep, shape), -1) + [s.start for s in r]
                rec["samples"] += [[int(c), float(u[j]), *map(int, p)] for j, p in zip(keep, pos)]
            pending.append((rec, lv.array[r].write(lab.reshape(shape).astype(label_dtype))))
            while len(pending) > 8:
                rec0, fut = pending.pop(0)
                fut.result()
                on_done(rec0)
            bar.update(1)
    finally:
        for rec0, fut in pending:
            fut.result()
            on_done(rec0)
