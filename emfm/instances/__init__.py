"""Instance segmentation from network predictions: watershed, 2D-then-3D linking, region adjacency
graph with agglomeration and multicut (GAEC), mutex watershed, and blockwise processing of large
volumes with stitching (`emfm instances`)."""

from emfm.instances.affinities import (  # noqa: F401
    DEFAULT_OFFSETS,
    affinities_from_labels,
    affinity_mask,
    boundaries_from_affinities,
    boundaries_from_labels,
)
from emfm.instances.blockwise import BlockwiseJob, instances  # noqa: F401
from emfm.instances.graph import (  # noqa: F401
    Rag,
    agglomerate,
    gaec,
    multicut_costs,
    rag_from_affinities,
    rag_from_boundaries,
)
from emfm.instances.link2d import link_sections, overlap_links, segment_2d_then_3d  # noqa: F401
from emfm.instances.mws import mutex_watershed  # noqa: F401
from emfm.instances.segment import METHODS, SegmentParams, segment  # noqa: F401
