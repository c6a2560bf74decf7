"""`emfm runs summarize DIR [--out DIR] [--stale-after S]`: a table and loss plot over a sweep's
runs."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="emfm runs", description="inspect runs and sweeps")
    sub = ap.add_subparsers(dest="action", required=True)
    s = sub.add_parser(
        "summarize", help="one table (CSV, Markdown) and a loss-curve PNG over all runs below DIR"
    )
    s.add_argument("dir")
    s.add_argument(
        "--out",
        default=None,
        help="where to write summary.{csv,md} and loss_curves.png (default: DIR)",
    )
    s.add_argument(
        "--stale-after",
        type=float,
        default=600.0,
        help="seconds without file changes after which a 'running' run counts as stalled",
    )
    args = ap.parse_args(argv)
    from emfm.train.summarize import summarize

    try:
        res = summarize(args.dir, args.out, args.stale_after)
    except FileNotFoundError as e:
        print(f"emfm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(res["table"])
    print(f"\nplot: {res['plot']}")
