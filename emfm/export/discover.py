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
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from emfm.data.volume import VolumeError, create_ome_zarr, open_volume
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


STATE_DIR = "discover_state"


def _fingerprint(features: str, fv, out: str, **params) -> dict:
    """What decides discover's output: a saved state of another fingerprint is another job."""
    path = str(Path(features).resolve()) if "://" not in features else features
    return json.loads(
        json.dumps(
            {
                "features": path,
                "shape": list(fv.shape),
                "dtype": str(fv.dtype),
                "export": fv.attributes.get("export"),
                "labels": str(out),
                **params,
            }
        )
    )


class DiscoverState:
    """Resumable progress of one discover job in `run_dir/discover_state`: the k-means fit (pickled
    estimator, random generator and carried-over vectors after the last finished region, saved at
    most every `every_s` seconds and at the end of the fit) and one JSON line per labelled region
    whose label chunks are on disk (its counts, inertia and sampled cells), appended once its write
    has finished."""

    def __init__(self, run_dir: Path, fingerprint: dict, *, resume: bool, every_s: float):
        self.dir, self.every_s, self.fp = run_dir / STATE_DIR, every_s, fingerprint
        self.fit_file, self.label_file = self.dir / "fit.pkl", self.dir / "labels.jsonl"
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        fp_file = self.dir / "job.json"
        if fp_file.exists():
            old = json.loads(fp_file.read_text())
            if old != fingerprint:
                keys = sorted(
                    k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)
                )
                raise VolumeError(
                    f"{run_dir} holds an interrupted discover of another job (differs in: "
                    f"{', '.join(keys)}); continuing it would mix two jobs. Use another run_dir "
                    "or resume=false to start over"
                )
        else:
            fp_file.write_text(json.dumps(fingerprint, indent=1))
        self._last = time.monotonic()

    def load_fit(self) -> dict | None:
        if not self.fit_file.exists():
            return None
        with open(self.fit_file, "rb") as f:
            return pickle.load(f)

    def save_fit(self, state: dict, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every_s:
            return
        tmp = self.fit_file.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, self.fit_file)  # atomic: a kill leaves the old state or the new one
        self._last = time.monotonic()

    def labelled(self) -> dict[int, dict]:
        """Records of the regions whose labels are written (a line torn by a kill is dropped)."""
        recs = {}
        if self.label_file.exists():
            for line in self.label_file.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                recs[r["region"]] = r
        return recs

    def open_labels(self):
        """The region log opened for appending, a line torn by a kill cut off first."""
        if self.label_file.exists():
            data = self.label_file.read_bytes()
            if data and not data.endswith(b"\n"):
                self.label_file.write_bytes(data[: data.rfind(b"\n") + 1])
        return open(self.label_file, "a")

    def reset_labels(self) -> None:
        self.label_file.unlink(missing_ok=True)

    def add_label(self, rec: dict, f) -> None:
        f.write(json.dumps(rec) + "\n")
        f.flush()


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
    from sklearn.cluster import MiniBatchKMeans

    run_dir = Path(run_dir)
    fv = open_volume(features)
    if fv.ndim != 4:
        raise VolumeError(
            f"features {features} have {fv.ndim} dimensions; discover reads [z, y, x, c] feature "
            "arrays written by emfm export"
        )
    attrs = fv.attributes
    src = image or attrs.get("source", "")
    if not src:
        raise VolumeError(f"features {features} do not name their source volume: give image=PATH")
    img = open_volume(src)
    if img.ndim != 3:
        raise VolumeError(
            f"image {src} has {img.ndim} dimensions; discover needs the z, y, x volume that was "
            "exported"
        )
    stride = tuple(attrs.get("stride", (1, 1, 1)))
    origin = tuple(attrs.get("roi_origin", (0, 0, 0)))
    grid = fv.shape[:3]
    if any(o + g * s > n + s - 1 for o, g, s, n in zip(origin, grid, stride, img.shape)):
        raise VolumeError(
            f"features {features} of grid {grid} (stride {stride}, origin {origin}) do not fit "
            f"image {src} of shape {img.shape}"
        )
    out = out or str(run_dir / "clusters.zarr")
    state = DiscoverState(
        run_dir,
        _fingerprint(
            features,
            fv,
            out,
            k=k,
            batch_size=batch_size,
            epochs=epochs,
            sample_fraction=sample_fraction,
            examples=examples,
            seed=seed,
        ),
        resume=resume,
        every_s=state_every_s,
    )
    regions = read_blocks(fv.shape, fv.chunks)
    # ---- fitting pass(es): shuffled mini-batches of each block; a too-small remainder joins the
    # next block
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
    if not st["fitted"]:
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
        if (
            len(st["carry"]) >= k
        ):  # the remainder (MiniBatchKMeans weighs each update by the centres' counts)
            km.partial_fit(st["carry"])
            st["seen"] += len(st["carry"])
        bar.close()
        if not hasattr(km, "cluster_centers_"):
            raise VolumeError(
                f"features {features} hold {len(st['carry'])} vectors, fewer than k={k} clusters"
            )
        st.update(fitted=True, carry=st["carry"][:0])
        state.save_fit(st, force=True)
        state.reset_labels()
    # ---- labelling pass: cluster map, counts, inertia, a random sample of cells per cluster
    label_dtype = np.uint8 if k <= 255 else np.uint16
    done = state.labelled()
    lv = None
    if done:
        try:
            lv = open_volume(out, write=True)
        except (OSError, ValueError):
            lv = None
        if lv is None or lv.shape != grid or lv.dtype != label_dtype:
            state.reset_labels()
            done, lv = {}, None
    if lv is None:
        lv = create_ome_zarr(
            out,
            grid,
            label_dtype,
            chunks=fv.chunks[:3],
            voxel_size=fv.voxel_size,
            translation=fv.translation or None,
            name="emfm k-means clusters",
            attributes={
                "features": str(features),
                "source": src,
                "stride": list(stride),
                "roi_origin": list(origin),
                "k": k,
                "content": "k-means cluster of each feature cell",
            },
        )
    todo = [i for i in range(len(regions)) if i not in done]
    bar = progress(
        len(regions),
        initial=len(regions) - len(todo),
        desc="discover: label",
        enabled=show_progress,
    )
    with state.open_labels() as log_f:
        _label_regions(
            fv,
            lv,
            km,
            regions,
            todo,
            k=k,
            seed=seed,
            examples=examples,
            label_dtype=label_dtype,
            on_done=lambda rec: state.add_label(rec, log_f),
            bar=bar,
        )
    bar.close()
    # ---- merge the region records in region order (the same arithmetic however the job was
    # interrupted)
    recs = state.labelled()
    counts = np.zeros(k, np.int64)
    inertia = 0.0
    keys = [np.zeros(0) for _ in range(k)]
    cells = [np.zeros((0, 3), np.int64) for _ in range(k)]
    for i in range(len(regions)):
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
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "centroids.npy", km.cluster_centers_.astype(np.float32))
    galleries = _galleries(img, cells, stride, origin, crop, run_dir / "galleries")
    overview = _overview(
        img, fv, lv, stride, origin, k, run_dir / "figures" / "discover_overview.png"
    )
    res = {
        "features": str(features),
        "image": src,
        "labels": out,
        "k": k,
        "vectors": int(counts.sum()),
        "fit_vectors": int(st["seen"]),
        "epochs": epochs,
        "counts": counts.tolist(),
        "fractions": (counts / max(1, counts.sum())).round(6).tolist(),
        "inertia_per_vector": inertia / max(1, counts.sum()),
        "galleries": galleries,
        "overview": str(overview),
        "examples": [c.tolist() for c in cells],
    }  # feature cells (z, y, x) shown in each cluster's gallery
    (run_dir / "discover.json").write_text(json.dumps(res, indent=1))
    log.info(
        "discover: %d clusters over %d vectors; cluster sizes %s (resumed: %d fit regions and %d "
        "labelled "
        "regions skipped)",
        k,
        res["vectors"],
        res["counts"],
        fit_skipped,
        len(regions) - len(todo),
    )
    return {
        **res,
        "fit_regions_skipped": fit_skipped,
        "label_regions_skipped": len(regions) - len(todo),
    }


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


def _crop(img, centre, side: int) -> np.ndarray:
    z, y, x = centre
    h = side // 2
    region = (
        slice(z, z + 1),
        slice(max(0, y - h), min(img.shape[1], y - h + side)),
        slice(max(0, x - h), min(img.shape[2], x - h + side)),
    )
    a = img.read(region)[0].astype(np.float32)
    pad = (
        (max(0, h - y), side - a.shape[0] - max(0, h - y)),
        (max(0, h - x), side - a.shape[1] - max(0, h - x)),
    )
    return np.pad(a, pad, mode="constant", constant_values=np.nan)


def _galleries(img, cells, stride, origin, side: int, folder: Path) -> list[str]:
    """One PNG per cluster: its example crops in a row-major grid, the example's feature cell
    outlined."""
    from emfm.eval.figures import _plt

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    lo, hi = np.percentile(
        img.read((slice(img.shape[0] // 2, img.shape[0] // 2 + 1),)), [0.5, 99.5]
    )
    for c, cs in enumerate(cells):
        if not len(cs):
            continue
        centres = [
            tuple(int(o + v * s + s // 2) for o, v, s in zip(origin, cell, stride)) for cell in cs
        ]
        crops = [_crop(img, ce, side) for ce in centres]
        cols = min(6, len(crops))
        rows = -(-len(crops) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.3), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, a, ce in zip(axes.ravel(), crops, centres):
            ax.imshow(a, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            hy, hx = stride[1] / 2, stride[2] / 2
            ax.add_patch(
                plt.Rectangle(
                    (side // 2 - hx - 0.5, side // 2 - hy - 0.5),
                    2 * hx,
                    2 * hy,
                    fill=False,
                    edgecolor=plt.cm.tab20(c % 20),
                    linewidth=1.2,
                )
            )
            ax.set_title(f"z{ce[0]} y{ce[1]} x{ce[2]}", fontsize=6)
        fig.suptitle(f"cluster {c}", fontsize=9)
        fig.tight_layout()
        p = folder / f"cluster_{c:02d}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(str(p))
    return paths


def _overview(img, fv, lv, stride, origin, k: int, path: Path) -> Path:
    """Middle section of the feature grid (at most 512 x 512 cells): image, PCA-RGB features,
    cluster map."""
    from emfm.eval.figures import _plt, image_grid
    from emfm.export.pca import pca_rgb

    z = fv.shape[0] // 2
    cy, cx = (min(n, 512) for n in fv.shape[1:3])
    feats = fv.read((slice(z, z + 1), slice(0, cy), slice(0, cx)))[0].astype(np.float32)
    rgb, _ = pca_rgb(feats)
    lab = lv.read((slice(z, z + 1), slice(0, cy), slice(0, cx)))[0]
    colours = _plt().cm.tab20(np.arange(k) % 20)[:, :3]
    zi = origin[0] + z * stride[0] + stride[0] // 2
    section = img.read(
        (
            slice(zi, zi + 1),
            slice(origin[1], origin[1] + cy * stride[1]),
            slice(origin[2], origin[2] + cx * stride[2]),
        )
    )
    image_grid(
        path,
        [
            (f"section {zi}", section),
            ("features: PCA 1-3 as RGB", rgb[None]),
            (f"k-means clusters (k={k})", colours[lab][None]),
        ],
    )
    return path
