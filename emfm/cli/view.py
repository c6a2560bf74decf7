"""`emfm view PATH... [--bind ADDR] [--port N] [--browser]`: serve volumes and run directories in
neuroglancer (emfm.view) until Ctrl-C. Bad input ends with one line `emfm: error: ...`, exit status
2."""

from __future__ import annotations

import argparse
import logging
import time

from emfm.cli.report import user_errors


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="emfm view",
        description="show volumes (raw, features, probabilities, labels) and run directories in "
        "neuroglancer",
    )
    ap.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="a volume (zarr, N5, precomputed) or a run directory",
    )
    ap.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1; 0.0.0.0 to reach it from other machines)",
    )
    ap.add_argument(
        "--port", type=int, default=0, help="port to serve on (default 0: any free port)"
    )
    ap.add_argument(
        "--no-browser",
        dest="open_browser",
        action="store_false",
        default=False,
        help="do not open a browser (the default)",
    )
    ap.add_argument(
        "--browser",
        dest="open_browser",
        action="store_true",
        help="open the viewer in a web browser",
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="emfm view: %(message)s")
    from emfm import view

    with user_errors():
        viewer, url = view.serve(
            args.paths, bind=args.bind, port=args.port, open_browser=args.open_browser
        )
    for layer in view.layer_summary(viewer):
        print(
            f"  {layer['type']:<12} {layer['name']}  shape {tuple(layer['shape'])}  "
            f"voxel size {tuple(layer['voxel_size'])} nm"
        )
    print(f"neuroglancer: {url}", flush=True)
    print("serving; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import neuroglancer

        neuroglancer.stop()
