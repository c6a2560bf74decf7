"""Instance segmentation of a volume of any size, block by block, stitched into one label volume.

1. Each block of the regular grid is segmented with a `halo` of context on every side; its core
   labels (ids local to the block) go to a provisional zarr, and the labels its halo gave to the
   neighbouring blocks' cores are kept in a small per-block file. That file is the block's
   completion mark: an interrupted job, rerun, skips the blocks that have one.
2. Stitching: where block i's halo covers block j's core, the two segmentations of the same voxels
   are compared; a pair of segments linked by overlap (overlap / smaller segment >= threshold)
   is one object. Union-find over all blocks' segments (connected components of the link graph)
   gives one id per object.
3. A relabel pass writes the final consecutive ids block by block to the output zarr.

Memory is bounded by one block (with halo) plus one integer per segment of the volume.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import relabel_sequential

from emfm.data.volume import Volume, VolumeError, create_volume, open_volume
from emfm.errors import UserError
from emfm.instances.affinities import DEFAULT_OFFSETS
from emfm.instances.link2d import overlap_links
from emfm.instances.segment import SegmentParams, segment

log = logging.getLogger("emfm")

Box = tuple[slice, ...]


def block_grid(shape: Sequence[int], block: Sequence[int]) -> list[Box]:
    """Core boxes of a regular grid over `shape` (last blocks clipped), in C order."""
    if len(block) != len(shape) or any(b <= 0 for b in block):
        raise UserError(f"block={list(block)}: give {len(shape)} positive sizes (z, y, x)")
    ranges = [[slice(s, min(s + b, n)) for s in range(0, n, b)] for n, b in zip(shape, block)]
    return [tuple(r) for r in itertools.product(*ranges)]


def grow(box: Box, halo: Sequence[int], shape: Sequence[int]) -> Box:
    return tuple(
        slice(max(0, s.start - h), min(n, s.stop + h)) for s, h, n in zip(box, halo, shape)
    )


def _rel(inner: Box, outer: Box) -> Box:
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def _halo_slabs(core: Box, ext: Box) -> list[tuple[int, int, Box]]:
    """(axis, side, box) of the inner half of the parts of `ext` beyond `core` along one axis
    (the half next to the core, where this block still had context), within the core's extent
    along the others: each lies inside the face neighbour's core."""
    out = []
    for d in range(len(core)):
        w_lo = -(-(core[d].start - ext[d].start) // 2)
        w_hi = -(-(ext[d].stop - core[d].stop) // 2)
        for side, (a, b) in (
            (-1, (core[d].start - w_lo, core[d].start)),
            (1, (core[d].stop, core[d].stop + w_hi)),
        ):
            if b > a:
                out.append((d, side, core[:d] + (slice(a, b),) + core[d + 1 :]))
    return out


def _box_key(box: Box) -> list[list[int]]:
    return [[s.start, s.stop] for s in box]


class BlockwiseJob:
    """One blockwise segmentation: `read(box) -> data` (boundary `[z,y,x]` or affinities
    `[c,z,y,x]` of the box), `shape` spatial, output at `out`, scratch at `work_dir`."""

    def __init__(
        self,
        read: Callable[[Box], np.ndarray],
        shape: Sequence[int],
        out: str | Path,
        params: SegmentParams,
        *,
        block: Sequence[int],
        halo: Sequence[int],
        work_dir: str | Path | None = None,
        stitch_threshold: float = 0.5,
        voxel_size: Sequence[float] | None = None,
        job_id: dict | None = None,
    ):
        self.read, self.shape, self.params = read, tuple(int(s) for s in shape), params.check()
        self.blocks = block_grid(self.shape, block)
        if len(halo) != len(self.shape) or any(not 0 <= h <= b for h, b in zip(halo, block)):
            raise UserError(
                f"halo={list(halo)}: give {len(self.shape)} sizes in [0, block] "
                f"(block={list(block)})"
            )
        self.block, self.halo = tuple(block), tuple(halo)
        self.out = Path(out)
        self.work = Path(work_dir) if work_dir else self.out.with_name(self.out.name + ".work")
        self.stitch_threshold = stitch_threshold
        self.voxel_size = voxel_size
        self.record = {
            "shape": list(self.shape),
            "block": list(self.block),
            "halo": list(self.halo),
            "stitch_threshold": stitch_threshold,
            "params": asdict(params),
            **(job_id or {}),
        }
        self.record = json.loads(json.dumps(self.record))  # tuples -> lists, as read back from disk

    # --------------------------------------------------------------------------------- setup
    def _prepare(self) -> Volume:
        self.work.mkdir(parents=True, exist_ok=True)
        rec = self.work / "job.json"
        if rec.exists():
            old = json.loads(rec.read_text())
            if old != self.record:
                diff = sorted(
                    k for k in set(old) | set(self.record) if old.get(k) != self.record.get(k)
                )
                raise UserError(
                    f"work directory {self.work} holds blocks of another job (differs in {diff}); "
                    "remove it or choose another out="
                )
        else:
            rec.write_text(json.dumps(self.record, indent=1))
        chunks = [min(b, n) for b, n in zip(self.block, self.shape)]
        return create_volume(
            self.work / "provisional.zarr", self.shape, np.uint32, chunks=chunks, exist_ok=True
        )

    def _block_file(self, i: int) -> Path:
        return self.work / f"block_{i:06d}.npz"

    # ------------------------------------------------------------------------------ 1. blocks
    def segment_block(self, i: int, prov: Volume) -> None:
        core = self.blocks[i]
        ext = grow(core, self.halo, self.shape)
        lab = segment(self.read(ext), self.params)
        lab, _, _ = relabel_sequential(lab)
        n = int(lab.max())
        if n >= 2**32:
            raise VolumeError(f"block {_box_key(core)} holds {n} segments; use smaller blocks")
        core_lab = lab[_rel(core, ext)].astype(np.uint32)
        prov.array[core].write(core_lab).result()
        slabs = {
            f"slab_{k}": lab[_rel(box, ext)].astype(np.uint32)
            for k, (_, _, box) in enumerate(_halo_slabs(core, ext))
        }
        tmp = self.work / f".tmp_block_{i:06d}.npz"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, n=np.int64(n), core_ids=np.unique(core_lab), **slabs)
        os.replace(tmp, self._block_file(i))  # the block's completion mark, written last

    # ----------------------------------------------------------------------------- 2. stitch
    def _index(self, point: Sequence[int]) -> int:
        grid = [-(-n // b) for n, b in zip(self.shape, self.block)]
        idx = [p // b for p, b in zip(point, self.block)]
        return int(np.ravel_multi_index(idx, grid))

    def _offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(offset per block, global ids that occur in some core); global id = local id + offset."""
        counts, present = [], []
        for i in range(len(self.blocks)):
            with np.load(self._block_file(i)) as z:
                counts.append(int(z["n"]))
                present.append(z["core_ids"].astype(np.uint64))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)
        present = np.concatenate(
            [np.where(p > 0, p + offsets[i], 0) for i, p in enumerate(present)]
        )
        return offsets, np.unique(present)

    def stitch(self, prov: Volume) -> np.ndarray:
        """`global id -> final id` (0 -> 0), final ids consecutive over the segments in the
        output."""
        offsets, present = self._offsets()
        links = []
        for i, core in enumerate(self.blocks):
            ext = grow(core, self.halo, self.shape)
            with np.load(self._block_file(i)) as z:
                for k, (_, _, box) in enumerate(_halo_slabs(core, ext)):
                    mine = z[f"slab_{k}"].astype(np.uint64)
                    # the face neighbour whose core holds the slab
                    j = self._index([s.start for s in box])
                    theirs = prov.read(box).astype(np.uint64)
                    a = np.where(mine > 0, mine + offsets[i], 0)
                    b = np.where(theirs > 0, theirs + offsets[j], 0)
                    links.append(
                        overlap_links(a, b, threshold=self.stitch_threshold, mutual_best=True)
                    )
        total = int(offsets[-1]) + 1
        links = np.concatenate(links).astype(np.int64) if links else np.zeros((0, 2), np.int64)
        g = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(total, total))
        _, comp = connected_components(g, directed=False)
        # number the objects that occur in the output 1..K; background (global 0) has no links,
        # stays 0
        rank = np.zeros(comp.max() + 1, np.uint64)
        used = np.unique(comp[present[present > 0].astype(np.int64)])
        rank[used] = np.arange(1, used.size + 1, dtype=np.uint64)
        mapping = rank[comp]
        mapping[0] = 0
        return mapping

    # ---------------------------------------------------------------------------- 3. relabel
    def relabel(self, prov: Volume, mapping: np.ndarray) -> Volume:
        n = int(mapping.max())
        dtype = np.uint32 if n < 2**32 else np.uint64
        chunks = [min(b, s) for b, s in zip(self.block, self.shape)]
        out = create_volume(
            self.out,
            self.shape,
            dtype,
            chunks=chunks,
            voxel_size=self.voxel_size,
            attributes={"instances": {**self.record, "segments": n}},
            exist_ok=False,
        )
        offsets, _ = self._offsets()
        for i, core in enumerate(self.blocks):
            loc = prov.read(core).astype(np.uint64)
            out.array[core].write(
                mapping[np.where(loc > 0, loc + offsets[i], 0)].astype(dtype)
            ).result()
        return out

    def run(self, *, keep_work: bool = False, progress: Callable | None = None) -> dict:
        """Segment the missing blocks, stitch, relabel; returns a summary."""
        from emfm.train import distributed

        pid, nproc = distributed.process()
        # several processes: 0 creates, the others open
        prov = self._prepare() if pid == 0 else None
        distributed.barrier("instances: work directory ready")
        prov = prov if prov is not None else self._prepare()
        todo = [i for i in range(len(self.blocks)) if not self._block_file(i).exists()]
        log.info(
            "instances: %d blocks, %d to do (%d done before)",
            len(self.blocks),
            len(todo),
            len(self.blocks) - len(todo),
        )
        distributed.barrier("instances: blocks to do listed")  # before any process finishes one
        mine = todo[pid::nproc]
        for n_done, i in enumerate(mine):
            self.segment_block(i, prov)
            if progress:
                progress(n_done + 1, len(mine))
        distributed.barrier("instances: blocks segmented")
        if pid != 0:  # process 0 stitches and relabels
            distributed.barrier("instances: relabelled")
            return {
                "out": str(self.out),
                "blocks": len(self.blocks),
                "segmented_now": len(todo),
                "process": pid,
            }
        mapping = self.stitch(prov)
        out = self.relabel(prov, mapping)
        summary = {
            "out": str(self.out),
            "blocks": len(self.blocks),
            "segmented_now": len(todo),
            "segments": int(mapping.max()),
            "shape": list(self.shape),
            "dtype": str(out.dtype),
        }
        (self.work / "done.json").write_text(json.dumps(summary, indent=1))
        if not keep_work:
            shutil.rmtree(self.work)
        distributed.barrier("instances: relabelled")
        return summary


def volume_reader(
    vol: Volume,
    *,
    kind: str = "auto",
    channel: int | None = None,
    invert: bool = False,
    n_offsets: int | None = None,
) -> tuple[Callable[[Box], np.ndarray], str]:
    """`read(box)` giving float32 boundary maps `[z,y,x]` or affinities `[c,z,y,x]` from a
    probability volume (`z y x` or `z y x c`; integer dtypes are scaled to [0, 1]), and the kind.

    kind: "boundary", "affinities", or "auto" (4D with no `channel` = affinities). `channel`
    picks the boundary class of a multi-channel probability volume; `invert` turns a foreground
    (interior) probability into a boundary probability."""
    if kind not in ("auto", "boundary", "affinities"):
        raise UserError(f"kind={kind!r}: use auto, boundary or affinities")
    if vol.ndim not in (3, 4):
        raise VolumeError(
            f"instance input {vol.path} has shape {vol.shape}; expected z, y, x or z, y, x, c"
        )
    if kind == "auto":
        kind = "affinities" if vol.ndim == 4 and channel is None else "boundary"
    if kind == "affinities" and (vol.ndim != 4 or channel is not None):
        raise VolumeError(
            f"instance input {vol.path}: affinities need a z, y, x, c volume and no channel="
        )
    if kind == "affinities" and n_offsets is not None and vol.shape[3] != n_offsets:
        raise VolumeError(
            f"instance input {vol.path} has {vol.shape[3]} channels but {n_offsets} offsets are "
            "configured"
        )
    if (
        kind == "boundary"
        and vol.ndim == 4
        and (channel is None or not 0 <= channel < vol.shape[3])
    ):
        raise VolumeError(
            f"instance input {vol.path} has {vol.shape[3]} channels: give channel=K "
            f"(0..{vol.shape[3] - 1}) "
            "for the boundary class, or kind=affinities"
        )
    scale = 1.0 / np.iinfo(vol.dtype).max if np.issubdtype(vol.dtype, np.integer) else 1.0

    def read(box: Box) -> np.ndarray:
        x = vol.read(
            tuple(box)
            + ((slice(channel, channel + 1),) if vol.ndim == 4 and kind == "boundary" else ())
        )
        x = x.astype(np.float32) * scale
        if kind == "boundary":
            x = x[..., 0] if x.ndim == 4 else x
            return 1.0 - x if invert else x
        x = np.moveaxis(x, -1, 0)
        return 1.0 - x if invert else x

    return read, kind


def _from_attributes(
    vol: Volume, kind: str, channel: int | None, invert: bool, params: SegmentParams
):
    """What `emfm predict` records in its output's attributes decides how it is read when the user
    gave no `channel`: a "boundary" channel by name; else, for a semantic model, 1 - the probability
    of the class whose connected regions are the instances (`instance_class`: cell interiors between
    membranes, or the organelles); else 1 - "foreground" (center task). Recorded affinity offsets
    ("offsets") replace the default ones; a configured set that differs from the recorded one is an
    error naming both. Returns (channel, invert, params)."""
    names = list(vol.attributes.get("channels") or [])
    if vol.ndim == 4 and channel is None and kind in ("auto", "boundary"):
        ic = vol.attributes.get("instance_class")
        if "boundary" in names:
            channel = names.index("boundary")
            log.info("instances: boundary probabilities from channel %d of %s", channel, vol.path)
        elif ic is not None and 0 <= int(ic) < vol.shape[3]:
            channel, invert = int(ic), True
            log.info(
                "instances: boundaries = 1 - p(%s), the instance class of %s",
                names[channel] if names else channel,
                vol.path,
            )
        elif "foreground" in names:
            channel, invert = names.index("foreground"), True
            log.info("instances: boundaries = 1 - p(foreground) of %s", vol.path)
    recorded = [tuple(int(v) for v in o) for o in vol.attributes.get("offsets") or []]
    if recorded and channel is None:
        configured = [tuple(o) for o in params.offsets]
        if configured != recorded and configured != [tuple(o) for o in DEFAULT_OFFSETS]:
            raise VolumeError(
                f"instance input {vol.path} holds affinities for offsets "
                f"{[list(o) for o in recorded]}, "
                f"but offsets={[list(o) for o in configured]} were given"
            )
        params = replace(params, offsets=tuple(recorded))
    return channel, invert, params


def instances(
    input_path: str,
    out: str,
    params: SegmentParams,
    *,
    block: Sequence[int],
    halo: Sequence[int],
    kind: str = "auto",
    channel: int | None = None,
    invert: bool = False,
    stitch_threshold: float = 0.5,
    work_dir: str | None = None,
    keep_work: bool = False,
    progress: Callable | None = None,
) -> dict:
    """`emfm instances`: segment the probability / affinity volume at `input_path` into `out` (zarr
    v3)."""
    vol = open_volume(input_path)
    channel, invert, params = _from_attributes(vol, kind, channel, invert, params)
    read, kind = volume_reader(
        vol, kind=kind, channel=channel, invert=invert, n_offsets=len(params.offsets)
    )
    if params.method == "mws" and kind != "affinities":
        raise VolumeError(
            f"method=mws needs affinities (z, y, x, c); {input_path} is read as a boundary map"
        )
    job = BlockwiseJob(
        read,
        vol.spatial_shape,
        out,
        params,
        block=block,
        halo=halo,
        work_dir=work_dir,
        stitch_threshold=stitch_threshold,
        voxel_size=vol.voxel_size,
        job_id={
            "input": str(Path(input_path).resolve()),
            "kind": kind,
            "channel": channel,
            "invert": invert,
        },
    )
    if (
        Path(out).exists() and not job.work.exists()
    ):  # a finished job or foreign data; a resumed job rewrites it
        raise VolumeError(f"output {out} exists; remove it or choose another out=")
    return {"kind": kind, **job.run(keep_work=keep_work, progress=progress)}
