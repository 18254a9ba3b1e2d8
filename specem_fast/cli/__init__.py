"""`specem-fast` command line: one module per subcommand.

Each subcommand module defines ``register(subparsers)`` which adds its parser and
sets ``func`` (``args -> int`` exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SpecEMError

SUBCOMMANDS = ("generate", "models", "bench", "eval", "calibrate", "plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specem-fast",
        description="Training-free LLM ensembling by segment drafting and verification.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecEMError as exc:
        print(f"specem-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specem-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
