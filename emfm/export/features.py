"""Dense feature export of a volume of any size, block by block with overlap, to OME-Zarr through
tensorstore.

The volume (or an ROI of it) is cut into blocks; each is read with `margin` voxels of context on
every side (real neighbouring voxels where the volume has them, mirrored at its edge) and encoded.
With `blend=none` only the block's own features are written (exact for an encoder whose receptive
field fits in the margin, e.g. a U-Net); a ViT's features also depend on where a token sits in its
window, which leaves block seams, so by default its neighbouring windows are blended over their
overlap instead (`_blended_blocks`). A 2D encoder sees one section at a time (blocks are `1 x tile x
tile`); a 3D encoder sees `block_z x tile x tile` blocks.

The output `[z', y', x', c]` lies on a grid of `stride` voxels per cell: the ViT patch size, or for
a U-Net 1 (decoder output) or the pooling of the finest chosen encoder level; features of several
layers (`layers`, concatenated) are upsampled (nearest) to the finest of their grids. One block is
one chunk, so a chunk present in the store is a finished block: an interrupted export restarted with
the same arguments skips those and yields the same bytes, and several JAX processes split the blocks
(block i goes to process i mod n; blended, contiguous runs of blocks). Optional PCA to `pca_k`
channels is fitted on a sample of blocks once and stored in the array's attributes, so resumed and
parallel writers project alike. Reading runs ahead in a thread and writes are tensorstore futures,
so I/O overlaps the encoder.

The output is an OME-Zarr image group (NGFF 0.5: zarr v3 group, array "0" stored as c, z, y, x;
emfm's reader gives it back as z, y, x, c): axes metadata (a channel axis, z / y / x in nanometres),
the scale of a feature cell (input voxel size x stride) and its translation (the centre of cell 0 in
the input's physical frame, so the features overlay the input in OME-Zarr viewers), and the export's
own record (checkpoint, layers, PCA basis, stride, ROI) under the group attribute "emfm".
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from emfm.data.volume import Volume, VolumeError, create_ome_zarr, open_volume, written_chunks
from emfm.errors import UserError
from emfm.eval.probe import normalise
from emfm.train.logging import progress

log = logging.getLogger("emfm")

OUT_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": jnp.bfloat16}
BLENDS = ("auto", "none", "cosine", "gaussian", "constant")


# ---------------------------------------------------------------- encoder from a checkpoint
ARCH_IGNORED = ("dtype", "remat")  # compute settings; the parameters do not depend on them


def _arch(model_cfg) -> dict:
    from emfm.models.unet import UNetSpec
    from emfm.models.vit import ViTSpec

    spec = (UNetSpec if model_cfg.name == "unet" else ViTSpec).from_config(model_cfg)
    return {
        "name": model_cfg.name,
        **{k: v for k, v in asdict(spec).items() if k not in ARCH_IGNORED},
    }


def load_export_encoder(model_cfg, checkpoint: str = "", *, seed: int = 0):
    """`(encoder, checkpoint meta)`: a random-init encoder of `model_cfg` without a checkpoint, else
    the checkpoint's encoder, whose recorded architecture must be `model_cfg`'s (checked from the
    meta record before any array is loaded; a mismatch is a CheckpointError naming the differing
    keys)."""
    from emfm.config.common import ModelConfig
    from emfm.train import checkpoint as ckpt
    from emfm.train.state import build_encoder, load_encoder

    if not checkpoint:
        return build_encoder(model_cfg, seed=seed), {}
    run = ckpt.find_checkpoint_dir(checkpoint)
    meta = ckpt.read_meta(run)
    try:
        have = _arch(ModelConfig(**meta["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(
            f"checkpoint {checkpoint} has no usable model record: {e}"
        ) from e
    want = _arch(model_cfg)
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise ckpt.CheckpointError(
            f"checkpoint {checkpoint} does not match the model config: "
            + ", ".join(
                f"model.{k}={want[k]} in the config but {have.get(k)} in the checkpoint"
                for k in diff
            )
            + " (choose the checkpoint's model, e.g. the model=/debug= overrides it was trained "
            "with)"
        )
    return load_encoder(str(run))


# ---------------------------------------------------------------- encoder on blocks
def layer_index(i: int, depth: int) -> int:
    """A chosen layer's index in 0..depth: ViT blocks / U-Net encoder levels 0..depth-1 (negative
    indices count from the last), and `depth` for the encoder's final output (a ViT's normed last
    block, a U-Net's decoder output), so the final output can be concatenated with layers."""
    return i if i == depth else i % depth


class BlockEncoder:
    """Encodes batches of `[block + 2 margin]` windows `[b, wz, wy, wx]` (floats in [0, 1]) and
    returns the block interiors' features `[b, bz/sz, by/sy, bx/sx, c]` (c = pca_k when a PCA basis
    is set)."""

    def __init__(
        self,
        encoder,
        *,
        block: tuple[int, int, int],
        margin: tuple[int, int, int],
        batch_size: int = 8,
        layers: tuple[int, ...] = (),
        out_dtype=np.float32,
        embed: bool = False,
    ):
        spec = encoder.spec
        self.ndim, self.batch_size = spec.ndim, batch_size
        self.is_unet = hasattr(encoder, "decode")
        if embed and self.is_unet:
            raise UserError("patch-embedding features (embed=true) exist for ViT encoders only")
        self.embed = embed
        layers = tuple(int(i) for i in layers)
        for i in layers:
            if not -spec.depth <= i <= spec.depth:
                raise UserError(
                    f"export.layers={list(layers)}: the encoder has {spec.depth} "
                    f"{'levels' if self.is_unet else 'blocks'} (indices "
                    f"{-spec.depth}..{spec.depth - 1}, and {spec.depth} for its final output)"
                )
        norm = [layer_index(i, spec.depth) for i in layers]
        self.layers = tuple(sorted(set(norm), key=norm.index))
        strides, widths = self._layer_grids(spec)
        if (
            embed
        ):  # the patch embedding (tokens before the first block) first, then the chosen layers
            strides, widths = [self._pad3(spec.patch_size)] + strides, [spec.width] + widths
        self.stride = tuple(min(s[a] for s in strides) for a in range(3))
        align = self._pad3(spec.total_pool()) if self.is_unet else self._pad3(spec.patch_size)
        if self.ndim == 2:
            block, margin = (1, block[1], block[2]), (0, margin[1], margin[2])
        for name, v in (("block", block), ("margin", margin)):
            if any(x % a for x, a in zip(v, align)):
                raise UserError(
                    f"export {name} {tuple(v)} (z, y, x voxels) must be a multiple of {align}, "
                    f"the encoder's {'pooling' if self.is_unet else 'patch size'}"
                )
        self.block, self.margin, self.align = tuple(block), tuple(margin), align
        self.window = tuple(b + 2 * m for b, m in zip(block, margin))
        self.cells = tuple(b // s for b, s in zip(block, self.stride))
        self.width = sum(widths)
        self.out_dtype = np.dtype(out_dtype)
        self.pca = None
        graphdef, self.params = nnx.split(encoder)
        collect = tuple(i for i in self.layers if i != spec.depth)

        def fwd(prm, x, mean, comp, out_dtype):
            b = x.shape[0]
            xin = (x[:, 0] if self.ndim == 2 else x)[..., None]
            _, aux = nnx.merge(graphdef, prm)(xin, return_blocks=collect)
            maps = []
            srcs = (
                [aux["patch_map"]]
                if not self.layers
                else [
                    aux["patch_map"] if i == spec.depth else aux["blocks"][i] for i in self.layers
                ]
            )
            if self.embed:
                srcs = [aux["embed_map"]] + srcs
            for f, s in zip(srcs, strides):
                if f.ndim == 3:  # ViT block tokens [b, n, d] -> grid
                    f = f.reshape(b, *aux["patch_map"].shape[1:-1], -1)
                if self.ndim == 2:
                    f = f[:, None]
                lo = [m // t for m, t in zip(self.margin, s)]
                f = f[
                    :,
                    lo[0] : lo[0] + block[0] // s[0],
                    lo[1] : lo[1] + block[1] // s[1],
                    lo[2] : lo[2] + block[2] // s[2],
                ]
                for ax in range(3):  # nearest upsampling to the common (finest) grid
                    if s[ax] > self.stride[ax]:
                        f = jnp.repeat(f, s[ax] // self.stride[ax], axis=ax + 1)
                maps.append(f.astype(jnp.float32))
            f = jnp.concatenate(maps, axis=-1) if len(maps) > 1 else maps[0]
            if mean is not None:
                f = (f - mean) @ comp.T
            return f.astype(out_dtype)

        self._fwd = jax.jit(fwd, static_argnums=4)
        self._compiled: dict = {}
        self.compile_seconds = 0.0

    @staticmethod
    def _pad3(t) -> tuple[int, int, int]:
        t = tuple(int(v) for v in t)
        return (1,) + t if len(t) == 2 else t

    def _layer_grids(self, spec) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Voxels per cell (z, y, x) and channels of each chosen layer (or of the final output)."""
        if not self.is_unet:
            p = self._pad3(spec.patch_size)
            return [p] * max(1, len(self.layers)), [spec.width] * max(1, len(self.layers))
        if not self.layers:
            return [(1, 1, 1)], [spec.widths[0]]
        grids = []
        for lvl in self.layers:
            tot = [1] * spec.ndim
            for k in range(1, lvl + 1 if lvl < spec.depth else 1):  # depth: the decoder output
                tot = [t * w for t, w in zip(tot, spec.pool_window(k))]
            grids.append(self._pad3(tot))
        return grids, [spec.widths[lvl % spec.depth] for lvl in self.layers]

    @property
    def channels(self) -> int:
        return self.width if self.pca is None else len(self.pca[1])

    def set_pca(self, mean: np.ndarray, components: np.ndarray) -> None:
        self.pca = (jnp.asarray(mean, jnp.float32), jnp.asarray(components, jnp.float32))

    def compiled(self, *, raw: bool = False):
        """The forward program for full batches, compiled ahead of time (so timing starts after
        it)."""
        key = (raw or self.pca is None, np.dtype(np.float32) if raw else self.out_dtype)
        if key not in self._compiled:
            t0 = time.perf_counter()
            x = jax.ShapeDtypeStruct((self.batch_size,) + self.window, jnp.float32)
            pca = (None, None) if key[0] else self.pca
            self._compiled[key] = (self._fwd.lower(self.params, x, *pca, key[1]).compile(), pca)
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[key]

    def __call__(self, windows: np.ndarray, *, raw: bool = False) -> np.ndarray:
        """Features of `[n, wz, wy, wx]` windows; `raw`: float32 before PCA (for fitting it)."""
        n = len(windows)
        if n < self.batch_size:  # keep one compiled shape
            windows = np.concatenate(
                [windows, np.zeros((self.batch_size - n,) + windows.shape[1:], windows.dtype)]
            )
        fn, pca = self.compiled(raw=raw)
        return np.asarray(fn(self.params, jnp.asarray(windows, jnp.float32), *pca))[:n]


def window_region(
    origin, shape, enc: BlockEncoder
) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """The region of the volume (clipped to `shape`) that the window of the block at `origin` (z, y,
    x voxels, volume coordinates) covers, and the mirror padding that completes it."""
    lo = [o - m for o, m in zip(origin, enc.margin)]
    hi = [a + w for a, w in zip(lo, enc.window)]
    region = tuple(slice(max(0, l_), min(s, h)) for l_, h, s in zip(lo, hi, shape))
    return region, [(max(0, -l_), max(0, h - s)) for l_, h, s in zip(lo, hi, shape)]


def pad_window(a: np.ndarray, pad) -> np.ndarray:
    if not any(p0 or p1 for p0, p1 in pad):
        return a
    mode = "reflect" if all(n > max(p) for n, p in zip(a.shape, pad)) else "symmetric"
    return np.pad(a, pad, mode=mode)


def read_window(read, shape, origin, enc: BlockEncoder) -> np.ndarray:
    """The block at `origin` with its margin, mirrored where it runs past the volume; `read(region)`
    returns the voxels of a region (tuple of slices)."""
    region, pad = window_region(origin, shape, enc)
    return pad_window(read(region), pad)


def block_origins(
    shape: tuple[int, int, int], block: tuple[int, int, int]
) -> list[tuple[int, int, int]]:
    return [
        (z, y, x)
        for z in range(0, shape[0], block[0])
        for y in range(0, shape[1], block[1])
        for x in range(0, shape[2], block[2])
    ]


def encode_sections(
    encoder,
    images: np.ndarray,
    *,
    tile: int = 128,
    margin: int = 32,
    batch_size: int = 8,
    blocks: tuple[int, ...] = (),
    embed: bool = False,
) -> np.ndarray:
    """Features `[n, ceil(y/s), ceil(x/s), d]` of in-memory sections `[n, y, x]` (floats in [0, 1])
    from a 2D encoder, encoded tile by tile exactly as `export_features` does (s = the feature
    stride: the patch size, or 1 / the finest chosen level's pooling for a U-Net; `blocks`: encoder
    blocks or U-Net levels whose features are concatenated, () = the final output; `embed`: also the
    ViT's patch embedding, i.e. the tokens before the first block, placed first)."""
    enc = BlockEncoder(
        encoder,
        block=(1, tile, tile),
        margin=(0, margin, margin),
        batch_size=batch_size,
        layers=blocks,
        embed=embed,
    )
    if enc.ndim != 2:
        raise UserError(
            "encode_sections takes a 2D encoder; export 3D encoders with export_features"
        )
    n, ny, nx = images.shape
    s = enc.stride
    out = np.zeros((n, -(-ny // s[1]), -(-nx // s[2]), enc.channels), np.float32)
    origins = [(z, y, x) for z in range(n) for y in range(0, ny, tile) for x in range(0, nx, tile)]
    for i in range(0, len(origins), batch_size):
        chunk = origins[i : i + batch_size]
        w = np.stack([read_window(lambda r: images[r], (n, ny, nx), o, enc) for o in chunk])
        for (z, y, x), f in zip(chunk, enc(w)):
            hy, hx = -(-min(tile, ny - y) // s[1]), -(-min(tile, nx - x) // s[2])
            out[z, y // s[1] : y // s[1] + hy, x // s[2] : x // s[2] + hx] = f[0, :hy, :hx]
    return out


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

    `blend`: "none" encodes each block in a window of `margin` context and drops the margin;
    "cosine", "gaussian" or "constant" encode the same windows (block + 2 margin) but keep all of
    them, blending neighbouring windows over their 2 x margin overlap with emfm.finetune.predict's
    weights (so a ViT's position-dependent features show no block seams, at the same number of
    windows); "auto" = cosine for a ViT, none for a U-Net (whose margin-dropped blocks already equal
    a whole-volume forward). Without blending this process writes blocks i with i mod process_count
    == process_index, with blending a contiguous run of blocks (neighbouring blocks share windows).
    Returns a summary dict."""
    import json

    from emfm.data.sampling import Region

    if vol.ndim != 3:
        raise VolumeError(
            f"volume {vol.path} has {vol.ndim} dimensions (axes {''.join(vol.axes)}); export reads "
            "single-channel z, y, x volumes (store a 2D image as [1, y, x])"
        )
    if dtype not in OUT_DTYPES:
        raise UserError(f"export.dtype={dtype!r}: use {', '.join(OUT_DTYPES)}")
    box = Region.of(vol, roi).box
    size = tuple(b - a for a, b in box)
    if blend not in BLENDS:
        raise UserError(f"export.blend={blend!r}: use {', '.join(BLENDS)}")
    enc = BlockEncoder(
        encoder,
        block=(block_z, tile, tile),
        margin=(margin_z, margin, margin),
        batch_size=batch_size,
        layers=layers,
        out_dtype=OUT_DTYPES[dtype],
    )
    if blend == "auto":
        blend = "none" if enc.is_unet else "cosine"
    benc = (
        None
        if blend == "none"
        else BlockEncoder(
            encoder,
            block=enc.window,
            margin=(0, 0, 0),
            batch_size=batch_size,
            layers=layers,
            out_dtype=np.float32,
        )
    )
    if pca_k < 0 or pca_k > enc.width:
        raise UserError(
            f"export.pca_k={pca_k}: must be 0 (no reduction) .. {enc.width} (the feature channels)"
        )
    s, cells = enc.stride, enc.cells
    grid = tuple(-(-n // st) for n, st in zip(size, s))
    channels = pca_k or enc.width
    plan = ExportPlan(
        source=vol.path,
        roi=[list(b) for b in box],
        encoder=asdict(encoder.spec),
        checkpoint=str(Path(checkpoint).resolve()) if checkpoint else "",
        layers=list(enc.layers),
        block=list(enc.block),
        margin=list(enc.margin),
        stride=list(s),
        grey_range=[float(v) for v in grey_range],
        dtype=dtype,
        pca_k=pca_k,
        pca_sample_blocks=pca_sample_blocks,
        seed=seed,
        blend=blend,
    )
    plan_rec = json.loads(json.dumps(asdict(plan)))
    shape, out_dtype = grid + (channels,), np.dtype(OUT_DTYPES[dtype])
    exists = (Path(out_path) / "zarr.json").exists()
    if (
        exists and resume
    ):  # every process checks before any compute, so all of them stop on a mismatch
        _check_existing(out_path, shape, out_dtype, plan_rec)
    origins = block_origins(size, enc.block)
    pid, nproc = jax.process_index(), jax.process_count()
    # ---- create the output (process 0; PCA fitted here once), the others wait and open it
    if pid == 0 and not (exists and resume):
        pca = (
            _fit_pca(benc or enc, vol, box, origins, grey_range, pca_k, pca_sample_blocks, seed)
            if pca_k
            else None
        )
        attrs = {
            "export": plan_rec,
            "source": vol.path,
            "stride": list(s),
            "roi_origin": [b[0] for b in box],
            "grey_range": plan_rec["grey_range"],
            "layers": list(enc.layers),
            "content": _content(enc, pca_k),
        }
        if pca is not None:
            attrs["pca"] = pca
        create_ome_zarr(
            out_path,
            shape,
            out_dtype,
            chunks=cells + (channels,),
            attributes=attrs,
            **feature_grid_transform(vol, [b[0] for b in box], s),
            name="emfm features",
        )
    _barrier("emfm_export_created", nproc)
    out = open_volume(out_path, write=True)
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
    fwd = benc or enc
    if pca_k:
        p = out.attributes["pca"]
        fwd.set_pca(np.asarray(p["mean"], np.float32), np.asarray(p["components"], np.float32))
    nb = len(origins)
    mine = (
        [i for i in range(nb) if i % nproc == pid]
        if benc is None
        else list(range(pid * nb // nproc, (pid + 1) * nb // nproc))
    )
    done = written_chunks(out)
    todo = [
        origins[i] for i in mine if tuple(o // b for o, b in zip(origins[i], enc.block)) not in done
    ]
    skipped = len(mine) - len(todo)
    if todo:
        fwd.compiled()
        log.info(
            "export: forward of %d x %s voxels compiled in %.1f s",
            batch_size,
            fwd.window,
            fwd.compile_seconds,
        )
    bar = progress(
        len(mine),
        initial=skipped,
        desc="export" if nproc == 1 else f"export {pid}/{nproc}",
        enabled=show_progress,
    )
    bar.unit = "block"
    t0 = time.perf_counter()
    voxels = 0
    pending: deque = deque()
    blocks = (
        _margin_blocks(enc, vol, box, todo, grey_range, prefetch)
        if benc is None
        else _blended_blocks(
            enc, benc, vol, box, todo, grey_range, prefetch, grid, blend, out_dtype
        )
    )
    for n_done, (o, f) in enumerate(blocks, start=1):
        valid = [min(b, n - x) for b, n, x in zip(enc.block, size, o)]
        c = [-(-v // st) for v, st in zip(valid, s)]
        c0 = [x // st for x, st in zip(o, s)]
        region = tuple(slice(a, a + n) for a, n in zip(c0, c))
        pending.append((o, out.array[region + (slice(None),)].write(f[: c[0], : c[1], : c[2]])))
        voxels += math.prod(valid)
        while len(pending) > 4 * batch_size:
            _finish_write(out, *pending.popleft())
        bar.update(1)
        if n_done % batch_size == 0:
            bar.set_postfix_str(f"{voxels / max(time.perf_counter() - t0, 1e-9):.3g} vox/s")
    while pending:
        _finish_write(out, *pending.popleft())
    bar.close()
    secs = time.perf_counter() - t0
    _barrier("emfm_export_done", nproc)
    res = {
        "path": str(out_path),
        "shape": list(shape),
        "dtype": dtype,
        "layers": list(enc.layers),
        "stride": list(s),
        "block": list(enc.block),
        "margin": list(enc.margin),
        "blend": blend,
        "roi": plan_rec["roi"],
        "process": pid,
        "processes": nproc,
        "blocks": len(origins),
        "tiles_written": len(todo),
        "tiles_skipped": skipped,
        "voxels": voxels,
        "seconds": secs,
        "voxels_per_s": voxels / secs if secs > 0 and voxels else None,
    }
    if pca_k:
        res["pca_explained_variance"] = out.attributes["pca"]["explained_variance_ratio"]
    return res


def _margin_blocks(enc: BlockEncoder, vol, box, todo, grey_range, prefetch):
    """(origin, features) of each block in `todo`: its window encoded, the margin dropped."""
    for batch, windows in _prefetch(vol, box, todo, enc, grey_range, prefetch):
        yield from zip(batch, enc(windows))


def _blended_blocks(
    enc: BlockEncoder,
    benc: BlockEncoder,
    vol,
    box,
    todo,
    grey_range,
    prefetch,
    grid,
    blend: str,
    out_dtype,
):
    """(origin, features) of each block in `todo`, blended from the whole-window features (`benc`)
    of the windows that touch it. Windows lie on emfm.finetune.predict's grid (in feature cells:
    window block + 2 margin, overlap 2 margin, the last flush with the end), are encoded once in the
    order the blocks first need them, and are kept until the last block that needs them is done."""
    from emfm.finetune.predict import Blender

    s = enc.stride
    bl = Blender(
        None,
        benc.channels,
        grid,
        window=benc.cells,
        overlap=[2 * m // st for m, st in zip(enc.margin, s)],
        blend=blend,
    )
    boxes = [
        tuple(slice(o // st, min(o // st + c, g)) for o, st, c, g in zip(org, s, enc.cells, grid))
        for org in todo
    ]
    need = [bl.windows_touching(b) for b in boxes]
    order, last = [], {}
    for j, ws in enumerate(need):
        for w in ws:
            if w not in last:
                order.append(w)
            last[w] = j
    cache: dict = {}
    j = 0
    for batch, windows in _prefetch(
        vol, box, [tuple(c * st for c, st in zip(w, s)) for w in order], benc, grey_range, prefetch
    ):
        for o, f in zip(batch, benc(windows)):
            cache[tuple(v // st for v, st in zip(o, s))] = f
        while j < len(todo) and all(w in cache for w in need[j]):
            size = tuple(b.stop - b.start for b in boxes[j])
            acc = np.zeros(size + (benc.channels,), np.float32)
            wsum = np.zeros(size, np.float32)
            for w in need[j]:
                bl.add(acc, wsum, boxes[j], w, cache[w])
                if last[w] == j:
                    del cache[w]
            yield todo[j], (acc / wsum[..., None]).astype(out_dtype)
            j += 1


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


def _read_batch(vol: Volume, box, batch, enc: BlockEncoder, grey_range) -> np.ndarray:
    """Windows of a batch of blocks (ROI coordinates), all reads in flight at once."""
    off = [b[0] for b in box]
    plans = [
        window_region([o + a for o, a in zip(origin, off)], vol.shape, enc) for origin in batch
    ]
    futs = [vol.read_async(region) for region, _ in plans]
    wins = [pad_window(vol.result(f, region), pad) for f, (region, pad) in zip(futs, plans)]
    return normalise(np.stack(wins), grey_range)


def _prefetch(vol, box, todo, enc: BlockEncoder, grey_range, depth: int):
    """Yields (origins, windows) batches, read `depth` batches ahead in a thread."""
    bs = enc.batch_size
    batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
    if depth <= 0:
        for b in batches:
            yield b, _read_batch(vol, box, b, enc, grey_range)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put((b, _read_batch(vol, box, b, enc, grey_range)))
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="emfm-export-reader")
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def _fit_pca(
    enc: BlockEncoder,
    vol: Volume,
    box,
    origins,
    grey_range,
    k: int,
    n_blocks: int,
    seed: int,
    *,
    max_vectors: int = 200_000,
) -> dict:
    """Mean, top-k principal axes and their explained-variance ratios of the features of a seeded
    random sample of blocks (features of cells past the volume edge left out)."""
    rng = np.random.default_rng(seed)
    pick = sorted(
        rng.choice(len(origins), size=min(n_blocks, len(origins)), replace=False).tolist()
    )
    size = tuple(b - a for a, b in box)
    vecs = []
    for i in range(0, len(pick), enc.batch_size):
        batch = [origins[j] for j in pick[i : i + enc.batch_size]]
        for o, f in zip(batch, enc(_read_batch(vol, box, batch, enc, grey_range), raw=True)):
            c = [-(-min(b, n - x) // st) for b, n, x, st in zip(enc.block, size, o, enc.stride)]
            vecs.append(f[: c[0], : c[1], : c[2]].reshape(-1, f.shape[-1]))
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
