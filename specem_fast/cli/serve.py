"""`specem-fast serve`: the ensemble behind an OpenAI-compatible HTTP API (uvicorn)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys

from specem_fast.errors import SpecEMError
from specem_fast.cli.options import add_generation_args, add_model_args, load_ensemble, settings_from_args


# the fewest tokens a prompt must be allowed (a chat template alone takes about this many)
_MIN_PROMPT_TOKENS = 16


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the ensemble over an OpenAI-compatible HTTP API",
        description="Serve the ensemble over HTTP: POST /v1/chat/completions and /v1/completions (OpenAI format, "
                    "SSE streaming), GET /v1/models, /health and /metrics (Prometheus). The generation options "
                    "below are the defaults of every request; a request's own fields override them.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--profile", action="append", default=None, metavar="NAME=WEIGHTS",
                   help="also serve the members as model NAME, starting from the weights in WEIGHTS (a file from "
                        "`calibrate`, e.g. one per task) with its own preset; repeatable, listed by /v1/models")
    p.add_argument("--served-model-name", default="specem-fast", metavar="NAME",
                   help="the model id clients pass as `model` (default specem-fast)")
    p.add_argument("--api-key", default=os.environ.get("SPECEM_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SPECEM_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=8, help="requests that run together (default 8)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait when every slot (--max-batch) is busy; beyond them a request gets "
                        "429 at once; 0: no queue (default 256)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, running requests get S seconds to finish before they are cancelled "
                        "(default 30)")
    p.add_argument("--max-body-mb", type=float, default=4.0, metavar="MB",
                   help="largest request body in MiB; a larger one is refused with 413 before it is read "
                        "(default 4)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed of requests that give none (default 0)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=run)


def _listen(host: str, port: int) -> socket.socket:
    """Bind the port before any model loads, so a taken port is a quick, clear error."""
    if not 0 <= port <= 65535:
        raise SpecEMError(f"--port must be in 0-65535 (got {port})")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise SpecEMError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise SpecEMError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port or --host") from None
    sock.listen(2048)
    return sock


def _check_budget(args: argparse.Namespace, defaults) -> None:
    """A --cache-tokens that leaves no room for a prompt at the default window is refused
    before any model loads (each round needs drafters x (window + 4) tokens of it)."""
    from specem_fast.hub.registry import DEFAULT_MODELS

    k = len(args.models or DEFAULT_MODELS)
    room = k * (defaults.window + 4)
    if args.cache_tokens - room < _MIN_PROMPT_TOKENS:
        raise SpecEMError(
            f"--cache-tokens {args.cache_tokens} is too small for any prompt: one round of {k} drafter(s) at "
            f"--window {defaults.window} takes {k} x ({defaults.window} + 4) = {room} tokens of it, leaving "
            f"{args.cache_tokens - room}; raise --cache-tokens to at least {room + _MIN_PROMPT_TOKENS} or lower "
            "--window")


def _check_args(args: argparse.Namespace) -> None:
    if args.shutdown_timeout < 0:
        raise SpecEMError(f"--shutdown-timeout must be >= 0 seconds (got {args.shutdown_timeout})")
    if args.max_batch < 1:
        raise SpecEMError(f"--max-batch must be >= 1 (got {args.max_batch})")
    if not math.isfinite(args.max_body_mb) or args.max_body_mb * 2**20 < 1024:
        raise SpecEMError(f"--max-body-mb must be a number of MiB, at least 0.001 (1 KiB; got {args.max_body_mb})")
    if args.api_key is not None and not args.api_key.strip():
        raise SpecEMError("--api-key is empty; give a key or leave the option out")


def _server(uvicorn, app, args: argparse.Namespace, backstop: float):
    """A uvicorn server that starts the app's graceful shutdown on the first SIGTERM/SIGINT."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.begin_shutdown(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn cancels what is left only well after the app has answered it
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout + backstop)
    return Server(config)


def _profile_args(args: argparse.Namespace) -> dict[str, str]:
    """--profile NAME=WEIGHTS, checked before any model loads."""
    from specem_fast.rounds.weights import read_weights_file

    out: dict[str, str] = {}
    for spec in args.profile or []:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise SpecEMError(f"--profile {spec!r} is not NAME=WEIGHTS (e.g. --profile ifbench=ifbench.json)")
        if name in out or name == args.served_model_name:
            raise SpecEMError(f"--profile {name!r} names a served model twice; give each its own name")
        read_weights_file(path)  # a bad file is an error before any model loads
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from specem_fast.server import create_app
        from specem_fast.server.background import SHUTDOWN_BACKSTOP
    except ImportError as exc:
        raise SpecEMError(f"serving needs the serve extra ({exc.name} is not installed): "
                          "pip install 'specem-fast[serve]'") from None
    from specem_fast.config import GenerationSettings

    _check_args(args)
    overrides = settings_from_args(args)
    defaults = GenerationSettings().with_overrides(**overrides)  # checked before any model loads
    _check_budget(args, defaults)
    profiles = _profile_args(args)
    sock = _listen(args.host, args.port)
    try:
        ens = load_ensemble(args, max_batch=args.max_batch, max_waiting=args.max_waiting)
    except BaseException:
        sock.close()
        raise
    try:
        served = {}
        for name, path in profiles.items():
            served[name] = ens.add_profile(name, weights=path, preset=args.preset).defaults.with_overrides(**overrides)
        app = create_app(ens, model_name=args.served_model_name, api_key=args.api_key,
                         defaults=ens.defaults.with_overrides(**overrides), shutdown_grace=args.shutdown_timeout,
                         max_body_bytes=int(args.max_body_mb * 2**20), profiles=served)
        server = _server(uvicorn, app, args, SHUTDOWN_BACKSTOP)
        host, port = sock.getsockname()[:2]
        print(f"specem-fast: serving {args.served_model_name!r} ({', '.join(ens.model_names)}) on "
              f"http://{host}:{port}/v1; greedy answers are "
              + ("batch-independent (--deterministic)" if ens.config.batch_invariant else
                 "not batch-independent (--deterministic makes them so)"), file=sys.stderr, flush=True)
        # uvicorn re-raises the signal it stopped on once it has shut down; with these
        # handlers in place SIGTERM and Ctrl-C end in a clean exit 0 instead of a kill
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        ens.close()
        sock.close()
    return 0
