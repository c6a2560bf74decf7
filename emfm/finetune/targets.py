"""Training targets from label patches (numpy / scipy), and the channel layout of each task.

Label batches are `[b, z, y, x]` as the loader gives them; 2D models see each section on its own
(`ndim=2`: neighbourhoods, components and centres are per section). Targets:
  semantic: class ids (`-1` = ignore).
  boundary: 2 classes (0 interior, 1 boundary: background, or a voxel with another id in its
      3x3(x3) neighbourhood) and, with `distance`, the Euclidean distance to the nearest boundary
      normalised per instance to [0, 1].
  affinity: per offset o, 1 where label(v) == label(v + o) != 0 (Lee et al. 2017 convention with
      negative offsets = "to the previous voxel"); masked where v + o leaves the patch or either
      voxel is ignored.
  center: foreground classes, a heatmap of unit Gaussians at instance centres of mass, and
      the offset from each foreground voxel to its instance centre (Panoptic-DeepLab, Cheng et al.
      2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Layout:
    """Output channels of a task: `classes` softmax channels first, then `sigmoid` channels
    (affinities), then `regress` channels (distance; heatmap + offsets)."""

    classes: int
    sigmoid: int = 0
    regress: int = 0

    @property
    def channels(self) -> int:
        return self.classes + self.sigmoid + self.regress


def layout(task, ndim: int) -> Layout:
    if task.kind == "semantic":
        return Layout(task.num_classes)
    if task.kind == "boundary":
        return Layout(2, 0, int(task.distance))
    if task.kind == "affinity":
        return Layout(0, len(task.offsets))
    return Layout(2, 0, 1 + ndim)  # center: fg/bg, heatmap, offsets


def channel_names(task, ndim: int) -> list[str]:
    if task.kind == "semantic":
        return [f"class_{i}" for i in range(task.num_classes)]
    if task.kind == "boundary":
        return ["interior", "boundary"] + (["distance"] if task.distance else [])
    if task.kind == "affinity":
        return [f"affinity_{'_'.join(str(v) for v in o)}" for o in task.offsets]
    return ["background", "foreground", "center_heatmap"] + [
        f"offset_{a}" for a in "zyx"[3 - ndim :]
    ]


def to_classes(raw: np.ndarray, task) -> np.ndarray:
    """Class ids (int32) from raw label values; unknown values and `ignore_label` become -1."""
    if task.class_values:
        out = np.full(raw.shape, -1, np.int32)
        for c, v in enumerate(task.class_values):
            out[raw == v] = c
    else:
        out = raw.astype(np.int32)
        out[(out < 0) | (out >= task.num_classes)] = -1
    if task.ignore_label >= 0:
        out[raw == task.ignore_label] = -1
    return out


def _sections(a: np.ndarray, ndim: int) -> np.ndarray:
    """`[b, z, y, x]` -> the units targets are computed on: `[b*z, y, x]` (2D) or `[b, z, y, x]`
    (3D)."""
    return a.reshape(-1, *a.shape[2:]) if ndim == 2 else a


def instances(raw: np.ndarray, task, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (0 = background) and the ignore mask, shape of `raw`. Class labels give the
    connected components of `instance_class` (per section for 2D models)."""
    ignore = raw == task.ignore_label if task.ignore_label >= 0 else np.zeros(raw.shape, bool)
    if task.label_type == "instances":
        lab = raw.astype(np.int64)
        lab[ignore] = 0
        return lab, ignore
    cls = to_classes(raw, task)
    ignore = ignore | (cls < 0)
    units = _sections(cls == task.instance_class, ndim)
    lab = np.zeros(units.shape, np.int64)
    offset = 0
    for i, u in enumerate(units):  # ndimage.label has no batch axis
        li, n = ndimage.label(u)
        lab[i] = np.where(li > 0, li + offset, 0)
        offset += n
    return lab.reshape(raw.shape), ignore


def boundaries(lab: np.ndarray, ndim: int, *, background_is_boundary: bool = True) -> np.ndarray:
    """True where a voxel is background or has another id in its 3^ndim neighbourhood."""
    size = (1, 1, 3, 3) if ndim == 2 else (1, 3, 3, 3)
    diff = ndimage.maximum_filter(lab, size=size, mode="nearest") != ndimage.minimum_filter(
        lab, size=size, mode="nearest"
    )
    return diff | (lab == 0) if background_is_boundary else diff & (lab != 0)


def distance(lab: np.ndarray, boundary: np.ndarray, ndim: int) -> np.ndarray:
    """Distance to the nearest boundary voxel, divided by its instance's maximum (0 on
    boundaries)."""
    out = np.zeros(lab.shape, np.float32)
    inside = _sections(~boundary, ndim)
    ids = _sections(lab, ndim)
    res = out.reshape(inside.shape)
    for i in range(len(inside)):
        d = ndimage.distance_transform_edt(inside[i]).astype(np.float32)
        n = int(ids[i].max())
        if n:
            mx = np.zeros(n + 1, np.float32)
            mx[1:] = ndimage.maximum(d, ids[i], index=np.arange(1, n + 1))
            d = d / np.maximum(mx[ids[i]], 1.0)
        res[i] = d * (ids[i] > 0)
    return out


def affinities(
    lab: np.ndarray, ignore: np.ndarray, offsets, ndim: int
) -> tuple[np.ndarray, np.ndarray]:
    """`[b, z, y, x, k]` affinities and validity masks for offsets `[dz, dy, dx]`."""
    k = len(offsets)
    aff = np.zeros(lab.shape + (k,), np.float32)
    mask = np.zeros(lab.shape + (k,), np.float32)
    for c, off in enumerate(offsets):
        src, dst = [slice(None)], [slice(None)]
        for o, n in zip(off, lab.shape[1:]):
            if abs(o) >= n:
                src = None
                break
            src.append(slice(max(0, -o), n - max(0, o)))  # v
            dst.append(slice(max(0, o), n - max(0, -o)))  # v + o
        if src is None:
            continue
        a, b = lab[tuple(src)], lab[tuple(dst)]
        aff[tuple(src) + (c,)] = (a == b) & (a != 0)
        mask[tuple(src) + (c,)] = ~(ignore[tuple(src)] | ignore[tuple(dst)])
    return aff, mask


def centers(lab: np.ndarray, ndim: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre heatmap `[b, z, y, x]` (unit-peak Gaussians at instance centres of mass) and offsets
    `[b, z, y, x, ndim]` (centre minus voxel, in voxels; 0 on background)."""
    units = _sections(lab, ndim)
    heat = np.zeros(units.shape, np.float32)
    off = np.zeros(units.shape + (units.ndim - 1,), np.float32)
    coords = np.stack(
        np.meshgrid(*[np.arange(n, dtype=np.float32) for n in units.shape[1:]], indexing="ij"), -1
    )
    for i, u in enumerate(units):
        ids = np.unique(u[u > 0])
        if not len(ids):
            continue
        com = np.asarray(ndimage.center_of_mass(np.ones(u.shape), u, ids), np.float32).reshape(
            len(ids), -1
        )
        table = np.zeros((int(ids.max()) + 1, com.shape[1]), np.float32)
        table[ids] = com
        off[i] = np.where((u > 0)[..., None], table[u] - coords, 0.0)
        delta = np.zeros(u.shape, np.float32)
        pos = np.clip(np.rint(com).astype(int), 0, np.array(u.shape) - 1)
        delta[tuple(pos.T)] = 1.0
        heat[i] = np.minimum(
            1.0, ndimage.gaussian_filter(delta, sigma) * (2 * np.pi * sigma**2) ** (u.ndim / 2)
        )
    return heat.reshape(lab.shape), off.reshape(lab.shape + (units.ndim - 1,))


def make_targets(raw: np.ndarray, task, ndim: int) -> dict[str, np.ndarray]:
    """All targets of `task` for a label batch `[b, z, y, x]`, each `[b, z, y, x(, k)]`.

    Keys: "classes" (int32, -1 ignore) for softmax tasks; "sigmoid" + "sigmoid_mask" for
    affinities; "regress" + "regress_mask" for distance / heatmap + offsets."""
    if task.kind == "semantic":
        return {"classes": to_classes(raw, task)}
    lab, ignore = instances(raw, task, ndim)
    if task.kind == "affinity":
        aff, mask = affinities(lab, ignore, task.offsets, ndim)
        return {"sigmoid": aff, "sigmoid_mask": mask}
    if task.kind == "boundary":
        b = boundaries(lab, ndim)
        out = {"classes": np.where(ignore, -1, b.astype(np.int32))}
        if task.distance:
            out["regress"] = distance(lab, b, ndim)[..., None]
            out["regress_mask"] = (~ignore).astype(np.float32)[..., None]
        return out
    heat, off = centers(lab, ndim, task.sigma)
    fg = lab > 0
    cls = np.where(ignore, -1, fg.astype(np.int32))
    regress = np.concatenate([heat[..., None], off], axis=-1)
    rmask = np.concatenate(
        [(~ignore)[..., None], np.repeat((fg & ~ignore)[..., None], off.shape[-1], -1)], -1
    )
    return {"classes": cls, "regress": regress, "regress_mask": rmask.astype(np.float32)}


def group_centers(
    fg: np.ndarray,
    heat: np.ndarray,
    offsets: np.ndarray,
    *,
    threshold: float = 0.3,
    min_distance: int = 3,
) -> np.ndarray:
    """Instances of one image / volume from centre-head outputs (Panoptic-DeepLab grouping): centres
    are heatmap peaks above `threshold`; each foreground voxel joins the centre nearest to the
    position its offset points at."""
    from scipy.spatial import cKDTree
    from skimage.feature import peak_local_max

    peaks = peak_local_max(
        heat, min_distance=min_distance, threshold_abs=threshold, exclude_border=False
    )
    out = np.zeros(fg.shape, np.uint32)
    if not len(peaks) or not fg.any():
        return out
    idx = np.nonzero(fg)
    votes = np.stack(idx, -1) + offsets[idx]
    _, nearest = cKDTree(peaks).query(votes)
    out[idx] = nearest + 1
    return out
