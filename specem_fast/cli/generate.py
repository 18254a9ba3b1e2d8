"""`specem-fast generate`: one ensemble answer, streamed as segments are accepted."""

from __future__ import annotations

import argparse
import json
import sys

from specem_fast.config import check_text
from specem_fast.errors import SpecEMError
from specem_fast.cli.options import add_generation_args, add_model_args, check_writable, load_ensemble, settings_from_args


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an answer with the ensemble",
                       description="Generate one answer with the ensemble, streaming accepted segments.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text (default: read stdin)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the whole result")
    p.add_argument("--trace", metavar="FILE", help="write the rounds as JSONL to this file")
    p.add_argument("--save-weights", default=None, metavar="FILE",
                   help="after the answer, write the ensemble's prior and learned weights (JSON) here")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=run)


def _not_utf8(exc: UnicodeDecodeError, what: str) -> SpecEMError:
    return SpecEMError(
        f"{what} is not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save it as UTF-8"
    )


# The most prompt bytes read from a file or stdin: the server's default body limit
# (serve --max-body-mb); a longer prompt could not fit any sane KV-cache budget anyway.
MAX_PROMPT_BYTES = 4 * 2**20


def _read_capped(fh, what: str) -> str:
    """Read at most MAX_PROMPT_BYTES (as bytes, so a huge input costs no more than that)."""
    data = fh.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise SpecEMError(f"{what} is over {MAX_PROMPT_BYTES // 2**20} MiB, far more than a prompt the KV-cache "
                          "budget can hold; shorten it (or raise --cache-tokens and split the input)")
    if isinstance(data, str):  # a text stream without a byte buffer (an embedding caller's stdin)
        check_text(data, what)
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(exc, what) from None


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
        # invalid UTF-8 bytes in argv arrive as lone surrogates (surrogateescape)
        check_text(text, "--prompt")
    elif args.prompt_file:
        try:
            with open(args.prompt_file, "rb") as fh:
                text = _read_capped(fh, f"--prompt-file {args.prompt_file}")
        except OSError as exc:
            raise SpecEMError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror}") from None
    elif not sys.stdin.isatty():
        try:
            text = _read_capped(getattr(sys.stdin, "buffer", sys.stdin), "the prompt on stdin")
        except UnicodeDecodeError as exc:
            raise _not_utf8(exc, "the prompt on stdin") from None
    else:
        raise SpecEMError("no prompt given; use --prompt TEXT, --prompt-file FILE or pipe text on stdin")
    if not text.strip():
        raise SpecEMError("the prompt is empty; give some text to answer")
    return text


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    settings = settings_from_args(args)  # validates before any model loads
    check_writable(args.trace, "--trace")
    check_writable(args.save_weights, "--save-weights")
    ens = load_ensemble(args)
    result = None
    out = sys.stdout
    for ev in ens.stream_with_result(prompt, **settings):
        if not hasattr(ev, "model"):
            result = ev
        elif not args.json and ev.text:
            out.write(f"\x1b[2m[{ev.model}]\x1b[0m{ev.text}" if out.isatty() else ev.text)
            out.flush()
    if args.trace:
        from specem_fast.measure.trace import write_trace

        write_trace(args.trace, [result])
    if args.save_weights:
        ens.save_weights(args.save_weights)
    if args.json:
        json.dump(result.to_dict(), out, ensure_ascii=False)
        out.write("\n")
        return 0
    out.write("\n")
    wins = ", ".join(f"{m}: {n}" for m, n in result.wins.items())
    t = result.timings
    print(
        f"-- {result.new_tokens} tokens in {len(result.rounds)} rounds, {t['total_s']:.2f}s "
        f"({result.new_tokens / max(t['total_s'], 1e-9):.1f} tok/s), stop: {result.stop_reason}; "
        f"segments won: {wins or 'none'}",
        file=sys.stderr,
    )
    return 0
