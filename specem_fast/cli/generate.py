"""`specem-fast generate`: one ensemble answer, streamed as segments are accepted."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import SpecEMError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an answer with the ensemble",
                       description="Generate one answer with the ensemble, streaming accepted segments.")
    p.add_argument("--models", help="comma-separated drafters: registry names or local folders (default: the default models)")
    p.add_argument("--verifiers", help="comma-separated verifiers (default: the drafters)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text (default: read stdin)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--window", type=int, default=10, help="draft window W in tokens (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", choices=["logprob", "logit"], default="logprob")
    p.add_argument("--hedge-lr", default="1.0", help="Hedge learning rate, or 'off' to sum scores unweighted")
    p.add_argument("--fast-eos", action="store_true", help="finish as soon as any draft ends with a stop token")
    p.add_argument("--mode", choices=["cached", "recompute"], default="cached")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache-tokens", type=int, default=4096, help="KV-cache budget per request and model")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object with the whole result")
    p.add_argument("--trace", help="write the rounds as JSONL to this file")
    p.set_defaults(func=run)


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise SpecEMError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror}") from None
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise SpecEMError("no prompt given; use --prompt TEXT, --prompt-file FILE or pipe text on stdin")
    if not text.strip():
        raise SpecEMError("the prompt is empty; give some text to answer")
    return text


def parse_hedge_lr(value: str) -> float | None:
    if value.strip().lower() == "off":
        return None
    try:
        return float(value)
    except ValueError:
        raise SpecEMError(f"--hedge-lr must be a number or 'off' (got {value!r})") from None


def run(args: argparse.Namespace) -> int:
    from ..config import GenerationSettings
    from ..ensemble import Ensemble

    prompt = read_prompt(args)
    settings = GenerationSettings(
        window=args.window, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, score=args.score, hedge_lr=parse_hedge_lr(args.hedge_lr),
        fast_eos=args.fast_eos, mode=args.mode, stop=tuple(args.stop),
    )  # validates before any model loads
    ens = Ensemble.from_pretrained(
        args.models, args.verifiers, device=args.device, dtype=args.dtype,
        cache_tokens=args.cache_tokens, max_batch=1, kernels=args.kernels,
    )
    result = None
    out = sys.stdout
    for i, ev in ens.events(prompt, settings.to_dict()):
        if hasattr(ev, "winner_model"):
            if not args.json:
                seg = ev.candidates[ev.winner].text
                if out.isatty():
                    out.write(f"\x1b[2m[{ev.winner_model}]\x1b[0m{seg}")
                else:
                    out.write(seg)
                out.flush()
        else:
            result = ev
    if args.trace:
        from ..measure.trace import write_trace

        write_trace(args.trace, [result])
    if args.json:
        json.dump(result.to_dict(), out, ensure_ascii=False)
        out.write("\n")
    else:
        out.write("\n")
        wins = ", ".join(f"{m}: {n}" for m, n in result.wins.items())
        t = result.timings
        print(
            f"-- {result.new_tokens} tokens in {len(result.rounds)} rounds, {t['total_s']:.2f}s "
            f"({result.new_tokens / max(t['total_s'], 1e-9):.1f} tok/s), stop: {result.stop_reason}; segments won: {wins}",
            file=sys.stderr,
        )
    return 0
