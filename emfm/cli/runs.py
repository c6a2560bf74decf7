"""`emfm runs summarize DIR [--out DIR] [--stale-after S]`: a table and loss plot over a sweep's
runs."""

from __future__ import annotations

import argparse

from emfm.cli.report import user_errors


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

    with user_errors():
        res = summarize(args.dir, args.out, args.stale_after)
    print(res["table"])
    print(f"\nplot: {res['plot']}")
