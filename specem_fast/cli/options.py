"""Command-line options shared by generate, eval and bench."""

from __future__ import annotations

import argparse
from typing import Any

from specem_fast.config import HEDGE_SCHEDULES, INIT_WEIGHTS, PRESET_CHOICES, RUN_MODES, SCORE_MODES, GenerationSettings
from specem_fast.errors import SpecEMError


def csv_list(text: str) -> list[str]:
    # empty entries are kept so the engine can name them as an error
    return [p.strip() for p in text.split(",")]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--models / --verifiers / --device and the other engine options."""
    p.add_argument(
        "--models",
        type=csv_list,
        default=None,
        metavar="A,B,C",
        help="drafter models: registry names or model folders, comma-separated (default: the default models)",
    )
    p.add_argument(
        "--verifiers",
        type=csv_list,
        default=None,
        metavar="A,B",
        help="verifier models (default: the drafters)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--backend", type=csv_list, default=None, metavar="auto|native|transformers",
                   help="how local members run: auto (default: the native runtime where it implements the "
                        "architecture, else transformers), native or transformers; one for all, or one per model "
                        "comma-separated (a member spec hf:PATH forces transformers too)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: bfloat16 on CUDA and on CPUs with native bf16 "
                        "instructions, float32 on other CPUs)")
    p.add_argument("--cache-tokens", type=int, default=4096,
                   help="KV-cache budget per request and model: prompt + answer + one round (default 4096)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="kernel path (default auto: Triton on CUDA, torch on CPU)")
    p.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                   help="prefix attention through flash-attn, merged with the branch kernel (default auto: "
                        "when installed, on CUDA, for prefixes of at least 1024 tokens)")
    p.add_argument("--compile", action="store_true",
                   help="run the draft decode step through torch.compile (CUDA: plus CUDA graphs); the first "
                        "rounds pay the compilation")
    p.add_argument("--devices", type=csv_list, default=None, metavar="D1,D2,D3",
                   help="one device per model (e.g. cuda:0,cuda:1), overriding --device")
    p.add_argument("--parallel", choices=["auto", "on", "off"], default="auto",
                   help="draft and verify members concurrently (default auto: one host thread per device, and "
                        "one per model on a CPU with >= 2 threads, splitting its cores); on: one thread per "
                        "model always; off: one model at a time")
    p.add_argument("--placement", choices=["local", "ray"], default="local",
                   help="where the members run: local (this process, default) or ray (each model in a Ray actor "
                        "of its own; needs `pip install 'specem-fast[ray]'`); a member written ray:NAME in "
                        "--models runs in Ray either way")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="the Ray cluster to place members on (default: $RAY_ADDRESS, else a cluster started on this "
                        "machine by `ray start`, else a new local one)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="load prior and learned model weights from this JSON file (written by `calibrate` "
                        "or --save-weights); the default members come with a calibration")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-independent answers: each request's forwards run as a batch of one in every "
                        "member, so a greedy answer is the same whatever it runs with, in any dtype (slower under "
                        "load; docs/limits.md)")
    p.add_argument("--preset", choices=PRESET_CHOICES, default="auto",
                   help="default settings, which every option below overrides (default auto: 'recommended' "
                        "= calibrated prior + model exit + agreement fast path when there are prior weights, "
                        "'reference' = the paper's method otherwise)")


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
    q = p.add_argument_group("ensemble quality options (default: those of --preset)")
    q.add_argument("--hedge-schedule", choices=HEDGE_SCHEDULES, default=None,
                   help=f"Hedge learning-rate schedule (default {d.hedge_schedule}: lr/10*sqrt(1/K)/t; "
                        "constant: lr every round; sqrt: lr*sqrt(ln K/t))")
    q.add_argument("--init-weights", choices=INIT_WEIGHTS, default=None,
                   help="start each request from uniform weights, the prior (--weights FILE) or the weights "
                        "learned on earlier requests (reference: uniform; recommended: prior)")
    q.add_argument("--exit-threshold", type=float, default=None, metavar="W",
                   help="model exit: a drafter whose weight stays below W stops drafting (reference: off; "
                        "recommended: 0.2)")
    q.add_argument("--exit-patience", type=int, default=None, metavar="N",
                   help="rounds in a row below --exit-threshold before a drafter exits (reference: 3; recommended: 2)")
    q.add_argument("--skip-agreed", action="store_true", default=None,
                   help="accept identical candidates without a verify pass (on in recommended)")
    q.add_argument("--no-self-votes", dest="self_votes", action="store_false", default=None,
                   help="leave a candidate's own drafter out of its score and of the rewards")
    q.add_argument("--prefer-finished", action="store_true", default=None,
                   help="only candidates that ended the answer compete, when any did (for whole-response "
                        "candidates: --window = --max-new-tokens)")
    if window:  # bench runs both modes itself
        g.add_argument("--mode", choices=RUN_MODES, default=None, help=f"engine mode (default {d.mode})")


def settings_from_args(args: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The GenerationSettings overrides given on the command line (validated)."""
    over: dict[str, Any] = {}
    for name in ("window", "max_new_tokens", "temperature", "top_p", "seed", "score", "fast_eos", "mode",
                 "hedge_schedule", "init_weights", "exit_threshold", "exit_patience", "skip_agreed", "self_votes",
                 "prefer_finished"):
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
    st = GenerationSettings().with_overrides(**over)  # raises SpecEMError on bad values
    shipped = getattr(args, "models", None) is None and getattr(args, "verifiers", None) is None  # the defaults
    if not getattr(args, "weights", None) and not shipped:
        if st.init_weights == "prior":
            raise SpecEMError("--init-weights prior needs prior weights: give --weights FILE "
                              "(see `specem-fast calibrate`)")
        if getattr(args, "preset", None) == "recommended":
            raise SpecEMError("--preset recommended starts from prior weights: give --weights FILE "
                              "(see `specem-fast calibrate`), or use --preset reference")
    if getattr(args, "weights", None):
        from specem_fast.rounds.weights import read_weights_file

        read_weights_file(args.weights)  # a bad file is an error before any model loads
    return over


def check_writable(path: str | None, option: str) -> None:
    """An output path whose folder is missing is an error before any work starts."""
    if path is None:
        return
    from pathlib import Path

    import os

    p = Path(path)
    if p.is_dir():
        raise SpecEMError(f"{option} {path!r} is a folder; give a file name")
    if not p.parent.is_dir():
        raise SpecEMError(f"cannot write {option} {path!r}: folder {str(p.parent)!r} does not exist")
    if not os.access(p if p.exists() else p.parent, os.W_OK):
        raise SpecEMError(f"cannot write {option} {path!r}: permission denied")


def _backend_arg(values: list[str] | None):
    """--backend: one value for every member, or one per model."""
    if not values:
        return "auto"
    return values[0] if len(values) == 1 else values


def load_ensemble(args: argparse.Namespace, max_batch: int = 1, max_waiting: int = 256):
    from specem_fast import Ensemble
    from specem_fast.hub.registry import DEFAULT_MODELS

    models = args.models or [m.name for m in DEFAULT_MODELS]
    # one request at a time: per-item timings and seeds stay exact
    return Ensemble.from_pretrained(
        models,
        verifiers=args.verifiers,
        device=args.device,
        dtype=args.dtype,
        cache_tokens=args.cache_tokens,
        max_batch=max_batch,
        kernels=args.kernels,
        flash_attn=args.flash_attn,
        progress=True,
        weights=getattr(args, "weights", None),
        max_waiting=max_waiting,
        compile=getattr(args, "compile", False),
        devices=getattr(args, "devices", None) or (),
        parallel=getattr(args, "parallel", "auto"),
        placement=getattr(args, "placement", "local"),
        ray_address=getattr(args, "ray_address", None),
        preset=getattr(args, "preset", "auto"),
        backend=_backend_arg(getattr(args, "backend", None)),
        batch_invariant=getattr(args, "deterministic", False),
    )
