"""Region adjacency graph over fragments, mean-affinity agglomeration and multicut (GAEC).

Nodes are fragment ids 1..N (0 = no fragment, left out). Two fragments are adjacent when they
share a face; an edge's weight is the mean boundary probability over the faces they share, from a
boundary map (mean of the two voxels' values) or from affinities (mean cut probability `1 - a`
of the nearest-neighbour affinities across the faces). Built with np.unique / bincount over all
face pairs at once. Agglomeration and GAEC then work on the (much smaller) graph.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from emfm.errors import UserError
from emfm.instances.affinities import check_offsets, is_nearest, offset_slices


@dataclass(frozen=True)
class Rag:
    """Edges `[e, 2]` (u < v, sorted), mean boundary probability per edge, face count per edge."""

    n_nodes: int  # node ids are 0..n_nodes-1; 0 is the unused background node
    edges: np.ndarray
    prob: np.ndarray
    size: np.ndarray


def _build(n_nodes: int, u: np.ndarray, v: np.ndarray, val: np.ndarray) -> Rag:
    keep = (u != v) & (u > 0) & (v > 0)
    u, v, val = u[keep], v[keep], val[keep]
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    key = lo.astype(np.uint64) * np.uint64(n_nodes) + hi.astype(np.uint64)
    uniq, inv = np.unique(key, return_inverse=True)
    size = np.bincount(inv, minlength=uniq.size)
    prob = np.bincount(inv, weights=val, minlength=uniq.size) / np.maximum(size, 1)
    edges = np.stack([uniq // np.uint64(n_nodes), uniq % np.uint64(n_nodes)], axis=1).astype(
        np.int64
    )
    return Rag(
        n_nodes=n_nodes, edges=edges, prob=prob.astype(np.float64), size=size.astype(np.int64)
    )


def _check(fragments: np.ndarray, other_shape, what: str) -> np.ndarray:
    fragments = np.asarray(fragments)
    if not np.issubdtype(fragments.dtype, np.integer):
        raise UserError(f"fragments must be an integer label array, got {fragments.dtype}")
    if tuple(other_shape) != fragments.shape:
        raise UserError(f"{what} shape {tuple(other_shape)} != fragments shape {fragments.shape}")
    return fragments.astype(np.int64)


def rag_from_boundaries(fragments: np.ndarray, boundary: np.ndarray) -> Rag:
    """RAG whose edge weight is the mean of `(b[p] + b[q]) / 2` over the faces (p, q) between two
    fragments."""
    frag = _check(fragments, np.shape(boundary), "boundary map")
    b = np.asarray(boundary, np.float64)
    us, vs, vals = [], [], []
    for d in range(frag.ndim):
        src, dst = offset_slices(frag.shape, tuple(1 if a == d else 0 for a in range(frag.ndim)))
        us.append(frag[src].ravel())
        vs.append(frag[dst].ravel())
        vals.append(((b[src] + b[dst]) / 2).ravel())
    return _build(int(frag.max()) + 1, np.concatenate(us), np.concatenate(vs), np.concatenate(vals))


def rag_from_affinities(fragments: np.ndarray, affs: np.ndarray, offsets) -> Rag:
    """RAG whose edge weight is the mean cut probability `1 - a` of the nearest-neighbour
    affinities across the faces between two fragments (`affs` channel-first, see affinities.py)."""
    affs = np.asarray(affs)
    frag = _check(fragments, affs.shape[1:], "affinity volume (without channels)")
    offsets = check_offsets(offsets, frag.ndim)
    if len(offsets) != affs.shape[0]:
        raise UserError(
            f"affinity volume has {affs.shape[0]} channels but {len(offsets)} offsets are given"
        )
    us, vs, vals = [], [], []
    for c, o in enumerate(offsets):
        if not is_nearest(o):
            continue
        src, dst = offset_slices(frag.shape, o)
        us.append(frag[src].ravel())
        vs.append(frag[dst].ravel())
        vals.append(1.0 - affs[c][src].astype(np.float64).ravel())
    if not us:
        raise UserError(
            f"offsets {offsets.tolist()} hold no nearest-neighbour offset for the graph"
        )
    return _build(int(frag.max()) + 1, np.concatenate(us), np.concatenate(vs), np.concatenate(vals))


def _roots(parent: np.ndarray) -> np.ndarray:
    """Resolve a parent array (parent[i] <= ... chains) to roots, vectorised."""
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent
        parent = nxt


def agglomerate(rag: Rag, threshold: float = 0.5) -> np.ndarray:
    """Hierarchical agglomeration by mean boundary probability (= 1 - mean affinity): repeatedly
    merge the two adjacent regions whose shared faces have the lowest mean boundary probability,
    while it is below `threshold`; the merged region's edges pool the faces of both (sums and
    counts add, so means stay exact). Returns `node -> segment` (length n_nodes, 0 -> 0)."""
    n = rag.n_nodes
    parent = np.arange(n)
    adj: list[dict] = [dict() for _ in range(n)]
    heap = []
    for (u, v), p, s in zip(rag.edges.tolist(), rag.prob.tolist(), rag.size.tolist()):
        e = adj[u][v] = adj[v][u] = [p * s, s]
        # the mean exactly as recomputed when checking for staleness
        heap.append((e[0] / e[1], u, v))
    heapq.heapify(heap)
    while heap:
        p, u, v = heapq.heappop(heap)
        if p >= threshold:
            break
        e = adj[u].get(v)
        if parent[u] != u or parent[v] != v or e is None or e[0] / e[1] != p:
            continue  # stale entry: a region merged or the edge was updated since it was pushed
        if len(adj[u]) < len(adj[v]):
            u, v = v, u  # merge the smaller neighbourhood into the larger
        parent[v] = u
        del adj[u][v]
        for w, (sw, cw) in adj[v].items():
            if w == u:
                continue
            del adj[w][v]
            e = adj[u].get(w)
            if e is None:
                e = adj[u][w] = adj[w][u] = [0.0, 0]
            e[0] += sw
            e[1] += cw
            heapq.heappush(heap, (e[0] / e[1], min(u, w), max(u, w)))
        adj[v] = {}
    return _consecutive(_roots(parent))


def multicut_costs(
    prob: np.ndarray, size: np.ndarray | None = None, *, beta: float = 0.5, eps: float = 1e-4
) -> np.ndarray:
    """Edge costs from boundary probabilities: `log((1-p)/p) + log((1-beta)/beta)`, positive =
    attractive (join), negative = repulsive (cut). `beta` is the boundary bias: above 0.5 cuts more.
    With `size`, costs are weighted by the face count relative to the largest edge."""
    if not 0.0 < beta < 1.0:
        raise UserError(f"multicut beta={beta}: must be in (0, 1)")
    p = np.clip(np.asarray(prob, np.float64), eps, 1 - eps)
    cost = np.log((1 - p) / p) + np.log((1 - beta) / beta)
    if size is not None and len(size):
        cost = cost * (np.asarray(size, np.float64) / np.max(size))
    return cost


def gaec(n_nodes: int, edges: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Greedy additive edge contraction (Keuper et al. 2015) for the multicut problem
    min sum_{cut edges} cost: contract the edge of largest positive cost, adding the costs of
    parallel edges, until no positive edge is left. Returns `node -> segment` (consecutive)."""
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    costs = np.asarray(costs, np.float64)
    if len(edges) != len(costs):
        raise UserError(f"{len(edges)} edges but {len(costs)} costs")
    parent = np.arange(n_nodes)
    adj: list[dict] = [dict() for _ in range(n_nodes)]
    for (u, v), c in zip(edges.tolist(), costs.tolist()):
        if u != v:
            adj[u][v] = adj[v][u] = adj[u].get(v, 0.0) + c
    heap = [(-c, u, v) for u in range(n_nodes) for v, c in adj[u].items() if u < v and c > 0]
    heapq.heapify(heap)
    while heap:
        negc, u, v = heapq.heappop(heap)
        if parent[u] != u or parent[v] != v or adj[u].get(v) != -negc:
            continue  # stale
        if len(adj[u]) < len(adj[v]):
            u, v = v, u
        parent[v] = u
        del adj[u][v]
        for w, cw in adj[v].items():
            if w == u:
                continue
            del adj[w][v]
            c = adj[u].get(w, 0.0) + cw
            adj[u][w] = adj[w][u] = c
            if c > 0:
                heapq.heappush(heap, (-c, min(u, w), max(u, w)))
        adj[v] = {}
    return _consecutive(_roots(parent))


def multicut_objective(edges: np.ndarray, costs: np.ndarray, node_labels: np.ndarray) -> float:
    """Sum of the costs of the edges whose ends lie in different segments (what GAEC minimises)."""
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    cut = node_labels[edges[:, 0]] != node_labels[edges[:, 1]]
    return float(np.asarray(costs, np.float64)[cut].sum())


def _consecutive(roots: np.ndarray) -> np.ndarray:
    """Root ids to segment ids 0..K-1 in order of root id."""
    # node 0 has no edges in a fragment graph, so it is its own root, the smallest: segment 0
    return np.unique(roots, return_inverse=True)[1].astype(np.uint64)


def apply_to_fragments(fragments: np.ndarray, node_labels: np.ndarray) -> np.ndarray:
    """The segmentation: each fragment voxel gets its node's segment id."""
    return np.asarray(node_labels, np.uint64)[np.asarray(fragments, np.int64)]
