"""The mean of several networks' boundary maps, as one boundary zarr for `emfm instances`.

Each input is an `emfm predict` output: boundary probabilities (a `boundary` channel, read as
`emfm instances` reads it) or affinities (turned into a boundary map as `emfm instances` does:
the largest cut probability 1 - a of the nearest-neighbour edges at each voxel,
emfm.instances.boundaries_from_affinities). Inputs must cover the same voxels; each is read whole
into memory (float32), so this is for volumes that fit, such as the gala test volumes.

    python experiments/instances/average_boundaries.py OUT.zarr PRED.zarr PRED.zarr [...]
"""

from __future__ import annotations

import argparse

import numpy as np

from emfm.data.volume import VolumeError, open_volume, write_array
from emfm.errors import UserError
from emfm.instances import SegmentParams, boundaries_from_affinities
from emfm.instances.reader import from_attributes, volume_reader


def boundary_map(path: str) -> tuple[np.ndarray, dict]:
    vol = open_volume(path)
    channel, invert, params = from_attributes(vol, "auto", None, False, SegmentParams())
    read, kind = volume_reader(vol, kind="auto", channel=channel, invert=invert)
    box = tuple(slice(0, s) for s in vol.shape[:3])
    x = read(box)
    if kind == "affinities":
        x = boundaries_from_affinities(x, params.offsets)
    return x.astype(np.float32), vol.attributes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    a = ap.parse_args()
    if len(a.inputs) < 2:
        raise SystemExit("give at least two predictions to average")
    try:
        maps, attrs = zip(*(boundary_map(p) for p in a.inputs), strict=True)
    except (FileNotFoundError, VolumeError, UserError) as e:
        raise SystemExit(f"average_boundaries: {e}") from None
    if len({m.shape for m in maps}) != 1:
        shapes = {p: m.shape for p, m in zip(a.inputs, maps, strict=True)}
        raise SystemExit(f"average_boundaries: inputs cover different voxels: {shapes}")
    mean = np.mean(maps, axis=0).astype(np.float32)
    keep = {k: attrs[0][k] for k in ("voxel_size", "unit", "roi", "grey_range") if k in attrs[0]}
    write_array(
        a.out,
        mean,
        chunks=(min(mean.shape[0], 64), 128, 128),
        voxel_size=attrs[0].get("voxel_size"),
        attributes={**keep, "content": "probabilities", "averaged": list(a.inputs)},
    )
    print(f"wrote {a.out} {mean.shape}: mean boundary map of {len(maps)} predictions")


if __name__ == "__main__":
    main()
