"""Graph post-processing on cases solved by hand: affinities, RAG, agglomeration, GAEC, mutex
watershed."""

import itertools

import numpy as np
import pytest

from emfm.instances import graph
from emfm.instances.affinities import (
    affinities_from_labels,
    affinity_mask,
    boundaries_from_affinities,
    boundaries_from_labels,
)
from emfm.instances.mws import mutex_watershed


def _partition(labels) -> set:
    """A labelling as a set of frozensets of node indices (ids themselves do not matter)."""
    labels = np.asarray(labels).ravel()
    return {frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels)}


def _brute_force_multicut(n, edges, costs):
    best, arg = np.inf, None
    for lab in itertools.product(range(n), repeat=n):
        if lab[0] != 0:
            continue
        obj = graph.multicut_objective(edges, costs, np.asarray(lab))
        if obj < best - 1e-12:
            best, arg = obj, lab
    return best, arg


def test_affinities_from_labels_by_hand():
    lab = np.array([[[1, 1, 2, 0]]])  # z=1, y=1, x=4
    a = affinities_from_labels(lab, [[0, 0, -1], [0, 0, -2]])
    # channel 0: v=(x) vs x-1: x=1 (1,1) same, x=2 (2,1) no, x=3 (0,2) no; x=0 outside
    np.testing.assert_array_equal(a[0, 0, 0], [0, 1, 0, 0])
    np.testing.assert_array_equal(a[1, 0, 0], [0, 0, 0, 0])  # (2,1) differ, (0,1) background
    np.testing.assert_array_equal(affinity_mask(lab.shape, [[0, 0, -2]])[0, 0, 0], [0, 0, 1, 1])
    # boundary: both voxels of the 1|2 face, the background voxel, and its neighbour
    np.testing.assert_array_equal(boundaries_from_labels(lab)[0, 0], [0, 1, 1, 1])
    nn = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    np.testing.assert_array_equal(
        boundaries_from_affinities(affinities_from_labels(lab, nn), nn)[0, 0], [0, 1, 1, 1]
    )
    with pytest.raises(ValueError, match="offset"):
        affinities_from_labels(lab, [[0, 0]])


def test_rag_from_boundaries_by_hand():
    frag = np.array([[[1, 1, 2, 2], [1, 1, 3, 3]]])  # z=1, y=2, x=4
    b = np.array([[[0.0, 0.2, 0.4, 0.0], [0.0, 0.6, 0.8, 0.0]]])
    rag = graph.rag_from_boundaries(frag, b)
    np.testing.assert_array_equal(rag.edges, [[1, 2], [1, 3], [2, 3]])
    np.testing.assert_array_equal(rag.size, [1, 1, 2])
    np.testing.assert_allclose(
        rag.prob, [(0.2 + 0.4) / 2, (0.6 + 0.8) / 2, ((0.4 + 0.8) / 2 + 0.0) / 2]
    )
    affs = np.ones((3, *frag.shape), np.float32)
    affs[2, 0, 0, 2] = 0.25  # x-face between voxels (0, 1) of fragment 1 and (0, 2) of fragment 2
    rag = graph.rag_from_affinities(frag, affs, [[-1, 0, 0], [0, -1, 0], [0, 0, -1]])
    np.testing.assert_allclose(rag.prob, [0.75, 0.0, 0.0])


def test_agglomeration_updates_means_when_regions_merge():
    edges = np.array([[1, 2], [1, 3], [2, 3]])
    # merge 1-2 first (0.1); then {1,2}-3 pools 1 face at 0.6 and 3 faces at 0.2: mean 0.3 < 0.5 ->
    # one region
    rag = graph.Rag(4, edges, np.array([0.1, 0.6, 0.2]), np.array([1, 1, 3]))
    assert _partition(graph.agglomerate(rag, 0.5)[1:]) == {frozenset({0, 1, 2})}
    # with one face at 0.45 instead the pooled mean is (0.6 + 0.45) / 2 = 0.525 >= 0.5: 3 stays
    # apart
    rag = graph.Rag(4, edges, np.array([0.1, 0.6, 0.45]), np.array([1, 1, 1]))
    seg = graph.agglomerate(rag, 0.5)
    assert seg[0] == 0 and _partition(seg[1:]) == {frozenset({0, 1}), frozenset({2})}
    assert _partition(graph.agglomerate(rag, 0.05)[1:]) == {
        frozenset({0}),
        frozenset({1}),
        frozenset({2}),
    }


def test_gaec_square_with_diagonal_is_optimal():
    # square 0-1-2-3 with a diagonal 0-2: the optimum joins {0,1} and {2,3}, cutting -4, -4, +3 = -5
    edges = np.array([[0, 1], [1, 2], [2, 3], [0, 3], [0, 2]])
    costs = np.array([10.0, -4.0, 10.0, -4.0, 3.0])
    seg = graph.gaec(4, edges, costs)
    assert _partition(seg) == {frozenset({0, 1}), frozenset({2, 3})}
    assert graph.multicut_objective(edges, costs, seg) == pytest.approx(-5.0)
    assert _brute_force_multicut(4, edges, costs)[0] == pytest.approx(-5.0)


def test_gaec_respects_a_strong_repulsive_edge_that_thresholding_ignores():
    # 0-1 and 1-2 attract, 0-2 repels strongly: connected components of the attractive edges would
    # merge all three; the optimal multicut (-16) keeps 2 apart
    edges = np.array([[0, 1], [1, 2], [0, 2]])
    costs = np.array([5.0, 4.0, -20.0])
    seg = graph.gaec(3, edges, costs)
    assert _partition(seg) == {frozenset({0, 1}), frozenset({2})}
    best, _ = _brute_force_multicut(3, edges, costs)
    assert (
        graph.multicut_objective(edges, costs, seg) == pytest.approx(best) == pytest.approx(-16.0)
    )


def test_multicut_costs_sign_and_bias():
    c = graph.multicut_costs(np.array([0.1, 0.5, 0.9]))
    assert c[0] > 0 and c[1] == pytest.approx(0.0) and c[2] < 0
    assert (
        graph.multicut_costs(np.array([0.5]), beta=0.7)[0] < 0
    )  # a higher boundary bias cuts more
    with pytest.raises(ValueError, match="beta"):
        graph.multicut_costs(np.array([0.5]), beta=1.0)


def test_mutex_watershed_line_by_hand():
    # voxels a b c d along x; attractive a-b 0.9, b-c 0.6, c-d 0.9; repulsive (offset 2) a-c, b-d at
    # weight 1 - 0.1 = 0.9. Order: a-b joins, c-d joins, a-c and b-d add mutexes, b-c (0.6) is
    # forbidden by them: {a, b}, {c, d}, although thresholding b-c at 0.5 would have joined it.
    offsets = [[0, 0, -1], [0, 0, -2]]
    affs = np.zeros((2, 1, 1, 4))
    affs[0, 0, 0, 1:] = [0.9, 0.6, 0.9]
    affs[1, 0, 0, 2:] = [0.1, 0.1]
    lab = mutex_watershed(affs, offsets)
    assert _partition(lab) == {frozenset({0, 1}), frozenset({2, 3})}
    # with b-c at 0.95 it comes first and joins b, c; a-b and c-d then join too before the weaker
    # (1 - 0.2 = 0.8) mutexes: one object
    affs[0, 0, 0, 2] = 0.95
    affs[1, 0, 0, 2:] = [0.2, 0.2]
    assert _partition(mutex_watershed(affs, offsets)) == {frozenset({0, 1, 2, 3})}


def test_mutex_watershed_grid_by_hand():
    # a 2 x 2 section; voxels p00 p01 p10 p11. Edges in descending weight:
    # 0.95 mutex p00|p11 (long-range offset (0,-1,-1), affinity 0.05), 0.8 p10-p00 joins,
    # 0.75 p11-p10 is forbidden (p10 is now with p00), 0.7 p01-p00 joins, 0.65 p11-p01 forbidden:
    # {p00, p01, p10}, {p11}; without the mutex all four would join.
    offsets = [[0, -1, 0], [0, 0, -1], [0, -1, -1]]
    affs = np.zeros((3, 1, 2, 2))
    affs[0, 0, 1, :] = [0.8, 0.65]  # p10-p00, p11-p01
    affs[1, 0, :, 1] = [0.7, 0.75]  # p01-p00, p11-p10
    affs[2, 0, 1, 1] = 0.05
    assert _partition(mutex_watershed(affs, offsets)) == {frozenset({0, 1, 2}), frozenset({3})}
    affs[2, 0, 1, 1] = 1.0  # no repulsion
    assert _partition(mutex_watershed(affs, offsets)) == {frozenset({0, 1, 2, 3})}


def test_agglomeration_merges_edges_whose_mean_does_not_round_trip():
    # 0.2 * 3 / 3 != 0.2 in floating point: the initial heap entries must still be taken as current
    rag = graph.Rag(3, np.array([[1, 2]]), np.array([0.2]), np.array([3]))
    assert _partition(graph.agglomerate(rag, 0.5)[1:]) == {frozenset({0, 1})}
