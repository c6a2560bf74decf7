"""Dense feature export of a volume of any size to OME-Zarr through tensorstore, block by block
with overlap (the windows encoded by emfm.export.encode: margins dropped, or a ViT's neighbouring
windows blended over their overlap).

One block is one chunk, so a chunk present in the store is a finished block: an interrupted export
restarted with the same arguments skips those and yields the same bytes, and several JAX processes
split the blocks (block i goes to process i mod n; blended, contiguous runs of blocks). Optional PCA
to `pca_k` channels is fitted on a sample of blocks once and stored in the array's attributes, so
resumed and parallel writers project alike. Reading runs ahead in a thread and writes are
tensorstore futures, so I/O overlaps the encoder.

The output is an OME-Zarr image group (NGFF 0.5: zarr v3 group, array "0" stored as c, z, y, x;
emfm's reader gives it back as z, y, x, c): axes metadata (a channel axis, z / y / x in nanometres),
the scale of a feature cell (input voxel size x stride) and its translation (the centre of cell 0 in
the input's physical frame, so the features overlay the input in OME-Zarr viewers), and the export's
own record (checkpoint, layers, PCA basis, stride, ROI) under the group attribute "emfm".
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from emfm.data.volume import (
    Volume,
    VolumeError,
    create_ome_zarr,
    guard_output,
    open_volume,
    written_chunks,
)
from emfm.errors import UserError
from emfm.export.encode import (
    BlockEncoder,
    WindowReader,
    block_encoders,
    block_part,
    encode_blocks,
)
from emfm.export.pca import fit_pca
from emfm.export.volume_reader import volume_reader
from emfm.export.windows import block_origins
from emfm.train.logging import progress

log = logging.getLogger("emfm")

OUT_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------- blockwise export
@dataclass(frozen=True)
class ExportPlan:
    """What an export writes; stored in the output's attributes so a restart can check it is the
    same job."""

    source: str
    roi: list[list[int]]
    encoder: dict
    checkpoint: str
    layers: list[int]
    block: list[int]
    margin: list[int]
    stride: list[int]
    grey_range: list[float]
    dtype: str
    pca_k: int
    pca_sample_blocks: int
    seed: int
    blend: str

    @classmethod
    def of(cls, encoder, vol: Volume, box, enc: BlockEncoder, *, checkpoint: str, **settings):
        """The plan of encoding `box` of `vol` with `enc` (`encoder`'s block encoder); `settings`:
        grey_range, dtype, pca_k, pca_sample_blocks, seed and the resolved blend."""
        return cls(
            source=vol.path,
            roi=[list(b) for b in box],
            encoder=asdict(encoder.spec),
            checkpoint=str(Path(checkpoint).resolve()) if checkpoint else "",
            **{k: list(getattr(enc, k)) for k in ("layers", "block", "margin", "stride")},
            **settings | {"grey_range": [float(v) for v in settings["grey_range"]]},
        )

    def record(self) -> dict:
        """The plan as stored in the output's attributes (plain JSON types)."""
        return json.loads(json.dumps(asdict(self)))


def export_features(
    encoder,
    vol: Volume,
    out_path: str | Path,
    *,
    grey_range: tuple[float, float],
    tile: int = 128,
    margin: int = 32,
    block_z: int = 16,
    margin_z: int = 4,
    layers: tuple[int, ...] = (),
    dtype: str = "float16",
    pca_k: int = 0,
    pca_sample_blocks: int = 16,
    roi=None,
    batch_size: int = 8,
    prefetch: int = 2,
    resume: bool = True,
    checkpoint: str = "",
    seed: int = 0,
    blend: str = "auto",
    show_progress: bool = True,
) -> dict:
    """Features of `vol` (or its `roi` [[z0, z1], [y0, y1], [x0, x1]]) to an OME-Zarr at `out_path`.

    `blend`: "none" drops each window's margin; "cosine", "gaussian" or "constant" keep the same
    windows (block + 2 margin) whole and blend neighbours over their 2 x margin overlap (no ViT
    block seams, at the same number of windows); "auto" = none for a U-Net with a per-pixel norm
    (whose margin-dropped blocks equal a whole-volume forward), else cosine (a ViT; a U-Net with
    group norm, whose window statistics leave seams). Returns a summary dict."""
    from emfm.data.sampling import Region

    check_volume(vol)
    box = Region.of(vol, roi).box
    enc, benc, blend = _encoders(
        encoder,
        dtype,
        pca_k,
        block=(block_z, tile, tile),
        margin=(margin_z, margin, margin),
        blend=blend,
        batch_size=batch_size,
        layers=layers,
    )
    plan = ExportPlan.of(
        encoder,
        vol,
        box,
        enc,
        checkpoint=checkpoint,
        grey_range=grey_range,
        dtype=dtype,
        pca_k=pca_k,
        pca_sample_blocks=pca_sample_blocks,
        seed=seed,
        blend=blend,
    )
    read = volume_reader(vol, box, grey_range, prefetch)
    job = _Job(enc, benc, vol, box, plan.record(), str(out_path), read)
    out = _output(job, resume)
    return _write_blocks(job, out, show_progress)


def _encoders(encoder, dtype: str, pca_k: int, **geometry) -> tuple:
    """block_encoders(encoder, **geometry) writing `dtype`, with `dtype` and `pca_k` checked."""
    if dtype not in OUT_DTYPES:
        raise UserError(f"export.dtype={dtype!r}: use {', '.join(OUT_DTYPES)}")
    enc, benc, blend = block_encoders(encoder, out_dtype=OUT_DTYPES[dtype], **geometry)
    if pca_k < 0 or pca_k > enc.width:
        raise UserError(
            f"export.pca_k={pca_k}: must be 0 (no reduction) .. {enc.width} (the feature channels)"
        )
    return enc, benc, blend


@dataclass
class _Job:
    """What the steps of one export share."""

    enc: BlockEncoder  # blocks with their margins (the output's geometry)
    benc: BlockEncoder | None  # whole windows, when blending
    vol: Volume
    box: tuple
    plan: dict  # ExportPlan as stored
    out_path: str
    read: WindowReader  # over `vol`, normalised

    @property
    def fwd(self) -> BlockEncoder:
        return self.benc or self.enc

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // st) for n, st in zip(self.size, self.enc.stride))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.grid + (self.plan["pca_k"] or self.enc.width,)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(OUT_DTYPES[self.plan["dtype"]])


def check_volume(vol: Volume) -> None:
    """An export reads single-channel z, y, x volumes."""
    if vol.ndim != 3:
        raise VolumeError(
            f"volume {vol.path} has {vol.ndim} dimensions (axes {''.join(vol.axes)}); export reads "
            "single-channel z, y, x volumes (store a 2D image as [1, y, x])"
        )


def _output(job: _Job, resume: bool) -> Volume:
    """The output store, checked (resume) or created by process 0 (the PCA fitted there once), then
    opened for writing by every process."""
    guard_output(job.out_path, "export", inputs=[job.vol.path], marker="export")
    exists = (Path(job.out_path) / "zarr.json").exists()
    if exists and resume:  # every process checks before any compute, so all stop on a mismatch
        _check_existing(job.out_path, job.shape, job.dtype, job.plan)
    if jax.process_index() == 0 and not (exists and resume):
        _create(job)
    _barrier("emfm_export_created", jax.process_count())
    out = open_volume(job.out_path, write=True)
    # written blocks are never read back: no chunk cache for the output, so memory stays flat
    # however much is written
    out = replace(
        out,
        array=ts.open(
            out.array.spec(minimal_spec=True),
            write=True,
            context=ts.Context({"cache_pool": {"total_bytes_limit": 0}}),
        ).result(),
    )
    if job.plan["pca_k"]:
        p = out.attributes["pca"]
        job.fwd.set_pca(np.asarray(p["mean"], np.float32), np.asarray(p["components"], np.float32))
    return out


def _create(job: _Job) -> None:
    enc, plan = job.enc, job.plan
    attrs = {
        "job": "export",
        "export": plan,
        "source": job.vol.path,
        "stride": list(enc.stride),
        "roi_origin": [b[0] for b in job.box],
        "grey_range": plan["grey_range"],
        "layers": list(enc.layers),
        "content": _content(enc, plan["pca_k"]),
    }
    if plan["pca_k"]:
        origins = block_origins(job.size, enc.block)
        attrs["pca"] = fit_pca(
            job.fwd,
            job.read,
            origins,
            job.size,
            plan["pca_k"],
            plan["pca_sample_blocks"],
            plan["seed"],
        )
    create_ome_zarr(
        job.out_path,
        job.shape,
        job.dtype,
        chunks=enc.cells + (job.shape[-1],),
        attributes=attrs,
        **feature_grid_transform(job.vol, [b[0] for b in job.box], enc.stride),
        name="emfm features",
    )


def _my_blocks(job: _Job, out: Volume) -> tuple[list, int, int]:
    """(blocks this process still has to write, how many of its blocks were written before, how
    many blocks the export has)."""
    origins = block_origins(job.size, job.enc.block)
    pid, nproc, nb = jax.process_index(), jax.process_count(), len(origins)
    mine = (
        [i for i in range(nb) if i % nproc == pid]
        if job.benc is None
        else list(range(pid * nb // nproc, (pid + 1) * nb // nproc))
    )
    done = written_chunks(out)
    block = job.enc.block
    todo = [
        origins[i] for i in mine if tuple(o // b for o, b in zip(origins[i], block)) not in done
    ]
    return todo, len(mine) - len(todo), nb


def _write_blocks(job: _Job, out: Volume, show_progress: bool) -> dict:
    """Encode and write this process's remaining blocks; the summary of the export."""
    enc, fwd = job.enc, job.fwd
    todo, skipped, nb = _my_blocks(job, out)
    pid, nproc = jax.process_index(), jax.process_count()
    if todo:
        fwd.compiled()
        log.info(
            "export: forward of %d x %s voxels compiled in %.1f s",
            enc.batch_size,
            fwd.window,
            fwd.compile_seconds,
        )
    bar = progress(
        len(todo) + skipped,
        initial=skipped,
        desc="export" if nproc == 1 else f"export {pid}/{nproc}",
        enabled=show_progress,
    )
    bar.unit = "block"
    t0 = time.perf_counter()
    voxels = 0
    pending: deque = deque()
    blocks = encode_blocks(
        enc,
        todo,
        job.read,
        whole=job.benc,
        grid=job.grid,
        blend=job.plan["blend"],
        out_dtype=job.dtype,
    )
    for n_done, (o, f) in enumerate(blocks, start=1):
        cells, part = block_part(enc, o, f, job.size)
        pending.append((o, out.array[cells + (slice(None),)].write(part)))
        voxels += math.prod(min(b, n - x) for b, n, x in zip(enc.block, job.size, o))
        while len(pending) > 4 * enc.batch_size:
            _finish_write(out, *pending.popleft())
        bar.update(1)
        if n_done % enc.batch_size == 0:
            bar.set_postfix_str(f"{voxels / max(time.perf_counter() - t0, 1e-9):.3g} vox/s")
    while pending:
        _finish_write(out, *pending.popleft())
    bar.close()
    secs = time.perf_counter() - t0
    _barrier("emfm_export_done", nproc)
    done = {"tiles_written": len(todo), "tiles_skipped": skipped, "voxels": voxels, "seconds": secs}
    done["voxels_per_s"] = voxels / secs if secs > 0 and voxels else None
    if job.plan["pca_k"]:
        done["pca_explained_variance"] = out.attributes["pca"]["explained_variance_ratio"]
    return _summary(job, nb) | done


def _summary(job: _Job, blocks: int) -> dict:
    enc, plan = job.enc, job.plan
    return {
        "path": job.out_path,
        "shape": list(job.shape),
        "dtype": plan["dtype"],
        **{k: list(getattr(enc, k)) for k in ("layers", "stride", "block", "margin")},
        "blend": plan["blend"],
        "roi": plan["roi"],
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "blocks": blocks,
    }


def feature_grid_transform(vol: Volume, origin, stride) -> dict:
    """OME-Zarr scale and translation of a feature grid of `stride` voxels per cell whose cell 0
    starts at voxel `origin` of `vol`: one cell is `stride` voxels, and its centre lies (stride - 1)
    / 2 voxels past its first voxel (voxel centres at index x voxel size, plus the volume's own
    translation)."""
    shift = vol.translation or (0.0,) * 3
    return {
        "voxel_size": tuple(float(v * st) for v, st in zip(vol.voxel_size, stride)),
        "translation": tuple(
            float(t + v * (o + (st - 1) / 2))
            for t, v, o, st in zip(shift, vol.voxel_size, origin, stride)
        ),
    }


def _content(enc: BlockEncoder, pca_k: int) -> str:
    what = (
        ("U-Net decoder output" if enc.is_unet else "final-norm patch tokens")
        if not enc.layers
        else f"{'U-Net encoder levels' if enc.is_unet else 'ViT blocks'} {list(enc.layers)} "
        "concatenated"
    )
    return what + (f", PCA to {pca_k} channels" if pca_k else "")


def _check_existing(path, shape, dtype, plan_rec: dict) -> None:
    old = open_volume(path)
    if old.shape != tuple(shape) or old.dtype != dtype:
        raise VolumeError(
            f"output {path} exists with shape {old.shape} dtype {old.dtype}; this export writes "
            "shape "
            f"{tuple(shape)} dtype {dtype}. Remove it or choose another export.out"
        )
    prev = old.attributes.get("export")
    if prev != plan_rec:
        keys = (
            sorted(k for k in plan_rec if (prev or {}).get(k) != plan_rec[k])
            if isinstance(prev, dict)
            else ["all"]
        )
        raise VolumeError(
            f"output {path} holds another export (differs in: {', '.join(keys)}); finishing it "
            "with "
            "these settings would mix two jobs. Remove it or choose another export.out"
        )


def _barrier(name: str, nproc: int) -> None:
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _finish_write(out: Volume, origin, fut) -> None:
    try:
        fut.result()
    except Exception as e:  # noqa: BLE001
        raise VolumeError(f"writing the block at {origin} of {out.path} failed: {e}") from e
