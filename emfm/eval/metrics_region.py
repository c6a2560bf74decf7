"""Region-agreement metrics from one sparse contingency table.

Every score here (Rand index, adapted Rand error, ISBI V^Rand / V^Info, variation of information,
CREMI score) is a function of the joint voxel counts ``n_ij`` (ground-truth id i, predicted id j).
:class:`ContingencyTable` builds those counts once, block by block, so a volume larger than memory
is read slab by slab; :func:`region_scores` derives everything from it.

Conventions (fixed here, used by every function in the module):

* arguments are ``(pred, gt)``; the table is indexed ``[gt_id, pred_id]`` (as in skimage, whose
  ``contingency_table(im_true, im_test)`` puts the truth on rows);
* ``N = sum_ij n_ij``, ``a_i = sum_j n_ij`` (gt segment sizes), ``b_j = sum_i n_ij`` (pred sizes),
  all counted over the voxels that are *not ignored*: a voxel is dropped when its gt id is in
  ``ignore_gt`` or its pred id is in ``ignore_pred``;
* logarithms are base 2 (bits), as in skimage.metrics.variation_of_information.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from emfm.errors import UserError

__all__ = [
    "ContingencyTable",
    "region_scores",
    "adapted_rand_error",
    "variation_of_information",
    "rand_index",
    "thin_boundaries",
    "check_label_array",
]

# Voxels per run-length chunk: large enough that numpy overhead vanishes, small enough that the
# per-chunk temporaries (a few bytes per voxel) stay in cache-sized tens of MB.
_CHUNK = 1 << 21
# Compact the accumulated (gt, pred, count) triples once this many are pending.
_COMPACT_AT = 1 << 22


def check_label_array(arr, name: str) -> np.ndarray:
    """Return ``arr`` as an ndarray of integer (or bool) ids; raise UserError naming ``name``."""
    arr = np.asarray(arr)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise UserError(
            f"{name} must hold integer label ids, got dtype {arr.dtype}; "
            "threshold or cast probability maps before computing region/instance metrics"
        )
    return arr


def _as_id_dtype(values: np.ndarray) -> np.ndarray:
    """Ids are kept as int64 (uint64 stays uint64: casting could wrap large ids)."""
    if values.dtype == np.uint64:
        return values
    return values.astype(np.int64, copy=False)


def _unique_sum(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``ids`` and the sum of ``weights`` per id."""
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inv.ravel(), weights=weights, minlength=uniq.size).astype(np.int64)


def _offset(values: np.ndarray):
    """(values - min as uint64, min, max - min) so ids of any sign pack into few bits."""
    lo, hi = values.min(), values.max()
    shifted = values.astype(np.uint64) - np.asarray(lo).astype(np.uint64)  # wraps exactly
    return shifted, lo, int(hi) - int(lo)


def _unshift(shifted: np.ndarray, lo, dtype) -> np.ndarray:
    return (shifted + np.asarray(lo).astype(np.uint64)).astype(dtype)


def _pair_reduce(g: np.ndarray, p: np.ndarray, w: np.ndarray):
    """Sum weights ``w`` over equal ``(g, p)`` pairs; returns (g, p, w) sorted by (g, p).

    Ids are shifted to start at 0; when (gt bits + pred bits + weight bits) <= 64 the three are
    packed into one uint64 and a plain ``np.sort`` groups the pairs (no argsort, no inverse);
    with <= 64 bits for the pair alone, one argsort; otherwise a relabel to consecutive ids.
    """
    if g.size == 0:
        return g, p, w.astype(np.int64)
    gs, glo, grange = _offset(g)
    ps, plo, prange = _offset(p)
    bg, bp, bw = grange.bit_length(), prange.bit_length(), int(w.max()).bit_length()
    if bg + bp + bw <= 64:
        sh_p, sh_g = np.uint64(bw), np.uint64(bw + bp)
        key = (gs << sh_g) | (ps << sh_p) | w.astype(np.uint64)
        key.sort()
        pair = key >> sh_p
        starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        cnt = np.add.reduceat(key & np.uint64((1 << bw) - 1), starts).astype(np.int64)
        pair = pair[starts]
        pg = pair >> np.uint64(bp)
        pp = pair & np.uint64((1 << bp) - 1)
    elif bg + bp <= 64:
        key = (gs << np.uint64(bp)) | ps
        order = np.argsort(key)
        key = key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        cnt = np.add.reduceat(w[order].astype(np.int64), starts)
        key = key[starts]
        pg, pp = key >> np.uint64(bp), key & np.uint64((1 << bp) - 1)
    else:
        ug, ig = np.unique(gs, return_inverse=True)
        up, ip = np.unique(ps, return_inverse=True)
        k = ig.astype(np.int64) * up.size + ip
        uk, inv = np.unique(k, return_inverse=True)
        cnt = np.bincount(inv, weights=w, minlength=uk.size).astype(np.int64)
        pg, pp = ug[uk // up.size], up[uk % up.size]
    return _unshift(pg, glo, g.dtype), _unshift(pp, plo, p.dtype), cnt


def _runs(g: np.ndarray, p: np.ndarray):
    """Run-length encode two flat label arrays jointly: values at run starts and run lengths.

    EM segments are spatially coherent, so a raveled slab has ~10x fewer (gt, pred) runs than
    voxels; sorting runs instead of voxels is what makes the table cheap.
    """
    change = np.empty(g.size, dtype=bool)
    change[0] = True
    np.not_equal(g[1:], g[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=g.size)
    return g[starts], p[starts], lengths


def _concat_ids(parts: list, name: str) -> np.ndarray:
    """Concatenate id arrays; int64 and uint64 blocks meet as uint64 (never float64)."""
    if len(parts) == 1:
        return parts[0]
    if len({a.dtype for a in parts}) > 1:
        if any(a.dtype == np.int64 and a.size and a.min() < 0 for a in parts):
            raise UserError(f"{name} blocks mix negative int64 ids with uint64 ids")
        parts = [a.astype(np.uint64) for a in parts]
    return np.concatenate(parts)


class ContingencyTable:
    """Sparse joint counts ``n_ij`` of (gt id i, pred id j), accumulated block by block.

    ``add(pred_block, gt_block)`` may be called any number of times with co-registered blocks of
    any shape (2D slices, 3D slabs); the result equals the table of the concatenated volume.
    Memory is O(number of distinct (gt, pred) pairs), not O(voxels).

    Attributes after :meth:`compact` (or via the properties): ``gt_ids``, ``pred_ids``, ``counts``,
    sorted by (gt, pred).
    """

    def __init__(self):
        self._g: list[np.ndarray] = []
        self._p: list[np.ndarray] = []
        self._w: list[np.ndarray] = []
        self._pending = 0
        self.num_voxels = 0

    # -- building ------------------------------------------------------------------------------
    def add(self, pred, gt) -> ContingencyTable:
        """Count the voxels of one co-registered block pair; returns self for chaining."""
        pred = check_label_array(pred, "pred")
        gt = check_label_array(gt, "gt")
        if pred.shape != gt.shape:
            raise UserError(f"pred shape {pred.shape} != gt shape {gt.shape}")
        if pred.size == 0:
            return self
        # Slabs along the first axis keep ravel() a view for C-contiguous inputs.
        rows = max(1, _CHUNK // max(1, pred[0].size)) if pred.ndim > 1 else _CHUNK
        for s in range(0, pred.shape[0], rows):
            g = gt[s : s + rows].ravel()
            p = pred[s : s + rows].ravel()
            gr, pr, w = _runs(g, p)
            gr, pr, w = _pair_reduce(_as_id_dtype(gr), _as_id_dtype(pr), w)
            self._g.append(gr)
            self._p.append(pr)
            self._w.append(w)
            self._pending += w.size
            self.num_voxels += g.size
            if self._pending > _COMPACT_AT:
                self.compact()
        return self

    def merge(self, other: ContingencyTable) -> ContingencyTable:
        """Add the counts of another table (e.g. one built by a different worker)."""
        other.compact()
        self._g.append(other.gt_ids)
        self._p.append(other.pred_ids)
        self._w.append(other.counts)
        self._pending += other.counts.size
        self.num_voxels += other.num_voxels
        return self

    def compact(self) -> ContingencyTable:
        """Merge all pending blocks into one sorted (gt, pred, count) list."""
        if len(self._g) == 1 and self._pending == 0:
            return self
        if not self._g:
            empty = np.zeros(0, np.int64)
            self._g, self._p, self._w = [empty], [empty], [empty]
        else:
            g, p = _concat_ids(self._g, "gt"), _concat_ids(self._p, "pred")
            w = np.concatenate(self._w) if len(self._w) > 1 else self._w[0]
            g, p, w = _pair_reduce(g, p, w)
            self._g, self._p, self._w = [g], [p], [w]
        self._pending = 0
        return self

    @classmethod
    def from_arrays(cls, pred, gt) -> ContingencyTable:
        """Table of a whole pair of label arrays."""
        return cls().add(pred, gt).compact()

    @property
    def gt_ids(self) -> np.ndarray:
        return self.compact()._g[0]

    @property
    def pred_ids(self) -> np.ndarray:
        return self.compact()._p[0]

    @property
    def counts(self) -> np.ndarray:
        return self.compact()._w[0]

    # -- selecting -----------------------------------------------------------------------------
    def restricted(self, ignore_gt: Iterable[int] = (0,), ignore_pred: Iterable[int] = ()):
        """(gt_ids, pred_ids, counts) without entries whose gt or pred id is ignored."""
        g, p, w = self.gt_ids, self.pred_ids, self.counts
        keep = np.ones(w.size, dtype=bool)
        ignore_gt, ignore_pred = list(ignore_gt or ()), list(ignore_pred or ())
        for ids, ignore in ((g, ignore_gt), (p, ignore_pred)):
            if ignore:
                keep &= ~np.isin(ids, _representable(ignore, ids.dtype))
        return g[keep], p[keep], w[keep]

    def scores(self, ignore_gt: Iterable[int] = (0,), ignore_pred: Iterable[int] = ()) -> dict:
        """All region scores of this table; see :func:`region_scores`."""
        g, p, n = self.restricted(ignore_gt, ignore_pred)
        return _scores_from_counts(g, p, n)


def _representable(ids: list, dtype) -> np.ndarray:
    """The ignored ids that `dtype` can hold (an id it cannot hold, e.g. -1 for uint64 labels,
    occurs nowhere and is dropped)."""
    info = np.iinfo(dtype)
    return np.asarray([int(i) for i in ids if info.min <= int(i) <= info.max], dtype=dtype)


def _xlogx_sum(x: np.ndarray) -> float:
    """sum x log2 x with 0 log 0 = 0."""
    x = x[x > 0].astype(np.float64)
    return float(np.dot(x, np.log2(x)))


_EPS_BITS = 1e-12  # entropies (bits) this close to 0 are 0: float rounding of log2 N - ...


def _ratio(num: float, den: float) -> float:
    """num / den, with 0/0 = 1 (a score that nothing can spoil is perfect)."""
    if den == 0:
        return 1.0 if num == 0 else float("nan")
    return num / den


def _bits(h: float) -> float:
    """An entropy in bits with the rounding of its difference form removed: >= 0, and exactly 0
    within `_EPS_BITS` (so a one-segment side gives 0/0 = 1 in Vinfo rather than 0/1e-16)."""
    return 0.0 if h < _EPS_BITS else h


def _scores_from_counts(g: np.ndarray, p: np.ndarray, n: np.ndarray) -> dict:
    _, a = _unique_sum(g, n)
    _, b = _unique_sum(p, n)
    nf, af, bf = n.astype(np.float64), a.astype(np.float64), b.astype(np.float64)
    N = float(nf.sum())
    if N == 0:
        raise UserError("no voxels left to score after removing ignored labels")
    sum_n2, sum_a2, sum_b2 = float(nf @ nf), float(af @ af), float(bf @ bf)

    # Pair counts without self-pairs (x2), exactly as skimage.metrics.adapted_rand_error.
    pairs_both, pairs_gt, pairs_pred = sum_n2 - N, sum_a2 - N, sum_b2 - N
    are = 1.0 - _ratio(pairs_both, 0.5 * pairs_gt + 0.5 * pairs_pred)
    disagree = pairs_gt + pairs_pred - 2.0 * pairs_both
    rand_index = 1.0 - disagree / (N * (N - 1.0)) if N > 1 else 1.0

    # Entropies in bits from counts: H = log2 N - sum c log2 c / N.
    xl_n, xl_a, xl_b = _xlogx_sum(n), _xlogx_sum(a), _xlogx_sum(b)
    log_n = math.log2(N)
    h_gt, h_pred = _bits(log_n - xl_a / N), _bits(log_n - xl_b / N)
    h_joint = _bits(log_n - xl_n / N)
    voi_split = _bits((xl_a - xl_n) / N)  # H(pred | gt)
    voi_merge = _bits((xl_b - xl_n) / N)  # H(gt | pred)
    mutual = _bits(h_gt + h_pred - h_joint)

    return {
        "num_voxels": int(N),
        "num_gt_segments": int(a.size),
        "num_pred_segments": int(b.size),
        "rand_index": rand_index,
        "adapted_rand_error": are,
        # Fraction of same-gt pairs kept together (low = false splits); skimage returns this
        # as its 2nd value, which it calls "precision".
        "rand_recall": _ratio(pairs_both, pairs_gt),
        # Fraction of same-pred pairs that are truly together (low = false merges); skimage's
        # 3rd value ("recall").
        "rand_precision": _ratio(pairs_both, pairs_pred),
        "vrand": _ratio(2.0 * sum_n2, sum_a2 + sum_b2),
        "vrand_split": sum_n2 / sum_a2,
        "vrand_merge": sum_n2 / sum_b2,
        "voi_split": voi_split,
        "voi_merge": voi_merge,
        "voi": voi_split + voi_merge,
        "vinfo": _ratio(2.0 * mutual, h_gt + h_pred),
        "vinfo_split": _ratio(mutual, h_pred),
        "vinfo_merge": _ratio(mutual, h_gt),
        "cremi_score": math.sqrt((voi_split + voi_merge) * max(are, 0.0)),
    }


def region_scores(pred, gt, ignore_gt: Iterable[int] = (0,), ignore_pred: Iterable[int] = ()):
    """Region-agreement scores of two label volumes (2D or 3D, any integer dtype).

    One :class:`ContingencyTable` ``n_ij`` (gt i, pred j) over the voxels whose gt id is not in
    ``ignore_gt`` and pred id not in ``ignore_pred``; ``N``, ``a_i``, ``b_j`` as in the module
    docstring. Returned keys:

    * ``rand_index``: (agreeing voxel pairs) / C(N, 2) = 1 - (A + B - 2P) / (N (N - 1)) with
      P = sum n_ij^2 - N, A = sum a_i^2 - N, B = sum b_j^2 - N (Rand 1971).
    * ``adapted_rand_error``: 1 - P / (A/2 + B/2), exactly skimage.metrics.adapted_rand_error
      with alpha = 0.5 (Arganda-Carreras et al. 2015, SNEMI3D); ``rand_recall`` = P / A,
      ``rand_precision`` = P / B. The default ``ignore_gt=(0,)`` is skimage's default
      ``ignore_labels=(0,)``: voxels with gt == 0 are not counted.
    * ``vrand`` (and ``_split``/``_merge``): the ISBI 2012 Rand F-score
      sum p_ij^2 / (0.5 sum t_i^2 + 0.5 sum s_j^2), split = sum p^2 / sum t^2 (gt marginal t),
      merge = sum p^2 / sum s^2 (pred marginal s), p = n / N (Arganda-Carreras et al. 2015,
      eqs. 3-5). "Foreground-restricted" = ``ignore_gt=(0,)`` with gt 0 the boundary; the
      challenge also thinned predicted boundaries first, see :func:`thin_boundaries`.
    * ``voi_split`` = H(pred | gt) (false splits), ``voi_merge`` = H(gt | pred) (false merges),
      ``voi`` their sum, in bits (Meila 2007). This is the order returned by
      ``skimage.metrics.variation_of_information(gt, pred)`` = [H(pred|gt), H(gt|pred)]; swapping
      pred and gt swaps split and merge.
    * ``vinfo`` = 2 I / (H(gt) + H(pred)), ``vinfo_split`` = I / H(pred),
      ``vinfo_merge`` = I / H(gt), I the mutual information (Arganda-Carreras et al. 2015,
      eqs. 6-8).
    * ``cremi_score`` = sqrt(voi * adapted_rand_error) (CREMI challenge, cremi.org), both terms on
      the same ignored-voxel convention.

    Scores whose denominator vanishes (e.g. a single segment, nothing to split) are 1 (perfect).
    """
    return ContingencyTable.from_arrays(pred, gt).scores(ignore_gt, ignore_pred)


def adapted_rand_error(pred, gt, ignore_gt: Iterable[int] = (0,)) -> tuple[float, float, float]:
    """(error, rand_recall, rand_precision), the same triple as
    ``skimage.metrics.adapted_rand_error(gt, pred)`` returns (are, "prec", "rec").

    ARE = 1 - P / (A/2 + B/2), P = sum n_ij^2 - N, A = sum a_i^2 - N, B = sum b_j^2 - N (see
    :func:`region_scores`). Reference: Arganda-Carreras et al. (2015) Front. Neuroanat. 9:142.
    """
    s = region_scores(pred, gt, ignore_gt=ignore_gt)
    return s["adapted_rand_error"], s["rand_recall"], s["rand_precision"]


def variation_of_information(pred, gt, ignore_gt: Iterable[int] = ()) -> tuple[float, float]:
    """(split, merge) = (H(pred | gt), H(gt | pred)) in bits (Meila 2007, JMVA 98:873).

    Equals ``skimage.metrics.variation_of_information(gt, pred, ignore_labels=ignore_gt)``, whose
    default is to ignore nothing (unlike the adapted Rand error).
    """
    s = region_scores(pred, gt, ignore_gt=ignore_gt)
    return s["voi_split"], s["voi_merge"]


def rand_index(pred, gt, ignore_gt: Iterable[int] = ()) -> float:
    """Rand (1971) index: fraction of voxel pairs on which pred and gt agree (same/different)."""
    return region_scores(pred, gt, ignore_gt=ignore_gt)["rand_index"]


def thin_boundaries(pred, mask=None) -> np.ndarray:
    """Grow non-zero segments of ``pred`` into its 0 (boundary) voxels until none is in ``mask``.

    The ISBI 2012 protocol (Arganda-Carreras et al. 2015, "after border thinning") dilates the
    predicted segments over the boundary before scoring on the gt foreground; each pass gives a
    boundary voxel the largest id in its 3x3(x3) neighbourhood. Stops when no boundary voxel
    inside ``mask`` (default: everywhere) remains or no progress is possible.
    """
    from scipy import ndimage

    out = np.array(check_label_array(pred, "pred"), copy=True)
    mask = np.ones(out.shape, bool) if mask is None else np.asarray(mask, bool)
    while True:
        todo = (out == 0) & mask
        if not todo.any():
            return out
        grown = ndimage.maximum_filter(out, size=3)
        zeros = out == 0
        if not (grown[zeros] != 0).any():
            return out
        out[zeros] = grown[zeros]
