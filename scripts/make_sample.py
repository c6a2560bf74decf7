"""Build the bundled real EM sample (emfm/data/sample/isbi2012_sample) from ../shared/data/em.

It is a crop of the ISBI 2012 training volume (ssTEM, Drosophila larva VNC, 4x4x50 nm) and its
membrane labels: all 30 sections, the central 384 x 384 pixels. Written as zarr v3 (zstd) through
tensorstore, with OME-style attributes (axes, voxel size) and the citation in attributes.

Usage: python scripts/make_sample.py [--src ../shared/data/em/isbi2012]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import tifffile

from emfm.data import volume

CROP = (slice(0, 30), slice(64, 448), slice(64, 448))
CITATION = (
    "ISBI 2012 EM segmentation challenge training data (ssTEM, Drosophila first-instar larva VNC). "
    "Cardona A. et al. (2010) PLoS Biol 8(10): e1000502; Arganda-Carreras I. et al. (2015) "
    "Front. Neuroanat. 9:142. Research / non-commercial use with citation."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    repo = Path(__file__).resolve().parents[1]
    ap.add_argument("--src", default=str(repo.parent / "shared/data/em/isbi2012"))
    ap.add_argument("--out", default=str(repo / "emfm/data/sample/isbi2012_sample"))
    args = ap.parse_args()
    raw = tifffile.imread(Path(args.src) / "train_volume.tif")[CROP]
    lab = tifffile.imread(Path(args.src) / "train_labels.tif")[CROP]
    # Store labels as 1 = membrane, 0 = cell interior (the ISBI files use 0 = membrane, 255 =
    # interior).
    membrane = (lab == 0).astype(np.uint8)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    attrs = {
        "source": "ISBI 2012 train_volume.tif / train_labels.tif",
        "crop_zyx": [[0, 30], [64, 448], [64, 448]],
        "citation": CITATION,
    }
    volume.write_array(
        out / "raw",
        raw,
        voxel_size=(50.0, 4.0, 4.0),
        chunks=(1, 384, 384),
        attributes={**attrs, "content": "raw uint8 grey values"},
    )
    volume.write_array(
        out / "membranes",
        membrane,
        voxel_size=(50.0, 4.0, 4.0),
        chunks=(1, 384, 384),
        attributes={**attrs, "content": "1 = membrane, 0 = cell interior"},
    )
    print(f"wrote {out}: raw {raw.shape} {raw.dtype}, membrane fraction {membrane.mean():.3f}")


if __name__ == "__main__":
    main()
