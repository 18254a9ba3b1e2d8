"""Engine speed at real shapes: Qwen2.5-7B and Llama-3.1-8B configs, random bf16 weights, one GPU.

Weights do not change how long a forward takes, and the real checkpoints (15 GB
each) cannot travel to the device machine, so the members are built there from
their configs with random weights, straight on the GPU in bfloat16
(``random_transformer``: no file, no float32 copy). They keep real tokenizers
(Qwen2.5-Coder's for the Qwen shape, SmolLM2's for the Llama shape), so the
text hand-off between tokenizers is real. Each model's LM-head rows for
anything but plain word tokens (``Ġ?[A-Za-z]+``, inside the tokenizer's range)
are zeroed: the random model then writes gibberish words and never a stop,
special or out-of-tokenizer id, so every run generates its full length.

    python benchmarks/real_shapes.py --build .device/real_shapes        # here: config.json + tokenizer, no weights
    python benchmarks/real_shapes.py .device/real_shapes/*              # on the GPU machine
    TRITON_INTERPRET=1 python benchmarks/real_shapes.py --cpu-smoke DIRS  # tiny shapes on the CPU (tests the script)

Prints (and writes to $OUT/real_shapes.md, numbers also to $OUT/real_shapes.json):
1. each member alone, batch 1: ms per decoded token (``generate_single``) and
   ms per draft step in the draft loop (a one-member ensemble);
2. the two-member ensemble (window 10, greedy): tokens/s against
   1/(sum of the members' per-token times), draft/verify/commit ms per round,
   and each member's ms per draft step inside the ensemble;
3. the segment-scoring kernel (Triton) against eager torch at the members'
   LM-head shapes, 3 candidates x 10 tokens, batch 1 and 8;
4. the same with ``compile=True`` (torch.compile + CUDA graphs for the draft
   step): compile time, tokens/s, ratio, and whether the text equals compile off.
Sections run in that order under ``--time-budget`` seconds; one that does not
fit in what is left is skipped (and said so), and the report is rewritten
after every section, so a run killed by an outer timeout keeps what it measured.
The target (ensemble >= 0.75x of 1/(sum of members' per-token times)) is
reported, not asserted. Exits 1 only when a section crashed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")

# The real configs (what config.json of the released models says about shapes).
REAL = {
    "qwen2.5-7b": ("qwen2.5-coder-0.5b-instruct", {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 32768,
        "use_sliding_window": False, "sliding_window": None,
    }),
    "llama3.1-8b": ("smollm2-135m-instruct", {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "max_position_embeddings": 131072,
    }),
}
# --cpu-smoke: same vocabularies, tiny everything else
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}

# Over 128 tokens in both tokenizers (templates included): every draft step of a 64-token
# answer then falls in the compiled step's 256-key bucket, so fewer graphs are compiled.
PROMPT = ("You are reviewing a short report before it goes out. The report says that a small bakery sold 48 loaves "
          "of bread on Monday, half as many on Tuesday, and twice as many on Wednesday as on Monday. It also says "
          "that each loaf costs three dollars and that the bakery spent ninety dollars on flour for the week. "
          "Check every number, explain each step in plain words, and then write the weekly profit as one sentence. "
          "Keep the answer short, use no tables, and say clearly which of the numbers in the report were wrong.")
WINDOW = 10
LOG: list[str] = []
DATA: dict = {"sections": {}}
FAILS: list[str] = []


def say(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def write_report() -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "real_shapes.md").write_text("\n".join(LOG) + "\n")
        (Path(out) / "real_shapes.json").write_text(json.dumps(DATA, indent=1, default=str) + "\n")


def table(cols: list[str], rows: list[list]) -> str:
    cells = [[c if isinstance(c, str) else _num(c) for c in r] for r in rows]
    w = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda r: "| " + " | ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in cells])


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


# -- building --------------------------------------------------------------------------


def build(out: Path) -> None:
    """config.json (real shapes, the tokenizer model's bos/eos) and tokenizer files; no weights."""
    sys.path.insert(0, str(ROOT))
    from specem_fast.hub.fetch import model_dir

    for name, (tok_from, cfg) in REAL.items():
        src = model_dir(tok_from)
        src_cfg = json.loads((src / "config.json").read_text())
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        full = {**cfg, "bos_token_id": src_cfg.get("bos_token_id"), "eos_token_id": src_cfg.get("eos_token_id")}
        (folder / "config.json").write_text(json.dumps(full, indent=1) + "\n")
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, folder / f)
        print(folder)


def smoke_folders(folders: list[Path], tmp: Path) -> list[Path]:
    """Copies of the folders whose config.json has the tiny smoke shape (tokenizers linked)."""
    out = []
    for f in folders:
        dst = tmp / f.name
        dst.mkdir()
        cfg = json.loads((f / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **SMOKE_SHAPE}))
        for t in TOKENIZER_FILES:
            if (f / t).exists():
                os.symlink((f / t).resolve(), dst / t)
        out.append(dst)
    return out


def word_rows(tok, vocab_size: int):
    """Bool [vocab_size]: ids the random model may produce (plain word tokens of its tokenizer)."""
    import torch

    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tok.all_special_ids)
    pat = re.compile(r"(\u0120|\u2581)?[A-Za-z]{2,12}")
    ids = [i for t, i in tok.get_vocab().items() if i < vocab_size and i not in special and pat.fullmatch(t)]
    allowed[ids] = True
    return allowed


# -- measuring -------------------------------------------------------------------------


class Clock:
    """Wall seconds with the device drained before and after (the engine's own
    rounds end in device->host reads, so this only guards the edges)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.s = time.perf_counter() - self.t0

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


class DraftClock:
    """Each member's draft-phase wall time and sampled tokens inside an ensemble.

    Wraps each member's draft call on this instance only. That call ends with the
    round's one device->host read of the sampled tokens, so its wall time covers
    the member's device work (catch-up forward, decode steps, sampling).
    """

    def __init__(self, ens):
        self.s: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        members = getattr(ens, "members", None)
        self.ok = isinstance(members, dict)
        if not self.ok:
            return
        for m, member in members.items():
            member.draft = self._timed(m, member.draft)

    def _timed(self, m, orig):
        def timed(calls):
            t0 = time.perf_counter()
            drafts = orig(calls)
            self.s[m] = self.s.get(m, 0.0) + time.perf_counter() - t0
            self.tokens[m] = self.tokens.get(m, 0) + sum(len(d.tokens) for d in drafts)
            return drafts

        return timed

    def reset(self):
        self.s.clear()
        self.tokens.clear()

    def ms_per_step(self, m: str) -> float | None:
        return 1e3 * self.s[m] / self.tokens[m] if self.tokens.get(m) else None


class Budget:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()

    def allows(self, need: float, what: str) -> bool:
        if self.left() >= need:
            return True
        say(f"{what}: skipped, {self.left():.0f}s of the time budget left (needs about {need:.0f}s)")
        DATA["sections"].setdefault("skipped", []).append(what)
        return False


def section(name: str):
    """Run a section; a crash is reported (with its traceback) and the script goes on."""

    def wrap(fn):
        def run(*args, **kw):
            t0 = time.time()
            try:
                return fn(*args, **kw)
            except Exception as e:  # noqa: BLE001 - report and keep going
                traceback.print_exc()
                say(f"{name}: FAILED {type(e).__name__}: {str(e)[:400]}")
                FAILS.append(f"{name}: {type(e).__name__}: {e}")
                return None
            finally:
                say(f"({name}: {time.time() - t0:.1f}s)")
                write_report()

        return run

    return wrap


# -- the run ---------------------------------------------------------------------------


class Bench:
    """The sections, over members built once (eager and compiled runners share their weights)."""

    def __init__(self, folders: list[Path], smoke: bool, new_tokens: int, budget: Budget):
        import torch

        self.torch = torch
        self.smoke, self.budget, self.n = smoke, budget, new_tokens
        self.cuda = not smoke
        self.dev = "cpu" if smoke else "cuda"
        self.dtype = "float32" if smoke else "bfloat16"
        self.folders = {f.name: f for f in folders}
        self.names = list(self.folders)
        self.models: dict = {}
        self._runners: dict = {}
        self.alone: dict = {}  # member -> numbers measured alone
        self.compiled_alone: dict = {}  # member -> its compiled draft loop alone
        self.eager_text: str | None = None
        self.clock = lambda: Clock(self.cuda)
        self.batches = (1, 2) if smoke else (1, 8)  # scoring problems: requests of 3 candidates x 10 tokens

    def config(self, compile: bool = False):
        from specem_fast.config import EngineConfig

        return EngineConfig(device=self.dev, dtype=self.dtype, cache_tokens=1024, max_batch=1, kernels="auto",
                            flash_attn="auto", compile=compile)

    def runners(self, compile: bool = False) -> dict:
        """One runner per member around its built model (each ensemble re-attaches their caches)."""
        from specem_fast.model.runner import ModelRunner

        if compile not in self._runners:
            self._runners[compile] = {
                n: ModelRunner(n, self.folders[n], self.dev, self.dtype, "auto", "auto", compile, model=self.models[n])
                for n in self.names}
        return self._runners[compile]

    def ensemble(self, runners: dict, names: list[str], compile: bool = False):
        from specem_fast import Ensemble

        return Ensemble({n: runners[n] for n in names}, list(names), list(names), self.config(compile))

    # 0. members
    def build(self) -> None:
        torch = self.torch
        from specem_fast.model.modeling.args import ModelArgs
        from specem_fast.model.modeling.loader import random_transformer, read_config
        from specem_fast.model.text import TextCodec

        rows = []
        for i, (name, folder) in enumerate(self.folders.items()):
            with self.clock() as c:
                args = ModelArgs.from_hf_config(read_config(folder))
                model = random_transformer(args, self.dev, getattr(torch, self.dtype), seed=i)
                tok = TextCodec(folder).tok
                allowed = word_rows(tok, args.vocab_size).to(self.dev)
                model.lm_head_weight.masked_fill_(~allowed[:, None], 0.0)
            self.models[name] = model
            params = sum(p.numel() for p in model.parameters())
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            rows.append([name, args.arch, args.num_layers, args.hidden_size, f"{args.num_heads}/{args.num_kv_heads}",
                         args.intermediate_size, args.vocab_size, int(allowed.sum()), params / 1e9, size / 2**30, c.s])
            DATA.setdefault("models", {})[name] = dict(arch=args.arch, layers=args.num_layers,
                                                       hidden=args.hidden_size, vocab=args.vocab_size,
                                                       params=params, bytes=size, build_s=c.s)
        say("## members (random weights, built on the device)")
        say(table(["member", "arch", "layers", "hidden", "heads/kv", "ffn", "vocab", "word ids", "params B", "GiB",
                   "build s"], rows))

    # 1. alone
    @section("members alone")
    def members_alone(self) -> None:
        say(f"\n## members alone, batch 1, greedy, {self.n} new tokens, compile off")
        rs = self.runners()
        rows = []
        for name in self.names:  # the draft loop alone: a one-member ensemble (one candidate, no verify pass)
            if not self.budget.allows(5 if self.smoke else 20, f"draft loop alone {name}"):
                continue
            self.alone.setdefault(name, {}).update(self._draft_loop_alone(rs, name, compile=False))
        ens = self.ensemble(rs, self.names)  # plain decoding, one token per engine round (the README's baseline)
        try:
            for name in self.names:
                if not self.budget.allows(5 if self.smoke else 20, f"generate_single {name}"):
                    continue
                ens.generate_single(name, PROMPT, max_new_tokens=self.n, ignore_eos=True)
                with self.clock() as c:
                    res = ens.generate_single(name, PROMPT, max_new_tokens=self.n, ignore_eos=True)
                a = self.alone.setdefault(name, {})
                a.update(prompt_tokens=res.prompt_tokens, prefill_ms=1e3 * res.first_token_s, wall_s=c.s,
                         decode_ms=1e3 * (res.seconds - res.first_token_s) / max(1, res.new_tokens - 1),
                         new_tokens=res.new_tokens)
        finally:
            ens.close()
        for name in self.names:
            a = self.alone.get(name, {})
            rows.append([name, a.get("prompt_tokens"), a.get("prefill_ms"), a.get("decode_ms"),
                         1e3 / a["decode_ms"] if a.get("decode_ms") else None, a.get("draft_loop_ms"),
                         a.get("draft_step_ms")])
        say(table(["member", "prompt tokens", "prefill ms", "ms/token generate_single", "tokens/s",
                   "ms/token draft loop", "ms/draft step"], rows))
        say("generate_single: one token per engine round (a host read per token); draft loop: the member as a "
            "one-member ensemble, window tokens per round (wall time per token); draft step: its draft phase per "
            "sampled token (catch-up forward, decode steps, sampling; the round's one host read)")
        DATA["alone"] = self.alone

    def _draft_loop_alone(self, runners: dict, name: str, compile: bool) -> dict:
        """One member drafting alone (a one-member ensemble: one candidate, no verify pass)."""
        ens = self.ensemble(runners, [name], compile)
        drafts = DraftClock(ens)
        try:
            with self.clock() as warm:
                ens.generate(PROMPT, window=WINDOW, max_new_tokens=self.n)
            drafts.reset()
            with self.clock() as c:
                res = ens.generate(PROMPT, window=WINDOW, max_new_tokens=self.n)
        finally:
            ens.close()
        return dict(draft_loop_ms=1e3 * c.s / res.new_tokens, draft_step_ms=drafts.ms_per_step(name),
                    draft_loop_tokens=res.new_tokens, warmup_s=warm.s)

    def _ensemble_run(self, runners: dict, compile: bool) -> dict:
        """A warm-up run of the same length (the same greedy text, so every Triton specialisation
        and compiled shape exists before the measured run), then the measured run."""
        ens = self.ensemble(runners, self.names, compile)
        drafts = DraftClock(ens)
        try:
            with self.clock() as warm:
                first = ens.generate(PROMPT, window=WINDOW, max_new_tokens=self.n)
            drafts.reset()
            with self.clock() as c:
                res = ens.generate(PROMPT, window=WINDOW, max_new_tokens=self.n)
        finally:
            ens.close()
        t = res.timings
        k = max(1, len(res.rounds))
        verified = len(res.rounds) - res.skipped_verify
        out = dict(text=res.text, stop_reason=res.stop_reason, new_tokens=res.new_tokens,
                   tokens_per_model=res.tokens_per_model, rounds=len(res.rounds),
                   verified_rounds=verified, wall_s=c.s, warmup_s=warm.s,
                   tokens_per_s=res.new_tokens / c.s, draft_ms_round=1e3 * t["draft_s"] / k,
                   verify_ms_round=1e3 * t["verify_s"] / max(1, verified), commit_ms_round=1e3 * t["commit_s"] / k,
                   draft_ms_step={m: drafts.ms_per_step(m) for m in self.names} if drafts.ok else {},
                   warmup_text_same=first.text == res.text, kernels=res.metadata["kernels"])
        sum_t = sum(self.alone.get(m, {}).get("decode_ms") or math.nan for m in self.names) / 1e3
        out["target_tokens_per_s"] = 1 / sum_t if sum_t == sum_t else None
        out["ratio"] = out["tokens_per_s"] * sum_t if sum_t == sum_t else None
        loop_t = sum(self.alone.get(m, {}).get("draft_loop_ms") or math.nan for m in self.names) / 1e3
        out["ratio_draft_loop"] = out["tokens_per_s"] * loop_t if loop_t == loop_t else None
        return out

    def _report_ensemble(self, r: dict, label: str) -> None:
        say(table(["ensemble", "new tokens", "tokens/model", "rounds (verified)", "wall s", "tokens/s",
                   "1/(sum members) tok/s", "ratio", "ratio vs draft loops", "draft ms/round", "verify ms/verified round",
                   "commit ms/round"],
                  [[label, r["new_tokens"], "/".join(map(str, r["tokens_per_model"].values())),
                    f"{r['rounds']} ({r['verified_rounds']})", r["wall_s"], r["tokens_per_s"],
                    r["target_tokens_per_s"], r["ratio"], r["ratio_draft_loop"], r["draft_ms_round"],
                    r["verify_ms_round"], r["commit_ms_round"]]]))
        say(f"stop: {r['stop_reason']}; kernels: {r['kernels']}; warm-up {r['warmup_s']:.1f}s; ratio = tokens/s x "
            "(sum of the members' generate_single ms/token); the verify pass is every verifier's forward over the "
            "packed candidates plus the grouped scoring launch and its host read")
        if r["draft_ms_step"]:
            say(table(["member", f"ms/draft step in ensemble ({label})", "ms/draft step alone (compile off)",
                       "in/alone"],
                      [[m, r["draft_ms_step"].get(m), self.alone.get(m, {}).get("draft_step_ms"),
                        _ratio(r["draft_ms_step"].get(m), self.alone.get(m, {}).get("draft_step_ms"))]
                       for m in self.names]))
        else:
            say("(per-member draft times unavailable: the ensemble has no members to time)")

    # 2. ensemble
    @section("ensemble")
    def ensemble_eager(self) -> None:
        say(f"\n## ensemble of {len(self.names)}, window {WINDOW}, greedy, {self.n} new tokens, compile off")
        if not self.budget.allows(10 if self.smoke else 40, "ensemble"):
            return
        r = self._ensemble_run(self.runners(), compile=False)
        self.eager_text = r["text"]
        DATA["sections"]["ensemble"] = r
        self._report_ensemble(r, "compile off")

    # 3. scoring kernel
    @section("scoring kernel")
    def scoring(self) -> None:
        torch = self.torch
        say("\n## segment scoring at the members' LM-head shapes: Triton kernel vs eager torch")
        if not self.budget.allows(10 if self.smoke else 30, "scoring kernel"):
            return
        K = sys.modules["specem_fast.kernels"]
        bk = _bench_kernels()
        rows, data = [], []
        probs = {}
        for i, name in enumerate(self.names):
            w = self.models[name].lm_head_weight
            if self.smoke:  # the interpreter is ~1000x slower than a GPU: a slice of the head
                w = w[:256]
            v, d = w.shape
            for batch in self.batches:
                n = batch * 3 * 10  # 3 candidates x 10 tokens per request
                g = torch.Generator(device=self.dev).manual_seed(i * 10 + batch)
                h = torch.randn(n, d, generator=g, device=self.dev).to(w.dtype)
                t = torch.randint(0, v, (n,), generator=g, device=self.dev)
                o = torch.arange(0, n + 1, 10, device=self.dev)
                probs[name, batch] = (h, w, t, o)
                kern = lambda: K.segment_score(h, w, t, o, check_values=False)  # noqa: E731
                chunked = lambda: K.segment_score_torch(h, w, t, o)  # noqa: E731
                full = lambda: bk.eager_score(h, w, t, o)  # noqa: E731
                err = (kern().token_logprob - chunked().token_logprob).abs().max().item()
                tk, tc, tf = bk.bench_time(kern), bk.bench_time(chunked), bk.bench_time(full)
                rows.append([f"{name} batch {batch}", f"N={n} d={d} V={v}", 1e6 * tk, 1e6 * tc, 1e6 * tf, tc / tk,
                             tf / tk, f"{err:.1e}"])
                data.append(dict(member=name, batch=batch, n=n, d=d, v=v, kernel_us=1e6 * tk, torch_chunked_us=1e6 * tc,
                                 torch_full_us=1e6 * tf, max_err=err))
        for batch in self.batches:  # both verifiers in one launch, as the engine scores a round
            ps = [probs[name, batch] for name in self.names]
            grouped = lambda: K.segment_score_grouped(ps, check_values=False)  # noqa: E731
            each = lambda: [K.segment_score_torch(*p) for p in ps]  # noqa: E731
            full = lambda: [bk.eager_score(*p) for p in ps]  # noqa: E731
            tg, te, tf = bk.bench_time(grouped), bk.bench_time(each), bk.bench_time(full)
            rows.append([f"grouped, both, batch {batch}", "+".join(f"N={p[0].shape[0]}" for p in ps), 1e6 * tg,
                         1e6 * te, 1e6 * tf, te / tg, tf / tg, ""])
            data.append(dict(member="grouped", batch=batch, kernel_us=1e6 * tg, torch_chunked_us=1e6 * te,
                             torch_full_us=1e6 * tf))
        say(table(["problem", "shape", "kernel us", "torch chunked us", "torch full-logits us", "speedup chunked",
                   "speedup full", "max err"], rows))
        say("torch chunked: kernels.segment_score_torch (the engine's CPU path); full-logits: hidden @ W.T -> "
            "float -> log_softmax -> gather" + ("; CPU smoke: Triton interpreter, first 256 vocab rows" if self.smoke
                                                else ""))
        DATA["sections"]["scoring"] = data

    # 4. compile
    @section("compile")
    def compiled(self) -> None:
        from specem_fast.model.decode_step import compile_problem

        say(f"\n## compile=True (torch.compile of the draft step{'' if self.smoke else ' + CUDA graphs'})")
        problem = compile_problem(self.torch.device(self.dev))
        if problem:
            say(f"compile: skipped, {problem}")
            DATA["sections"]["compile"] = dict(skipped=problem)
            return
        if not self.budget.allows(15 if self.smoke else 90, "compile ensemble"):
            return
        rs = self.runners(compile=True)
        r = self._ensemble_run(rs, compile=True)
        r["text_same_as_compile_off"] = None if self.eager_text is None else r["text"] == self.eager_text
        DATA["sections"]["compile"] = r
        say(f"compile + first run (every draft shape compiled): {r['warmup_s']:.1f}s")
        self._report_ensemble(r, "compile on")
        same = r["text_same_as_compile_off"]
        say(f"text equals compile off: {same}" + ("" if same is not False else
                                                  f" (first difference at character {_first_diff(r['text'], self.eager_text)};"
                                                  " bf16 near-ties of random weights can flip a greedy pick)"))
        write_report()
        alone = self.compiled_alone
        for name in self.names:  # the compiled draft loop alone; a new cache is compiled again
            if not self.budget.allows(10 if self.smoke else 60, f"compiled draft loop alone {name}"):
                continue
            alone[name] = self._draft_loop_alone(rs, name, compile=True)
        if alone:
            say(table(["member", "ms/token draft loop compiled", "eager", "ms/draft step compiled", "eager",
                       "ms/draft step in compiled ensemble", "compile + first run s"],
                      [[m, a["draft_loop_ms"], self.alone.get(m, {}).get("draft_loop_ms"), a["draft_step_ms"],
                        self.alone.get(m, {}).get("draft_step_ms"), r["draft_ms_step"].get(m), a["warmup_s"]]
                       for m, a in alone.items()]))
            r["alone"] = alone
            if len(alone) == len(self.names):
                loop_t = sum(a["draft_loop_ms"] for a in alone.values()) / 1e3
                r["ratio_compiled_draft_loops"] = r["tokens_per_s"] * loop_t
                say(f"compiled ensemble vs 1/(sum of compiled draft loops alone): {r['ratio_compiled_draft_loops']:.2f}x")
        write_report()

    def summary(self) -> None:
        say("\n## summary (target: ensemble >= 0.75x of 1/(sum of members' per-token times); reported, not asserted)")
        for key, label in (("ensemble", "compile off"), ("compile", "compile on")):
            r = DATA["sections"].get(key)
            if isinstance(r, dict) and r.get("ratio") is not None:
                verdict = "meets" if r["ratio"] >= 0.75 else "below"
                say(f"{label}: {r['tokens_per_s']:.1f} tokens/s = {r['ratio']:.2f}x of 1/(sum of members' "
                    f"generate_single per-token times) -> {verdict} 0.75x")
        if self.cuda:
            say(f"peak GPU memory: {self.torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def _ratio(a, b):
    return a / b if a and b else None


def _first_diff(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _sibling(stem: str):
    """Another script of benchmarks/ as a module (they are not a package), loaded once."""
    name = f"{stem}_bypath"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{stem}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _bench_kernels():
    return _sibling("bench_kernels")


def load_checkout():
    """specem_fast from this checkout, kernels/ as specem_fast.kernels (engine_cuda_check's loader)."""
    return _sibling("engine_cuda_check").load_checkout()


def run(folders: list[Path], a) -> int:
    budget = Budget(a.time_budget)
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        print("real_shapes: no CUDA device", file=sys.stderr)
        return 2
    load_checkout()
    import triton

    if a.cpu_smoke:
        from specem_fast.model import decode_step

        torch.set_num_threads(1)
        # the compile section's logic (padded buckets, sink writes) without the C++ compile time
        decode_step.FORCE_BUCKETS = True
        decode_step.COMPILER = lambda fn, **kw: fn
    say(f"# real_shapes {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if a.cpu_smoke:
        say(f"device: cpu smoke run (tiny shapes {SMOKE_SHAPE}, identity compiler), torch {torch.__version__}, "
            f"triton {triton.__version__}")
    else:
        p = torch.cuda.get_device_properties(0)
        say(f"device: {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"triton {triton.__version__}, cuda {torch.version.cuda}")
    say(f"time budget {a.time_budget:.0f}s; prompt {len(PROMPT)} characters; window {WINDOW}; "
        f"{a.new_tokens} new tokens")
    DATA.update(device="cpu-smoke" if a.cpu_smoke else torch.cuda.get_device_name(), new_tokens=a.new_tokens,
                window=WINDOW, time_budget=a.time_budget)
    tmp = None
    try:
        if a.cpu_smoke:
            tmp = Path(tempfile.mkdtemp(prefix="real_shapes_"))
            folders = smoke_folders(folders, tmp)
        b = Bench(folders, a.cpu_smoke, a.new_tokens, budget)
        b.build()
        write_report()
        b.members_alone()
        b.ensemble_eager()
        b.scoring()
        if not a.no_compile:
            b.compiled()
        b.summary()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"real_shapes: {'OK' if not FAILS else f'{len(FAILS)} SECTION(S) FAILED: {FAILS}'} "
        f"({a.time_budget - budget.left():.0f}s)")
    DATA["failures"] = FAILS
    write_report()
    return 1 if FAILS else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, help="folders written by --build (config.json + tokenizer)")
    ap.add_argument("--build", type=Path, help="write the real-shape folders (no weights) here and exit")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (tests this script)")
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds for all sections (default 400)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per measured run (default 64; smoke 20)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile=True section")
    a = ap.parse_args(argv)
    if a.build:
        build(a.build)
        return 0
    if len(a.folders) < 2:
        print("real_shapes: give the two model folders (see --build)", file=sys.stderr)
        return 2
    if a.new_tokens is None:
        a.new_tokens = 20 if a.cpu_smoke else 64
    return run(a.folders, a)


if __name__ == "__main__":
    sys.exit(main())
