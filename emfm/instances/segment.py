"""One entry point for every instance method, on a boundary map or on affinities in memory.

`data` is a boundary probability map `[z, y, x]` (1 = boundary), or channel-first affinities
`[c, z, y, x]` with their `offsets` (see affinities.py). Methods:

* `watershed`: seeds = connected confident interior (boundary < threshold), grown by watershed;
* `link2d`: watershed (or fragment agglomeration, `link_2d`) per section, then 2D segments linked
  across sections by overlap (one-to-one unless `link_mutual_best=False`);
* `agglomeration`: distance-transform watershed fragments, region adjacency graph, merge while
  the mean boundary probability (1 - mean affinity) is below `agglomeration_threshold`;
* `multicut`: the same fragments and graph, costs log((1-p)/p) + log((1-beta)/beta), solved by GAEC;
* `mws`: mutex watershed on the affinities (needs affinities with long-range offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emfm.errors import UserError
from emfm.instances import graph
from emfm.instances.affinities import DEFAULT_OFFSETS, boundaries_from_affinities, check_offsets
from emfm.instances.link2d import CRITERIA, METHODS_2D, segment_2d_then_3d
from emfm.instances.mws import mutex_watershed
from emfm.instances.watershed import fragments, watershed_segmentation

METHODS = ("watershed", "link2d", "agglomeration", "multicut", "mws")
# the values of SegmentParams' string parameters (typed choices in emfm.config.instances, which a
# config is checked against as it is composed; here for the library's callers and tuning grids)
CHOICES = {"method": METHODS, "link_criterion": CRITERIA, "link_2d": METHODS_2D}


@dataclass(frozen=True)
class SegmentParams:
    method: str = "watershed"
    offsets: tuple = DEFAULT_OFFSETS  # of affinity inputs (unused for boundary maps)
    threshold: float = 0.5  # boundary level separating interior (seeds, fragments) from boundary
    min_seed: int = 16  # voxels; smaller interior regions seed nothing (watershed, link2d)
    sigma: float = 2.0  # smoothing of the distance transform for fragment seeds
    two_d: bool | None = False  # fragments per section (anisotropic data); None = as False
    fragment_min_size: int = 0
    agglomeration_threshold: float = 0.5
    beta: float = 0.5
    size_weighted: bool = True  # multicut costs weighted by the shared face area
    link_threshold: float = 0.5
    link_criterion: str = "fraction"
    link_2d: str = "watershed"  # the per-section step of link2d: watershed | agglomeration
    link_on_interior: bool = True  # link2d counts overlaps on confident interior only
    link_mutual_best: bool = True  # link2d links one-to-one (False: any pair over link_threshold)
    link_min_overlap: int = 1  # voxels; link2d ignores smaller overlaps
    repulsive_stride: int = 1
    # boundary maps of objects on a background (organelles: boundary = 1 - p(object)): voxels whose
    # boundary value exceeds this are background, label 0; 1.0 = none (cells fill the volume)
    background: float | None = 1.0

    def check(self) -> SegmentParams:
        for k, allowed in CHOICES.items():
            if getattr(self, k) not in allowed:
                raise UserError(f"{k}={getattr(self, k)!r}: choose one of {', '.join(allowed)}")
        for k in ("threshold", "agglomeration_threshold", "link_threshold", "background"):
            if getattr(self, k) is not None and not 0.0 <= getattr(self, k) <= 1.0:
                raise UserError(f"{k}={getattr(self, k)}: must lie in [0, 1]")
        if not 0.0 < self.beta < 1.0:
            raise UserError(f"beta={self.beta}: must lie in (0, 1)")
        if self.link_min_overlap < 1:
            raise UserError(f"link_min_overlap={self.link_min_overlap}: must be >= 1")
        if self.repulsive_stride < 1:
            raise UserError(f"repulsive_stride={self.repulsive_stride}: must be >= 1")
        return self


def segment(data: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Instance labels (uint64, 0 = none) of a boundary map or an affinity volume; with
    `params.background` < 1, voxels of a boundary map above it are background (0)."""
    labels = _segment(data, params)
    if params.background is not None and params.background < 1.0 and np.ndim(data) == 3:
        labels[np.asarray(data) > params.background] = 0
    return labels


def _segment(data: np.ndarray, params: SegmentParams) -> np.ndarray:
    params.check()
    data = np.asarray(data)
    boundary = _boundary(data, params)
    affinities = data.ndim == 4
    m = params.method
    if m == "mws":
        if not affinities:
            raise UserError(
                "method=mws needs affinities (z, y, x, c with long-range offsets), got a boundary "
                "map"
            )
        return mutex_watershed(data, params.offsets, repulsive_stride=params.repulsive_stride)
    if m == "watershed":
        return watershed_segmentation(
            boundary, threshold=params.threshold, min_seed=params.min_seed, two_d=params.two_d
        )
    if m == "link2d":
        return segment_2d_then_3d(
            boundary,
            threshold=params.threshold,
            min_seed=params.min_seed,
            link_threshold=params.link_threshold,
            criterion=params.link_criterion,
            method_2d=params.link_2d,
            sigma=params.sigma,
            agglomeration_threshold=params.agglomeration_threshold,
            link_on_interior=params.link_on_interior,
            mutual_best=params.link_mutual_best,
            min_overlap=params.link_min_overlap,
        )
    return _graph_segmentation(data, boundary, params)


def _boundary(data: np.ndarray, params: SegmentParams) -> np.ndarray:
    """The boundary map of a boundary map (z, y, x) or of affinities (c, z, y, x)."""
    if data.ndim not in (3, 4):
        raise UserError(
            f"instance input has shape {data.shape}: give a boundary map (z, y, x) "
            "or affinities (c, z, y, x)"
        )
    if data.ndim == 3:
        return data.astype(np.float32)
    offsets = check_offsets(params.offsets, 3)
    if len(offsets) != data.shape[0]:
        raise UserError(
            f"affinity input has {data.shape[0]} channels but {len(offsets)} offsets are configured"
        )
    return boundaries_from_affinities(data, offsets)


def _graph_segmentation(data: np.ndarray, boundary: np.ndarray, params: SegmentParams):
    """Fragments merged on their region adjacency graph: by agglomeration or by multicut."""
    frag = fragments(
        boundary,
        threshold=params.threshold,
        sigma=params.sigma,
        two_d=params.two_d,
        min_size=params.fragment_min_size,
    )
    rag = (
        graph.rag_from_affinities(frag, data, params.offsets)
        if data.ndim == 4
        else graph.rag_from_boundaries(frag, boundary)
    )
    if params.method == "agglomeration":
        nodes = graph.agglomerate(rag, params.agglomeration_threshold)
    else:
        costs = graph.multicut_costs(
            rag.prob, rag.size if params.size_weighted else None, beta=params.beta
        )
        nodes = graph.gaec(rag.n_nodes, rag.edges, costs)
    return graph.apply_to_fragments(frag, nodes)
