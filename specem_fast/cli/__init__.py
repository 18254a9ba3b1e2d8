"""`specem-fast` command line: one module per subcommand.

Each subcommand module defines ``register(subparsers)`` which adds its parser and
sets ``func`` (``args -> int`` exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from specem_fast.errors import SpecEMError

SUBCOMMANDS = ("generate", "serve", "models", "bench", "eval", "calibrate", "plot")


class _Parser(argparse.ArgumentParser):
    """argparse with user errors on one line (``specem-fast: error: ...``, exit 2), like ours."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("specem-fast").strip()
        self.exit(2, f"specem-fast: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
