"""`specem-fast plot`: PNG figures from traces and bench reports."""

from __future__ import annotations

import argparse

HELP = "draw PNG figures from a --trace file (weights, wins) or a bench --out report (tokens/s)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help=HELP,
        description=(
            "From a trace (JSONL of rounds written by --trace): the Hedge weight of each model over the rounds "
            "and the share of rounds each model won. From a bench report (JSON written by bench --out): "
            "tokens/s per configuration."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="trace JSONL or bench JSON files")
    p.add_argument("--out-dir", default="plots", help="folder for the PNG files (default: plots)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specem_fast.measure.plot import plot_file

    for f in args.files:
        for path in plot_file(f, args.out_dir):
            print(path)
    return 0
