"""`specem-fast bench`: ensemble cached vs recompute vs each model alone."""

from __future__ import annotations

import argparse
import shlex
import sys

from specem_fast.errors import SpecEMError
from specem_fast.cli.options import add_generation_args, add_model_args, load_ensemble, settings_from_args

HELP = "measure speed: ensemble cached vs recompute vs each model alone"


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help=HELP,
        description=(
            "Decode the same prompts with the ensemble in cached mode, in recompute mode (the reference "
            "cost model) and with each model alone (as many new tokens as the ensemble wrote, EOS ignored), "
            "over prompt lengths and windows; warm-up, repetitions, medians. Greedy unless --temperature."
        ),
    )
    p.add_argument(
        "--lengths",
        default="short,1000,3000",
        help="prompt lengths: 'short' and/or approximate token counts (default short,1000,3000; "
        "lengths the engine cannot hold are skipped)",
    )
    p.add_argument("--windows", type=_ints, default=[5, 10, 15], help="draft windows (default 5,10,15)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per run (default 64)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per configuration (default 1)")
    p.add_argument("--modes", default="cached,recompute", help="ensemble modes (default cached,recompute)")
    p.add_argument("--no-singles", action="store_true", help="skip the models-alone baselines")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument("--trace", default=None, metavar="FILE", help="write the rounds of each ensemble configuration")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_generation_args(p, window=False, max_new_tokens=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specem_fast.measure.bench import BenchPlan, format_bench, parse_lengths, run_bench, write_report

    settings = settings_from_args(args, seed=args.seed)
    plan = BenchPlan(
        lengths=parse_lengths(args.lengths),
        windows=args.windows,
        new_tokens=args.new_tokens,
        reps=args.reps,
        warmup=args.warmup,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        singles=not args.no_singles,
        settings=settings,
    )
    plan.validate()
    if args.out:
        from pathlib import Path

        parent = Path(args.out).parent
        if not parent.exists():
            raise SpecEMError(f"cannot write --out {args.out!r}: folder {str(parent)!r} does not exist")
    ens = load_ensemble(args)
    command = "specem-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    report = run_bench(ens, plan, progress=not args.no_progress, trace_path=args.trace, command=command)
    print(format_bench(report))
    if args.out:
        write_report(report, args.out)
        print(f"report: {args.out}", file=sys.stderr)
    return 0
