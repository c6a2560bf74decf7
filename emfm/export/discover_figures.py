"""Figures of `emfm discover`: per-cluster galleries of example crops of the image, and an
overview of one section (image, features as PCA-RGB, clusters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _crop(img, centre, side: int) -> np.ndarray:
    z, y, x = centre
    h = side // 2
    region = (
        slice(z, z + 1),
        slice(max(0, y - h), min(img.shape[1], y - h + side)),
        slice(max(0, x - h), min(img.shape[2], x - h + side)),
    )
    a = img.read(region)[0].astype(np.float32)
    pad = (
        (max(0, h - y), side - a.shape[0] - max(0, h - y)),
        (max(0, h - x), side - a.shape[1] - max(0, h - x)),
    )
    return np.pad(a, pad, mode="constant", constant_values=np.nan)


def galleries(img, cells, stride, origin, side: int, folder: Path) -> list[str]:
    """One PNG per cluster: its example crops in a row-major grid, the example's feature cell
    outlined."""
    from emfm.eval.figures import _plt

    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    lo, hi = np.percentile(
        img.read((slice(img.shape[0] // 2, img.shape[0] // 2 + 1),)), [0.5, 99.5]
    )
    for c, cs in enumerate(cells):
        if not len(cs):
            continue
        centres = [
            tuple(int(o + v * s + s // 2) for o, v, s in zip(origin, cell, stride)) for cell in cs
        ]
        crops = [_crop(img, ce, side) for ce in centres]
        cols = min(6, len(crops))
        rows = -(-len(crops) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.3), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, a, ce in zip(axes.ravel(), crops, centres):
            ax.imshow(a, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            hy, hx = stride[1] / 2, stride[2] / 2
            ax.add_patch(
                plt.Rectangle(
                    (side // 2 - hx - 0.5, side // 2 - hy - 0.5),
                    2 * hx,
                    2 * hy,
                    fill=False,
                    edgecolor=plt.cm.tab20(c % 20),
                    linewidth=1.2,
                )
            )
            ax.set_title(f"z{ce[0]} y{ce[1]} x{ce[2]}", fontsize=6)
        fig.suptitle(f"cluster {c}", fontsize=9)
        fig.tight_layout()
        p = folder / f"cluster_{c:02d}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(str(p))
    return paths


def overview(img, fv, lv, stride, origin, k: int, path: Path) -> Path:
    """Middle section of the feature grid (at most 512 x 512 cells): image, PCA-RGB features,
    cluster map."""
    from emfm.eval.figures import _plt, image_grid
    from emfm.export.pca import pca_rgb

    z = fv.shape[0] // 2
    cy, cx = (min(n, 512) for n in fv.shape[1:3])
    feats = fv.read((slice(z, z + 1), slice(0, cy), slice(0, cx)))[0].astype(np.float32)
    rgb, _ = pca_rgb(feats)
    lab = lv.read((slice(z, z + 1), slice(0, cy), slice(0, cx)))[0]
    colours = _plt().cm.tab20(np.arange(k) % 20)[:, :3]
    zi = origin[0] + z * stride[0] + stride[0] // 2
    section = img.read(
        (
            slice(zi, zi + 1),
            slice(origin[1], origin[1] + cy * stride[1]),
            slice(origin[2], origin[2] + cx * stride[2]),
        )
    )
    image_grid(
        path,
        [
            (f"section {zi}", section),
            ("features: PCA 1-3 as RGB", rgb[None]),
            (f"k-means clusters (k={k})", colours[lab][None]),
        ],
    )
    return path
