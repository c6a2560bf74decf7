"""Evaluation metrics for EM segmentation (issue 7): the public entry point.

Region agreement (Rand, adapted Rand, VOI, ISBI V^Rand/V^Info, CREMI) lives in
:mod:`emfm.eval.metrics_region` and is re-exported here.
"""

from emfm.eval.metrics_region import (  # noqa: F401
    ContingencyTable,
    adapted_rand_error,
    rand_index,
    region_scores,
    thin_boundaries,
    variation_of_information,
)
