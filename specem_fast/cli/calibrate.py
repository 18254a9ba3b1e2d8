"""`specem-fast calibrate`: prior model weights from each member's accuracy alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specem_fast.errors import SpecEMError
from specem_fast.cli.options import add_generation_args, add_model_args, check_writable, load_ensemble, settings_from_args

HELP = "measure each member alone on a development split and write prior weights from their accuracy"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help=HELP,
        description=(
            "Run every member alone on a development split (a data set slice or your JSONL), grade the "
            "answers, and write prior weights w_i proportional to smoothed accuracy ** --power (with a floor) "
            "to a JSON file that `generate`, `eval` and the Python API load with --weights / weights=. "
            "The default split is per data set: GSM8K items 300-399, IFBench prompts 100-199, GPQA questions "
            "100-197, disjoint from the evaluations on their first items and from the items kept for an "
            "independent check (GSM8K from 1000, IFBench from 200), which calibration never reads."
        ),
    )
    p.add_argument("data", nargs="?", default="gsm8k", metavar="DATA",
                   help="gsm8k, gpqa, ifbench, or a .jsonl file of {\"prompt\", \"answer\"} (default gsm8k)")
    p.add_argument("--skip", type=int, default=None, metavar="N",
                   help="leave out the first N items (default: the data set's development split; 0 for a file)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="items to answer (default: the development split's, 100 for a file)")
    p.add_argument("--out", required=True, metavar="FILE", help="weights JSON to write")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="answers JSONL (resumable; default: next to --out, .answers.jsonl)")
    p.add_argument("--power", type=float, default=2.0,
                   help="sharpness: weight proportional to accuracy ** power (default 2)")
    p.add_argument("--floor", type=float, default=0.1,
                   help="every weight at least floor/K, a share of uniform (default 0.1)")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="items decoded together (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (item i uses seed+i; default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_generation_args(p, window=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specem_fast.measure.datasets import load_items
    from specem_fast.measure.evaluate import run_eval
    from specem_fast.rounds.weights import weights_from_accuracy

    from specem_fast.measure.datasets import DEV_SPLITS

    skip, limit = DEV_SPLITS.get(args.data.lower(), (0, 100))
    args.skip = skip if args.skip is None else args.skip
    args.limit = limit if args.limit is None else args.limit
    if args.limit < 1 or args.batch < 1:
        raise SpecEMError("--limit and --batch must be >= 1")
    if not (args.power > 0) or not (0 <= args.floor < 1):
        raise SpecEMError(f"--power must be > 0 and --floor in [0, 1) (got {args.power}, {args.floor})")
    out = Path(args.out)
    check_writable(args.out, "--out")
    results = args.results or str(out.with_name(out.stem + ".answers.jsonl"))
    check_writable(results, "--results")
    settings = settings_from_args(args, seed=args.seed)
    items = load_items(args.data, seed=args.seed, limit=args.limit, skip=args.skip)
    ens = load_ensemble(args, max_batch=args.batch)
    silent = [v for v in ens.verifiers if v not in ens.model_names]
    if silent:
        raise SpecEMError(f"calibrate measures models that draft; {', '.join(silent)} only verify: "
                          "give their weights by hand (Ensemble.set_prior_weights)")
    summary = run_eval(ens, items, out_path=results, dataset=args.data, seed=args.seed, settings=settings,
                       systems=ens.verifiers, progress=not args.no_progress, verifiers=args.verifiers,
                       batch=args.batch)
    rows = {r["system"]: r for r in summary["systems"]}
    correct = {m: rows[m]["accuracy"]["correct"] for m in ens.verifiers}
    graded = {m: rows[m]["accuracy"]["n"] for m in ens.verifiers}
    prior = weights_from_accuracy(correct, graded, power=args.power, floor=args.floor)
    calibration = {
        "dataset": args.data, "skip": args.skip, "limit": args.limit, "results": results,
        "power": args.power, "floor": args.floor,
        "accuracy": {m: {"correct": correct[m], "graded": graded[m]} for m in ens.verifiers},
    }
    ens.weights.set_prior(prior, calibration)
    ens.save_weights(out)
    for m in ens.verifiers:
        print(f"{m:<40} {correct[m]:>4}/{graded[m]:<4} correct  weight {prior[m]:.3f}")
    print(f"weights: {out}   answers: {results}", file=sys.stderr)
    return 0
