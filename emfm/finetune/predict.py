"""`emfm predict`: a trained segmentation model over a volume of any size, block by block.

Windows of `window` voxels on one global grid (stride = window - overlap, the last window of an
axis flush with the end) are predicted and blended with a weight that tapers over the overlap
(cosine: sin^2 ramps that sum to 1 where two windows meet; gaussian; constant). The output is
produced per `chunk` (one zarr chunk each): a chunk gathers the windows that touch it, so every
voxel is the same weighted mean whatever the chunking (no seams at chunk borders), memory is one
chunk plus one batch of windows, and an interrupted run resumes by skipping chunks already stored.
Output: `[z, y, x, c]` zarr v3 (emfm's axis order) of probabilities (softmax classes, sigmoid
affinities / distance / heatmap; offsets in voxels), channel names and offsets in its attributes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emfm.data.sampling import Region, grey_range_for
from emfm.data.volume import (
    Volume,
    VolumeError,
    create_volume,
    guard_output,
    open_volume,
    written_chunks,
)
from emfm.export.encode import normalise
from emfm.export.windows import Blender, pad_batch
from emfm.train import distributed
from emfm.train.logging import progress

if TYPE_CHECKING:
    from emfm.config.finetune import FinetuneConfig

log = logging.getLogger("emfm")


def model_fn(model, lay, *, ndim: int, batch_size: int, tta: str = "none", task=None) -> Callable:
    """Jitted `windows [b, z, y, x] in [0, 1] -> probabilities [b, z, y, x, c]` (padded to one batch
    shape); with `tta` (emfm.finetune.tta; needs the `task`) the mean over flipped / turned
    windows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emfm.finetune import tta as tta_mod
    from emfm.finetune.losses import probabilities

    graphdef, state = nnx.split(model)
    tfs = tta_mod.transforms(tta, ndim)
    maps = tta_mod.channel_maps(tfs, task, lay, ndim) if len(tfs) > 1 else []

    @jax.jit
    def fwd(st, x):
        m = nnx.merge(graphdef, st)

        def forward(v):
            inp = v[:, 0, ..., None] if ndim == 2 else v[..., None]
            p = probabilities(m(inp), lay)
            return p[:, None] if ndim == 2 else p

        return tta_mod.apply(forward, x, tfs, maps)

    def fn(x: np.ndarray) -> np.ndarray:
        return np.asarray(fwd(state, jnp.asarray(pad_batch(x, batch_size), jnp.float32)))[: len(x)]

    return fn


def predict_array(
    fn: Callable, channels: int, image: np.ndarray, *, window, overlap, blend="cosine", batch_size=4
) -> np.ndarray:
    """Blended prediction `[z, y, x, c]` of an in-memory normalised image `[z, y, x]`
    (evaluation)."""
    bl = Blender(
        fn,
        channels,
        image.shape,
        window=window,
        overlap=overlap,
        blend=blend,
        batch_size=batch_size,
    )
    return bl.chunk(lambda box: image[box], tuple(slice(0, n) for n in image.shape))


def predict_volume(
    fn: Callable,
    channels: int,
    vol: Volume,
    out_path: str | Path,
    *,
    grey_range,
    window,
    overlap,
    chunk,
    roi=None,
    blend: str = "cosine",
    batch_size: int = 4,
    dtype: str = "float16",
    resume: bool = True,
    attributes: dict | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Predict `vol` (or its `roi`) chunk by chunk into a zarr v3 `[z, y, x, c]` at `out_path`.

    `stop_after` ends after that many chunks (to simulate an interruption in tests)."""
    box = _roi_box(vol, roi)
    shape = tuple(b - a for a, b in box)
    chunk = tuple(min(c, n) for c, n in zip(chunk, shape))
    attrs = {
        "job": "predict",
        "source": vol.path,
        "roi": [list(b) for b in box],
        "axes": "zyxc",
        "window": list(window),
        "overlap": list(overlap),
        "blend": blend,
        "grey_range": list(grey_range),
        **(attributes or {}),
    }
    guard_output(str(out_path), "predict", inputs=[vol.path], marker="blend")
    out = _output(out_path, shape + (channels,), dtype, chunk, vol.voxel_size, attrs, resume)
    bl = Blender(
        fn, channels, shape, window=window, overlap=overlap, blend=blend, batch_size=batch_size
    )
    todo, n_all, skipped = _my_chunks(bl, chunk, out, resume)
    nproc = distributed.process()[1]
    t0 = time.perf_counter()
    read = _region_reader(vol, box, grey_range)
    voxels = _write_chunks(bl, read, out, todo, dtype, show_progress, stop_after)
    secs = time.perf_counter() - t0
    distributed.barrier("predict: all chunks written")
    return {
        "path": str(out_path),
        "shape": list(out.shape),
        "processes": nproc,
        "chunks_all": n_all,
        "chunks_written": min(len(todo), stop_after or len(todo)),
        "chunks_skipped": skipped,
        "seconds": secs,
        "voxels_per_s": voxels / secs if secs > 0 else None,
    }


def _region_reader(vol: Volume, box, grey_range) -> Callable:
    """`read(region)`: the normalised voxels of a region (slices, relative to `box`) of `vol`."""

    def read(b):
        region = tuple(slice(s.start + a, s.stop + a) for s, (a, _) in zip(b, box))
        return normalise(vol.read(region), grey_range)

    return read


def _my_chunks(bl: Blender, chunk, out: Volume, resume: bool) -> tuple[list, int, int]:
    """(the chunks this process writes, how many chunks the output has, how many of them were
    written before): several processes each write their own (disjoint zarr chunks)."""
    done = written_chunks(out) if resume else set()
    every = bl.chunks(chunk)
    todo = [b for b in every if tuple(s.start // c for s, c in zip(b, chunk)) not in done]
    distributed.barrier("predict: chunks to do listed")  # before any process writes one
    pid, nproc = distributed.process()
    return todo[pid::nproc], len(every), len(every) - len(todo)


def _write_chunks(bl: Blender, read, out: Volume, todo, dtype, show_progress, stop_after) -> int:
    """Predict and write the chunks `todo` (slices; the first `stop_after` of them) with a progress
    bar; the voxels written."""
    pid, nproc = distributed.process()
    bar = progress(
        len(todo), desc="predict" if nproc == 1 else f"predict {pid}/{nproc}", enabled=show_progress
    )
    voxels = 0
    for b in todo[:stop_after]:
        pred = bl.chunk(read, b)
        out.array[tuple(b) + (slice(None),)].write(pred.astype(dtype)).result()
        voxels += math.prod(s.stop - s.start for s in b)
        bar.update(1)
    bar.close()
    return voxels


def _roi_box(vol: Volume, roi) -> list[tuple[int, int]]:
    """[(start, stop)] per axis of the predicted region: `roi`, or the whole volume."""
    if vol.ndim != 3:
        raise VolumeError(f"volume {vol.path} has {vol.ndim} dimensions; predict expects z, y, x")
    box = [(0, s) for s in vol.shape] if roi is None else [tuple(int(v) for v in r) for r in roi]
    if len(box) != 3 or any(len(r) != 2 for r in box):
        raise VolumeError(
            f"predict.roi={roi}: give [[z0, z1], [y0, y1], [x0, x1]] (three [start, stop] pairs)"
        )
    for (a, b), s, ax in zip(box, vol.shape, "zyx"):
        if not 0 <= a < b <= s:
            raise VolumeError(
                f"predict.roi {roi} lies outside volume {vol.path} of shape {vol.shape} (axis {ax})"
            )
    return box


def _output(path, shape, dtype, chunk, voxel_size, attrs: dict, resume: bool) -> Volume:
    """The output store: created by process 0 (kept as it is when resuming), then opened by the
    others."""

    def make(ok):
        return create_volume(
            path,
            shape,
            np.dtype(dtype),
            chunks=chunk + (shape[-1],),
            voxel_size=voxel_size,
            attributes=attrs,
            exist_ok=ok,
        )

    out = make(resume) if distributed.process()[0] == 0 else None
    distributed.barrier("predict: output created")
    out = out if out is not None else make(True)
    if resume:
        _check_same_job(path, out.attributes, attrs)
    return out


def _check_same_job(path, stored: dict, attrs: dict) -> None:
    """Resuming into `path` finishes the job that started it only: every setting recorded in
    `attrs` (source, roi, window, overlap, blend, grey range, checkpoint, test-time augmentation,
    task) must be the stored one."""
    want = json.loads(json.dumps(attrs))
    keys = sorted(k for k in want if k != "job" and stored.get(k) != want[k])
    if keys:
        raise VolumeError(
            f"predict output {path} holds another prediction (differs in: {', '.join(keys)}); "
            "finishing it with these settings would mix two jobs. Remove it, choose another "
            "predict.out, or set predict.resume=false to replace it."
        )


def run_predict(cfg: FinetuneConfig) -> dict:
    """`emfm predict checkpoint=FINETUNE_RUN predict.path=VOLUME`: probabilities to zarr."""
    from emfm.config.finetune import SegTaskConfig
    from emfm.data import bundled
    from emfm.errors import UserError
    from emfm.finetune import targets, tta
    from emfm.finetune.model import load_seg_model

    if not cfg.checkpoint:
        raise UserError("predict needs checkpoint=RUN_DIR (an emfm finetune run)")
    tta.check_window(cfg.predict.tta, cfg.predict.window)  # before the model is loaded
    model, meta = load_seg_model(cfg.checkpoint)
    task = SegTaskConfig(**meta["task"])
    ndim = model.encoder.spec.ndim
    lay = targets.layout(task, ndim)
    p = cfg.predict
    if ndim == 2 and p.window[0] != 1:
        raise UserError(f"predict.window={p.window}: a 2D model takes windows of depth 1")
    from emfm.export.encode import alignment

    align = alignment(model.encoder)  # a ViT's patch size, a U-Net's total pooling (z, y, x)
    dims = (1, 2) if ndim == 2 else (0, 1, 2)
    if any(p.window[d] % align[d] for d in dims):
        what = "total pooling" if hasattr(model.encoder, "decode") else "patch size"
        raise UserError(
            f"predict.window={p.window} is not divisible by the model's {what} "
            f"{[align[d] for d in dims]} along ({'y, x' if ndim == 2 else 'z, y, x'})"
        )
    if p.instances == "mws" and task.kind != "affinity":
        raise UserError(
            f"predict.instances=mws needs a model of affinities; this one predicts task="
            f"{task.kind}: use watershed, agglomeration, multicut or link2d"
        )
    vol = open_volume(bundled.resolve(p.path, bundled.sample_raw()))
    trained = meta.get("voxel_size")
    if trained and 1.0 not in (min(trained), min(vol.voxel_size)):
        axes = 3 if ndim == 3 else 2  # a 3D model also sees the z spacing
        pairs = list(zip(vol.voxel_size[-axes:], trained[-axes:]))
        ratio = max(max(a / b, b / a) for a, b in pairs)
        if ratio > 1.5:
            log.warning(
                "predict: volume %s has voxels of %s nm, the model was trained on %s nm (%.1fx "
                "apart): resample the volume to the training scale for reliable maps",
                vol.path,
                tuple(vol.voxel_size[-axes:]),
                tuple(trained[-axes:]),
                ratio,
            )
    out = p.out or str(Path(cfg.run_dir) / "predictions.zarr")
    fn = model_fn(model, lay, ndim=ndim, batch_size=p.batch_size, tta=p.tta, task=task)
    attrs = {
        "content": "probabilities",
        "task": task.kind,
        "channels": targets.channel_names(task, ndim),
        "offsets": task.offsets if task.kind == "affinity" else [],
        "checkpoint": str(cfg.checkpoint),
        "tta": str(p.tta),
        **({"instance_class": int(task.instance_class)} if task.kind == "semantic" else {}),
        "model_ndim": ndim,
        # the instances are objects on a background (organelles), not cells filling the volume
        "objects_on_background": task.kind == "center"
        or (task.kind == "semantic" and task.instance_class == task.positive_class),
    }
    res = predict_volume(
        fn,
        lay.channels,
        vol,
        out,
        grey_range=grey_range_for(Region.of(vol, _roi_box(vol, p.roi)), meta["grey_range"]),
        window=p.window,
        overlap=p.overlap,
        chunk=p.chunk,
        roi=p.roi,
        blend=p.blend,
        batch_size=p.batch_size,
        dtype=p.dtype,
        resume=p.resume,
        attributes=attrs,
        show_progress=cfg.trainer.progress,
    )
    if p.instances != "none":
        res["instances"] = predict_instances(cfg, out)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "predict.json").write_text(json.dumps(res, indent=1))
    log.info("predict: %s", res)
    return res


def predict_instances(cfg: FinetuneConfig, prob_path: str) -> dict:
    """Instance labels of the probabilities at `prob_path` (`predict.instances` = the method), block
    by block with stitching, to `instances.out` (default: beside the probabilities,
    `*_instances.zarr`). A rerun after a finished segmentation keeps it; an interrupted one resumes
    from its work directory."""
    from dataclasses import replace

    from emfm.config.instances import InstanceMethod, run_instances

    ic = replace(cfg.instances, method=InstanceMethod(cfg.predict.instances))
    base = prob_path[:-5] if prob_path.endswith(".zarr") else prob_path
    out = ic.out or f"{base}_instances.zarr"
    work = Path(ic.work_dir) if ic.work_dir else Path(out).with_name(Path(out).name + ".work")
    request = json.loads(json.dumps(dataclasses.asdict(ic), default=str))
    record = Path(out) / "predict_instances.json"  # the settings that made the labels
    if cfg.predict.resume and Path(out).exists() and not work.exists():
        old = json.loads(record.read_text()) if record.exists() else None
        if old is not None and old != request:
            keys = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
            raise VolumeError(
                f"instance labels {out} were made with other settings (differs in: "
                f"{', '.join('instances.' + k for k in keys)}); remove them or give "
                "instances.out=PATH to keep both"
            )
        log.info("predict: instance labels %s already written (predict.resume=true)", out)
        return {"out": out, "method": ic.method, "reused": True}
    res = run_instances(ic, prob_path, out)
    if distributed.process()[0] == 0:
        record.write_text(json.dumps(request, indent=1))
    return {"out": out, "method": ic.method, **res}
