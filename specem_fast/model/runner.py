"""One model of the ensemble: weights, tokenizer, its KV cache, its kernels.

The runtime turns "runs" of tokens (a causal chunk of one request, or one
verify branch) into a single flat forward over all requests, and scores packed
candidates with the segment-scoring kernel (Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from specem_fast import kernels
from specem_fast.config import FLASH_ATTN_CHOICES, env_choice
from specem_fast.model.backends import check_backend
from specem_fast.model.decode_step import CompiledDecode
from specem_fast.errors import SpecEMError
from specem_fast.model.kv_cache import CacheShape, ModelCache
from specem_fast.model.modeling.loader import load_transformer, read_config
from specem_fast.model.modeling.transformer import AttnMeta, Transformer
from specem_fast.model.text import TextCodec, generation_eos

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# flash_attn="auto" sends the prefix part through flash-attn from this prefix
# length on. Below it the second attention launch and the merge cost more than
# flash-attn can save over the branch kernel's own prefix pass. The value is a
# guess until benchmarks/gpu_check.py has measured both paths on a GPU.
FLASH_MIN_PREFIX = 1024


@dataclass
class Run:
    """Tokens of one request fed in one forward.

    They are written at physical cache positions ``qpos, qpos+1, ...`` with
    logical positions ``pos, pos+1, ...``; each sees the cache below
    ``prefix_len`` and the earlier tokens of this run. A causal chunk has
    ``qpos == prefix_len == pos``; a verify branch sits in scratch space above
    the prefix it extends.
    """

    slot: int
    tokens: list[int]
    qpos: int
    prefix_len: int
    pos: int


@dataclass
class DraftStep:
    """One planned decode step of a draft round (see :meth:`ModelRunner.plan_draft`)."""

    rows: list[int]  # requests of the round fed at this step, in order
    keep: torch.Tensor | None  # their rows in the previous step's sampled tokens (None: all, in order)
    meta: AttnMeta | None  # placement and attention plan (device tensors sliced from one copy); None if compiled
    refed: int  # tokens written below a committed high-water mark (cost accounting)
    dense: object | None = None  # the compiled step's inputs (compile=True)
    tokens: torch.Tensor | None = None  # set by the draft loop: the step's tokens, on the device


class ModelRunner:
    def __init__(self, name: str, folder: Path, device: str, dtype: str | None, kernel_setting: str,
                 flash_setting: str = "auto", compile: bool = False, *, model: Transformer | None = None):
        """``model``: an already-built Transformer (on ``device``, in ``dtype``) to use instead of
        loading the folder's weights, e.g. random weights at real shapes for benchmarks; the
        folder then needs only config.json (which must describe ``model``) and the tokenizer."""
        self.name = name
        self.folder = folder
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        self.triton = check_backend(self.device, kernel_setting, compile)  # before any weights load
        cfg = read_config(folder)
        if model is None:
            model = load_transformer(folder, self.device, self.dtype, cfg)
        else:
            _check_given_model(model, cfg, self.device, self.dtype)
        self.model: Transformer = model
        self.codec = TextCodec(folder, generation_eos(folder, cfg))
        self.flash_min_prefix = self._flash_threshold(flash_setting)
        self.flash_checked = False  # the cascade is compared with the branch kernel on its first call
        self.cache: ModelCache | None = None  # the engine's: attached before the first forward
        self.compile = compile
        self.compiled: CompiledDecode | None = None  # build_compiled_step(), once the cache is attached
        self.tokens_fed = 0  # every token this model ever processed (cost accounting)
        self.tokens_refed = 0  # of those, tokens written below a committed high-water mark

    def build_compiled_step(self) -> None:
        """With ``compile=True``, build the compiled draft step over the attached cache (its
        buffers are the cache's; torch.compile traces at the first draft); else nothing."""
        self.compiled = CompiledDecode(self.model, self.cache) if self.compile else None

    @property
    def cache_shape(self) -> CacheShape:
        a = self.model.args
        return CacheShape(self.name, a.num_layers, a.num_kv_heads, a.head_dim, self.dtype, self.device,
                          sink=self.compile)

    @property
    def kernel_path(self) -> str:
        if not self.triton:
            return "torch"
        if self.flash_min_prefix is None:
            return "triton"
        return f"triton+{kernels.prefix_backend().name}(prefix>={self.flash_min_prefix})"

    def _flash_threshold(self, setting: str) -> int | None:
        """Shortest prefix whose attention goes through flash-attn (cascade path); None: never."""
        choice = env_choice("SPECEM_FLASH_ATTN", setting, FLASH_ATTN_CHOICES)
        if choice not in FLASH_ATTN_CHOICES:
            raise SpecEMError(f"flash_attn must be auto, on or off (got {choice!r})")
        if choice == "off":
            return None
        backend = kernels.prefix_backend()
        problem = None
        if not self.triton:
            problem = "it needs the Triton kernel path (kernels='triton', or 'auto' on CUDA)"
        elif backend is None:
            problem = "flash-attn is not installed (install the [gpu] extra on a CUDA machine)"
        elif self.dtype not in backend.dtypes:
            problem = f"{backend.name} takes float16/bfloat16 but model {self.name} runs in {str(self.dtype)[6:]}"
        if choice == "on":
            if problem:
                raise SpecEMError(f"flash_attn='on' cannot be used: {problem}; or set flash_attn='auto'/'off'")
            return 1
        return FLASH_MIN_PREFIX if problem is None and self.device.type == "cuda" else None

    # -- forward -------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, runs: list[Run] | DraftStep) -> torch.Tensor:
        """Hidden states [sum of run lengths, d], runs concatenated in order.

        A planned draft step (:meth:`plan_draft`, its ``tokens`` set to a device
        tensor) comes instead of runs: nothing is built or copied then.
        """
        if isinstance(runs, DraftStep):
            return self._decode(runs)
        cols: dict[str, list[int]] = {k: [] for k in ("tok", "slot", "qpos", "pl", "bs", "pos")}
        for r in runs:
            n = len(r.tokens)
            self.cache.check_room(r.slot, r.qpos + n)
            self.tokens_refed += max(0, min(self.cache.high[r.slot] - r.qpos, n))
            cols["tok"] += r.tokens
            cols["slot"] += [r.slot] * n
            cols["qpos"] += range(r.qpos, r.qpos + n)
            cols["pl"] += [r.prefix_len] * n
            cols["bs"] += [r.qpos] * n
            cols["pos"] += range(r.pos, r.pos + n)
        # one host->device copy for every index column
        t = torch.tensor(list(cols.values()), dtype=torch.long).to(self.device)
        tok, slot, qpos, pl, bs, pos = t
        meta = self._meta(slot=slot, qpos=qpos, prefix_len=pl, branch_start=bs, positions=pos, slot_h=cols["slot"],
                          qpos_h=cols["qpos"], prefix_len_h=cols["pl"], branch_start_h=cols["bs"])
        self.tokens_fed += len(cols["tok"])
        return self.model(tok, pos, meta, self._attend_meta)

    def _meta(self, *, slot, qpos, prefix_len, branch_start, positions, slot_h: list[int], qpos_h: list[int],
              prefix_len_h: list[int], branch_start_h: list[int]) -> AttnMeta:
        """Attention metadata (device tensors) with its launch plan built from the same values
        on the host (``*_h``) before the forward: no layer reads indices back from the device."""
        pl_h, bs_h = prefix_len_h, branch_start_h
        meta = AttnMeta(slot=slot, qpos=qpos, prefix_len=prefix_len, branch_start=branch_start, positions=positions,
                        max_prefix=max(pl_h, default=0))
        if not self.triton:
            meta.ref_plan = kernels.plan_branch_attention_reference(slot_h, qpos_h, self.device)
            return meta
        a = self.model.args
        plan_args = dict(num_heads=a.num_heads, k_shape=tuple(self.cache.k.shape[1:]), dtype=self.dtype,
                         device=self.device)
        meta.plan = kernels.plan_branch_attention_host(slot_h, qpos_h, pl_h, bs_h, **plan_args)
        if self.flash_min_prefix is not None and meta.max_prefix >= self.flash_min_prefix and 0 in a.windows:
            meta.cascade = kernels.plan_cascade_attention_host(slot_h, qpos_h, pl_h, bs_h, **plan_args)
        return meta

    def _decode_meta(self, slot, qpos, slot_h: list[int], qpos_h: list[int]) -> AttnMeta:
        """A draft step's metadata: one token per row at its request's end, so its prefix
        length, branch start and logical position are all its cache position."""
        return self._meta(slot=slot, qpos=qpos, prefix_len=qpos, branch_start=qpos, positions=qpos, slot_h=slot_h,
                          qpos_h=qpos_h, prefix_len_h=qpos_h, branch_start_h=qpos_h)

    # -- draft steps -----------------------------------------------------------
    def plan_draft(self, slots: list[int], starts: list[int], counts: list[int]) -> list[DraftStep]:
        """Every decode step of one draft round, placed on the host at round start.

        Request i feeds ``counts[i]`` tokens at cache positions ``starts[i], +1, ...``;
        step j feeds the requests with ``counts[i] > j``, in order, and takes its
        tokens from the rows of step j-1's sampled tokens (the requests with
        ``counts[i] >= j``). All index tensors of the round travel to the device
        in one copy and are sliced per step, and each step's attention plan is
        built here, so a step makes no host<->device transfer.
        """
        steps_h = []
        for j in range(max(counts, default=0)):
            prev = [i for i, c in enumerate(counts) if c >= j]
            rows = [i for i in prev if counts[i] > j]
            keep = None if len(rows) == len(prev) else [prev.index(i) for i in rows]
            qpos = [starts[i] + j for i in rows]
            slot = [slots[i] for i in rows]
            for s, p in zip(slot, qpos):
                self.cache.check_room(s, p + 1)
            refed = sum(1 for s, p in zip(slot, qpos) if p < self.cache.high[s])
            steps_h.append((rows, keep, slot, qpos, refed))
        flat: list[int] = []
        for rows, keep, slot, qpos, _ in steps_h:
            flat += slot + qpos + (keep or [])
        if self.compile and (self.compiled is None or self.compiled.cache is not self.cache):
            raise SpecEMError(f"{self.name}: compile=True needs build_compiled_step() after the cache is attached")
        dense = self.compiled.plan(steps_h) if self.compiled is not None else [None] * len(steps_h)
        packed = torch.tensor(flat, dtype=torch.long).to(self.device)
        steps, at = [], 0
        for (rows, keep, slot_h, qpos_h, refed), dn in zip(steps_h, dense):
            n = len(rows)
            slot, qpos = packed[at : at + n], packed[at + n : at + 2 * n]
            at += 2 * n
            keep_t = None
            if keep is not None:
                keep_t = packed[at : at + n]
                at += n
            meta = None if dn is not None else self._decode_meta(slot, qpos, slot_h, qpos_h)
            steps.append(DraftStep(rows=rows, keep=keep_t, meta=meta, refed=refed, dense=dn))
        return steps

    def _decode(self, step: DraftStep) -> torch.Tensor:
        """Hidden states [rows, d] of one planned draft step; its tokens stay on the device."""
        tokens = step.tokens
        self.tokens_fed += len(step.rows)
        self.tokens_refed += step.refed
        if step.dense is not None:
            return self.compiled(tokens, step.dense)
        return self.model(tokens, step.meta.positions, step.meta, self._attend_meta)

    def _attend_meta(self, layer: int, q, k, v, meta: AttnMeta, scale: float, window: int,
                     softcap: float | None = None) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache[meta.slot, :, meta.qpos] = k.to(k_cache.dtype)
        v_cache[meta.slot, :, meta.qpos] = v.to(v_cache.dtype)
        args = (q, k_cache, v_cache, meta.slot, meta.qpos, meta.prefix_len, meta.branch_start, scale, window)
        cap = {"softcap": softcap} if softcap else {}  # attention soft-capping (Gemma-2), a keyword of every kernel
        if not self.triton:
            return kernels.branch_attention_reference(*args, plan=meta.ref_plan, **cap)
        if window == 0 and self.flash_min_prefix is not None and meta.max_prefix >= self.flash_min_prefix:
            if meta.cascade is None:
                meta.cascade = kernels.plan_cascade_attention(q, k_cache, meta.slot, meta.qpos, meta.prefix_len,
                                                              meta.branch_start)
            if self.flash_checked:
                return kernels.cascade_attention(*args, plan=meta.cascade, **cap)
            out = self._first_cascade(args, meta, cap)
            if out is not None:
                return out
        if meta.plan is None:  # one host sync per forward, not per layer
            meta.plan = kernels.plan_branch_attention(q, k_cache, meta.slot, meta.qpos, meta.prefix_len, meta.branch_start)
        return kernels.branch_attention(*args, plan=meta.plan, **cap)

    def _first_cascade(self, args: tuple, meta: AttnMeta, cap: dict) -> torch.Tensor | None:
        """Once per model: the flash-attn cascade against our branch kernel on a real call.

        flash-attn is a separately built library whose versions differ in
        signatures, layouts and LSE conventions; an error or a disagreement
        turns the cascade off with a warning (and returns None) instead of
        failing or changing the answers.
        """
        self.flash_checked = True
        if meta.plan is None:
            meta.plan = kernels.plan_branch_attention(*args[:2], *args[3:7])
        ref = kernels.branch_attention(*args, plan=meta.plan, **cap).float()
        try:
            out = kernels.cascade_attention(*args, plan=meta.cascade, **cap)
        except Exception as e:  # noqa: BLE001 - any failure of the optional path falls back
            problem = f"fails ({type(e).__name__}: {e})"
        else:
            err = (out.float() - ref).abs().max().item()
            tol = 1e-3 if out.dtype == torch.float32 else 3e-2
            if err <= tol + 2e-2 * ref.abs().max().item():
                return out
            problem = f"disagrees with the branch kernel (max abs error {err:.3g})"
        warnings.warn(f"{self.name}: flash-attn cascade attention {problem}; using the branch kernel only",
                      RuntimeWarning, stacklevel=2)
        self.flash_min_prefix = None
        return None

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def scoring_problem(self, rows: torch.Tensor, targets: list[int], offsets: list[int]) -> tuple:
        """Arguments of the segment-scoring kernel: row i of ``rows`` predicts ``targets[i]``."""
        _check_targets(targets, offsets, rows.shape[0], self.model.args.vocab_size)
        t = torch.tensor(targets, dtype=torch.long, device=self.device)
        o = torch.tensor(offsets, dtype=torch.long, device=self.device)
        return rows.contiguous(), self.model.lm_head_weight, t, o, self.model.args.final_softcap


@torch.inference_mode()
def score_all(runners: list[ModelRunner], problems: list[tuple]) -> list[kernels.SegmentScores]:
    """Score every verifier's packed candidates of a round.

    On the Triton path, verifiers that share a device are scored in one grouped
    launch (the "cross-model single pass"); the torch path scores each in turn.
    """
    out: list = [None] * len(problems)
    groups: dict[torch.device, list[int]] = {}
    for i, r in enumerate(runners):
        if r.triton:
            groups.setdefault(r.device, []).append(i)
        else:
            out[i] = kernels.segment_score_torch(*problems[i])
    for idx in groups.values():
        # host-side checks already ran in scoring_problem: skip the device sync
        res = kernels.segment_score_grouped([problems[i] for i in idx], check_values=False)
        for i, sc in zip(idx, res):
            out[i] = sc
    return out


def _check_given_model(model: Transformer, cfg: dict, device: torch.device, dtype: torch.dtype) -> None:
    from specem_fast.model.modeling.args import ModelArgs

    if model.args != ModelArgs.from_hf_config(cfg):
        raise SpecEMError("the given model's shapes differ from the folder's config.json; build it from that config")
    w = model.lm_head_weight
    if w.dtype != dtype or w.device.type != device.type or (device.index is not None and w.device != device):
        raise SpecEMError(f"the given model is {str(w.dtype)[6:]} on {w.device}, not {str(dtype)[6:]} on {device}")


def _check_targets(targets: list[int], offsets: list[int], n: int, vocab: int) -> None:
    if len(targets) != n or offsets[-1] != n or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("packed candidates are inconsistent: every candidate needs >= 1 token")
    if targets and not (0 <= min(targets) and max(targets) < vocab):
        raise ValueError(f"target token id outside the vocabulary of {vocab}")


def resolve_dtype(device: str | torch.device, dtype: str | None) -> torch.dtype:
    """The weights' dtype: the one asked for, else bfloat16 on CUDA and on CPUs with
    native bf16 instructions, float32 on other CPUs (emulated bf16 is slower there)."""
    if dtype is None:
        native = torch.device(device).type != "cpu" or cpu_has_native_bf16()
        dtype = "bfloat16" if native else "float32"
    return _DTYPES[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16); False where unknown."""
    return bf16_in_cpuinfo("/proc/cpuinfo")


def bf16_in_cpuinfo(cpuinfo: str) -> bool:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def memory_needs(folder: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(KV-cache bytes per request slot and cache token, weight bytes) of one model,
    from config.json and the safetensors headers alone (no weights are read)."""
    from specem_fast.model.modeling.args import ModelArgs
    from specem_fast.model.modeling.loader import check_safetensors, fix_hint, weight_files
    from specem_fast.model.quant import dense_params, read_quant_spec

    cfg = read_config(folder)
    args = ModelArgs.from_hf_config(cfg)
    quant = read_quant_spec(folder, cfg)  # a quantized checkpoint loads dequantized: count the dense weights
    size = torch.empty((), dtype=dtype).element_size()
    kv = 2 * args.num_layers * args.num_kv_heads * args.head_dim * size
    params = 0
    fix = fix_hint(folder)
    for f in weight_files(folder):
        for key, info in check_safetensors(f, fix).items():
            shape = info.get("shape") if key != "__metadata__" else None
            if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
                params += dense_params(key, shape, quant) if quant else math.prod(shape)
    return kv, params * size


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: MemAvailable on Linux for the CPU,
    the driver's free memory on CUDA; None where it cannot be read."""
    d = torch.device(device)
    if d.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(d)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
