"""Dense features of a volume of any size from a frozen encoder, window by window: the one windowed
encoder of emfm (the main job's probe, the probing benchmark, feature export and the clustering
regime all encode through it).

The volume (or an ROI of it) is cut into blocks; each is encoded in a window of `margin` voxels of
context on every side (real neighbouring voxels where the volume has them, mirrored at its edge).
With `blend="none"` only the block's own features are kept (exact for an encoder whose receptive
field fits in the margin and whose norm is per pixel, e.g. a U-Net with layer norm); a ViT's
features also depend on where a token sits in its window, and a U-Net with group norm (the zoo's)
normalises with statistics of the whole window, both of which leave block seams, so neighbouring
windows can be blended over their overlap instead (`blend="cosine"` etc.,
emfm.export.windows.Blender; what `blend="auto"` does for them). A 2D encoder sees one section at a
time (blocks of `1 x tile x tile`); a 3D encoder sees `tile_z x tile x tile` blocks.

The features `[z', y', x', c]` lie on a grid of `stride` voxels per cell: the ViT patch size, or for
a U-Net 1 (decoder output) or the pooling of the finest chosen encoder level; features of several
layers (`layers`: ViT blocks or U-Net levels, concatenated) are upsampled (nearest) to the finest of
their grids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emfm.errors import UserError
from emfm.export.windows import Blender, block_origins, pad_batch, read_window

BLENDS = ("auto", "none", "cosine", "gaussian", "constant")


def normalise(x: np.ndarray, grey_range: tuple[float, float]) -> np.ndarray:
    """Grey values to the encoders' input: linear from `grey_range` (lo, hi) to [0, 1], clipped."""
    lo, hi = grey_range
    return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _pad3(t) -> tuple[int, int, int]:
    t = tuple(int(v) for v in t)
    return (1,) + t if len(t) == 2 else t


def alignment(encoder) -> tuple[int, int, int]:
    """Voxels (z, y, x) that blocks and margins must be multiples of: a U-Net's total pooling, a
    ViT's patch size."""
    spec = encoder.spec
    return _pad3(spec.total_pool() if hasattr(encoder, "decode") else spec.patch_size)


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
        self.layers = self._chosen(layers, spec.depth)
        strides, widths = self._layer_grids(spec)
        if embed:  # the patch embedding (tokens before the first block) first, then the layers
            strides, widths = [_pad3(spec.patch_size)] + strides, [spec.width] + widths
        self.strides, self.widths = strides, widths
        self.stride = tuple(min(s[a] for s in strides) for a in range(3))
        self.align = alignment(encoder)
        if self.ndim == 2:
            block, margin = (1, block[1], block[2]), (0, margin[1], margin[2])
        for name, v in (("block", block), ("margin", margin)):
            if any(x % a for x, a in zip(v, self.align)):
                raise UserError(
                    f"export {name} {tuple(v)} (z, y, x voxels) must be a multiple of "
                    f"{self.align}, the encoder's {'pooling' if self.is_unet else 'patch size'}"
                )
        self.block, self.margin = tuple(block), tuple(margin)
        self.window = tuple(b + 2 * m for b, m in zip(block, margin))
        self.cells = tuple(b // s for b, s in zip(block, self.stride))
        self.width = sum(widths)
        self.out_dtype = np.dtype(out_dtype)
        self.pca = None
        graphdef, self.params = nnx.split(encoder)
        self._fwd = jax.jit(self._forward(graphdef, spec.depth), static_argnums=4)
        self._compiled: dict = {}
        self.compile_seconds = 0.0

    def _chosen(self, layers, depth: int) -> tuple[int, ...]:
        """The layers in the order given, indices resolved (layer_index), repeats dropped."""
        layers = tuple(int(i) for i in layers)
        for i in layers:
            if not -depth <= i <= depth:
                raise UserError(
                    f"export.layers={list(layers)}: the encoder has {depth} "
                    f"{'levels' if self.is_unet else 'blocks'} (indices {-depth}..{depth - 1}, "
                    f"and {depth} for its final output)"
                )
        norm = [layer_index(i, depth) for i in layers]
        return tuple(sorted(set(norm), key=norm.index))

    def _forward(self, graphdef, depth: int) -> Callable:
        block = self.block
        collect = tuple(i for i in self.layers if i != depth)

        def fwd(prm, x, mean, comp, out_dtype):
            b = x.shape[0]
            xin = (x[:, 0] if self.ndim == 2 else x)[..., None]
            _, aux = nnx.merge(graphdef, prm)(xin, return_blocks=collect)
            maps = []
            srcs = [
                aux["patch_map"] if i == depth else aux["blocks"][i]
                for i in self.layers or (depth,)
            ]
            if self.embed:
                srcs = [aux["embed_map"]] + srcs
            for f, s in zip(srcs, self.strides):
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

        return fwd

    def _layer_grids(self, spec) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Voxels per cell (z, y, x) and channels of each chosen layer (or of the final output)."""
        if not self.is_unet:
            p = _pad3(spec.patch_size)
            return [p] * max(1, len(self.layers)), [spec.width] * max(1, len(self.layers))
        if not self.layers:
            return [(1, 1, 1)], [spec.widths[0]]
        grids = []
        for lvl in self.layers:
            tot = [1] * spec.ndim
            for k in range(1, lvl + 1 if lvl < spec.depth else 1):  # depth: the decoder output
                tot = [t * w for t, w in zip(tot, spec.pool_window(k))]
            grids.append(_pad3(tot))
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
        fn, pca = self.compiled(raw=raw)
        x = jnp.asarray(pad_batch(windows, self.batch_size), jnp.float32)
        return np.asarray(fn(self.params, x, *pca))[:n]


def feature_groups(
    encoder, layers: tuple[int, ...] = (), embed: bool = False
) -> list[tuple[int, tuple[int, int]]]:
    """`[(channels, (ry, rx)), ...]`: the channel groups of `encode`'s 2D features in order, each
    nearest-upsampled from a grid `ry x rx` times coarser than the features' own (a U-Net level's
    pooling), for a probe that reads each group on its own grid
    (emfm.eval.linear_probe.train_linear_probe)."""
    a = alignment(encoder)
    enc = BlockEncoder(encoder, block=a, margin=(0, 0, 0), layers=layers, embed=embed)
    return [
        (int(w), (s[1] // enc.stride[1], s[2] // enc.stride[2]))
        for w, s in zip(enc.widths, enc.strides)
    ]


def block_encoders(
    encoder,
    *,
    block: tuple[int, int, int],
    margin: tuple[int, int, int],
    blend: str = "none",
    batch_size: int = 8,
    layers: tuple[int, ...] = (),
    embed: bool = False,
    out_dtype=np.float32,
) -> tuple[BlockEncoder, BlockEncoder | None, str]:
    """`(enc, whole, blend)`: the encoder of blocks with their margins; for a blend other than
    "none" also the encoder of whole windows (float32: blended before the cast to `out_dtype`);
    and the blend, "auto" resolved: none for a U-Net with a per-pixel norm (its margin-dropped
    blocks equal a whole-volume forward), cosine for a ViT and for a U-Net with group norm (whose
    statistics are taken over each window, so its blocks would differ at their seams)."""
    if blend not in BLENDS:
        raise UserError(f"export.blend={blend!r}: use {', '.join(BLENDS)}")
    kw = dict(batch_size=batch_size, layers=layers, embed=embed)
    enc = BlockEncoder(encoder, block=block, margin=margin, out_dtype=out_dtype, **kw)
    if blend == "auto":
        per_pixel = enc.is_unet and getattr(encoder.spec, "norm", "group") != "group"
        blend = "none" if per_pixel else "cosine"
    if blend == "none":
        return enc, None, blend
    whole = BlockEncoder(encoder, block=enc.window, margin=(0, 0, 0), out_dtype=np.float32, **kw)
    return enc, whole, blend


def block_part(enc: BlockEncoder, origin, features: np.ndarray, size) -> tuple[tuple, np.ndarray]:
    """(the feature cells of the block at `origin` (voxels) inside a region of `size` voxels, the
    block's features `[*enc.cells, c]` cut to them: a block at the region's far end overhangs)."""
    cells = tuple(
        slice(o // st, o // st + -(-min(b, n - o) // st))
        for o, b, n, st in zip(origin, enc.block, size, enc.stride)
    )
    return cells, features[tuple(slice(0, c.stop - c.start) for c in cells)]


# `read(encoder, origins)` yields (origins, windows [b, *encoder.window]) batches of
# encoder.batch_size blocks, the window of the block at origin o starting at o - encoder.margin.
WindowReader = Callable[[BlockEncoder, list], Iterator[tuple[list, np.ndarray]]]


def encode_blocks(
    enc: BlockEncoder,
    origins: list,
    read: WindowReader,
    *,
    whole: BlockEncoder | None = None,
    grid: Sequence[int] | None = None,
    blend: str = "none",
    out_dtype=np.float32,
) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
    """(origin, features `[*enc.cells, c]`) of each block at `origins` (region coordinates), in
    order: its window encoded and the margin dropped, or, given `whole` (the encoder of whole
    windows), blended from the windows that touch it over the feature `grid` of the region."""
    if whole is None:
        for batch, windows in read(enc, origins):
            yield from zip(batch, enc(windows))
        return
    yield from _blended_blocks(enc, whole, origins, read, grid, blend, out_dtype)


def _blended_blocks(
    enc: BlockEncoder, whole: BlockEncoder, todo, read: WindowReader, grid, blend, out_dtype
):
    """Windows lie on one grid (in feature cells: window = block + 2 margin, overlap 2 margin, the
    last flush with the end), are encoded once in the order the blocks first need them, and are
    kept until the last block that needs them is done."""
    s = enc.stride
    bl = Blender(
        None,
        whole.channels,
        grid,
        window=whole.cells,
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
    for batch, windows in read(whole, [tuple(c * st for c, st in zip(w, s)) for w in order]):
        for o, f in zip(batch, whole(windows)):
            cache[tuple(v // st for v, st in zip(o, s))] = f
        while j < len(todo) and all(w in cache for w in need[j]):
            size = tuple(b.stop - b.start for b in boxes[j])
            acc = np.zeros(size + (whole.channels,), np.float32)
            wsum = np.zeros(size, np.float32)
            for w in need[j]:
                bl.add(acc, wsum, boxes[j], w, cache[w])
                if last[w] == j:
                    del cache[w]
            yield todo[j], (acc / wsum[..., None]).astype(out_dtype)
            j += 1


def array_reader(array: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> WindowReader:
    """Windows of an in-memory volume `[z, y, x]` whose region starts at voxel `offset`."""

    def read(enc: BlockEncoder, origins: list):
        for i in range(0, len(origins), enc.batch_size):
            batch = origins[i : i + enc.batch_size]
            los = [[o + a - m for o, a, m in zip(org, offset, enc.margin)] for org in batch]
            yield (
                batch,
                np.stack(
                    [read_window(array.__getitem__, array.shape, lo, enc.window) for lo in los]
                ),
            )

    return read


def encode(
    encoder,
    volume: np.ndarray,
    *,
    tile: int | None = 128,
    margin: int = 32,
    tile_z: int | None = None,
    margin_z: int = 0,
    roi: Sequence[Sequence[int]] | None = None,
    blend: str = "none",
    layers: tuple[int, ...] = (),
    embed: bool = False,
    batch_size: int = 8,
) -> np.ndarray:
    """Dense features `[ceil(z/sz), ceil(y/sy), ceil(x/sx), c]` of an in-memory volume `[z, y, x]`
    (floats in [0, 1]; a stack of sections for a 2D encoder), or of its `roi` ([[z0, z1], [y0, y1],
    [x0, x1]]; context is read from outside it where the volume has voxels), window by window (see
    the module docstring; s = the feature stride).

    `tile`: in-plane block size (None: the whole ROI in one window, rounded up to the encoder's
    alignment); `tile_z`, `margin_z`: the same along z for a 3D encoder (None: the whole depth);
    `layers`: ViT blocks or U-Net levels whose features are concatenated, () = the final output;
    `embed`: also the ViT's patch embedding (the tokens before the first block), placed first;
    `blend`: "none" (margins dropped) or a Blender weight ("auto": none for a U-Net with a
    per-pixel norm, else cosine)."""
    box = [(0, n) for n in volume.shape] if roi is None else [tuple(r) for r in roi]
    size = tuple(b - a for a, b in box)
    a = alignment(encoder)

    def whole(n, ax):  # the whole extent, rounded up to the alignment
        return -(-n // a[ax]) * a[ax]

    ty, tx = (whole(size[1], 1), whole(size[2], 2)) if tile is None else (tile, tile)
    tz = whole(size[0], 0) if tile_z is None else tile_z
    enc, benc, blend = block_encoders(
        encoder,
        block=(tz, ty, tx),
        margin=(margin_z, margin, margin),
        blend=blend,
        batch_size=batch_size,
        layers=layers,
        embed=embed,
    )
    grid = tuple(-(-n // st) for n, st in zip(size, enc.stride))
    out = np.zeros(grid + (enc.channels,), np.float32)
    blocks = encode_blocks(
        enc,
        block_origins(size, enc.block),
        array_reader(volume, [b[0] for b in box]),
        whole=benc,
        grid=grid,
        blend=blend,
    )
    for o, f in blocks:
        cells, part = block_part(enc, o, f, size)
        out[cells] = part
    return out
