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

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import relabel_sequential

from emfm.data.volume import Volume, VolumeError, create_volume, open_volume
from emfm.errors import UserError
from emfm.instances.blocks import Box, block_grid, box_key, grow, halo_slabs, rel
from emfm.instances.link2d import overlap_links
from emfm.instances.reader import from_attributes, volume_reader
from emfm.instances.segment import SegmentParams, segment

log = logging.getLogger("emfm")


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
            raise VolumeError(f"block {box_key(core)} holds {n} segments; use smaller blocks")
        core_lab = lab[rel(core, ext)].astype(np.uint32)
        prov.array[core].write(core_lab).result()
        slabs = {
            f"slab_{k}": lab[rel(box, ext)].astype(np.uint32)
            for k, (_, _, box) in enumerate(halo_slabs(core, ext))
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
                for k, (_, _, box) in enumerate(halo_slabs(core, ext)):
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
    channel, invert, params = from_attributes(vol, kind, channel, invert, params)
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
