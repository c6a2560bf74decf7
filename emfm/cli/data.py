"""`emfm data import SRC DST ...` and `emfm data info PATH`: small utilities, plain argparse.

Bad input (missing file, unsupported format or dtype) ends with one line `emfm: error: ...` and exit
status 2, as the Hydra commands do.
"""

from __future__ import annotations

import argparse
import sys

from emfm.cli.report import user_errors


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emfm data", description="volume utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser(
        "import", help="TIFF stack / HDF5 dataset -> OME-Zarr (zarr v3, zstd) multiscale group"
    )
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument(
        "--voxel-size",
        type=float,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="nanometres (default 1 1 1, with a warning: give the real one)",
    )
    imp.add_argument("--chunks", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"))
    imp.add_argument(
        "--levels", type=int, default=3, help="scale levels, each 2x smaller in y and x"
    )
    imp.add_argument(
        "--labels", action="store_true", help="integer label volume: downsample by mode, not mean"
    )
    imp.add_argument("--dataset", help="HDF5 dataset name")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--no-progress", action="store_true")
    info = sub.add_parser(
        "info", help="shape, dtype, chunks, voxel size, scales and value range of a volume"
    )
    info.add_argument("path")
    info.add_argument("--level", type=int)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors():
        if args.cmd == "import":
            from emfm.data.importer import import_volume

            if args.voxel_size is None:
                print(
                    "emfm: warning: no --voxel-size given; the volume is recorded at 1 x 1 x 1 nm. "
                    "Give --voxel-size Z Y X (nm) so that exports, viewers and the per-section "
                    "default of instance segmentation use its real scale",
                    file=sys.stderr,
                )
            out = import_volume(
                args.src,
                args.dst,
                voxel_size=args.voxel_size or [1.0, 1.0, 1.0],
                chunks=args.chunks,
                levels=args.levels,
                labels=args.labels,
                dataset=args.dataset,
                progress=not args.no_progress,
                overwrite=args.overwrite,
            )
            print(f"wrote {out['path']} ({out['dtype']})")
            for k, lv in enumerate(out["levels"]):
                print(
                    f"  level {k}: shape {tuple(lv['shape'])}  voxel size "
                    f"{tuple(lv['voxel_size'])} nm"
                )
        else:
            from emfm.data import info

            d = info.volume_info(args.path, level=args.level)
            print(info.to_json(d) if args.json else info.format_table(d))
