"""The transformers backend's tensor side: a model transformers loads, its caches, its forwards.

For architectures the native runtime (:mod:`.modeling`) does not implement:
any ``AutoModelForCausalLM`` transformers builds from the folder without remote
code. Each request keeps its own transformers cache (:mod:`.hf_cache` holds
every call into it) across rounds. Verification takes one of two paths, picked
once at load by a probe that compares them on a few tokens:

- ``packed``: the pending tokens and every candidate in ONE forward, with a 4-D
  additive attention mask (each candidate sees the prefix and its own earlier
  tokens, positions restart at the prefix length; sliding-window layers get
  their window in a mask of their own);
- ``branches``: the cache copied once per group of equal-length candidates, the
  group run as a batch over the shared prefix (models with a recurrent state,
  whose state cannot be cropped or selected by position, and models that reject
  or mishandle a custom mask).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from specem_fast.errors import SpecEMError
from specem_fast.model import hf_cache
from specem_fast.model.backends import check_device
from specem_fast.model.modeling.loader import read_config
from specem_fast.model.runner import resolve_dtype
from specem_fast.model.text import generation_eos
from specem_fast.model.text import TextCodec

_SLIDING = ("sliding_attention",)
_MASKED = ("full_attention", "sliding_attention")


@dataclass
class PackedRun:
    """New tokens of one packed forward: logical positions ``pos, pos+1, ...``; each sees
    the combined (cache + new) positions below ``visible`` and the earlier tokens of this run."""

    tokens: list[int]
    pos: int
    visible: int


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class HFRunner:
    """One model run by transformers, with everything the member needs from it."""

    backend = "transformers"

    def __init__(self, name: str, folder: Path, device: str, dtype: str | None):
        self.name = name
        self.folder = Path(folder)
        self.device = check_device(device)
        self.dtype = resolve_dtype(self.device, dtype)
        cfg = read_config(self.folder)
        self.model = _load(self.folder, self.device, self.dtype)
        self.config = self.model.config
        self.codec = TextCodec(self.folder, generation_eos(self.folder, cfg))
        params = inspect.signature(self.model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        self.tokens_fed = 0
        self.recurrent = False  # some layer keeps a state that cannot be cropped (set by the probe)
        self.mode, self._mask_kind = self._probe()

    @property
    def kernel_path(self) -> str:
        return f"transformers/{self.config._attn_implementation}"

    def describe(self) -> str:
        """The one line printed at load."""
        how = "packed verify (4-D mask)" if self.mode == "packed" else "verify by branches over a copied prefix"
        return (f"{self.name}: backend transformers ({self.config.model_type}, {str(self.dtype)[6:]} on {self.device}, "
                f"{self.config._attn_implementation} attention, {how})")

    # -- forwards --------------------------------------------------------------
    def new_cache(self):
        return hf_cache.new_cache(self.config)

    @torch.inference_mode()
    def forward(self, cache, ids: torch.Tensor, pos: torch.Tensor, mask=None, last_only: bool = False) -> torch.Tensor:
        """Logits [batch, tokens (or 1), vocab] in float32 of ``ids`` [batch, tokens] at
        positions ``pos`` [batch, tokens], appended to ``cache``."""
        kw = {"logits_to_keep": 1} if last_only and self._keep_arg else {}
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, attention_mask=mask,
                         use_cache=True, **kw)
        self.tokens_fed += ids.numel()
        logits = out.logits
        if last_only:
            logits = logits[:, -1:]
        return logits.float()

    def feed(self, cache, tokens: list[int], start: int, last_only: bool = True) -> torch.Tensor:
        """A causal chunk of one request at positions ``start, ...``; logits [n or 1, vocab]."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]
        return self.forward(cache, ids, pos, last_only=last_only)[0]

    def feed_packed(self, cache, runs: list[PackedRun], kind: str | None = None) -> torch.Tensor:
        """Every run in one forward (logits [tokens, vocab]); the cache grows by all of them."""
        kind = kind or self._mask_kind
        toks = [t for r in runs for t in r.tokens]
        ids = torch.tensor([toks], dtype=torch.long, device=self.device)
        pos_l = [r.pos + j for r in runs for j in range(len(r.tokens))]
        pos = torch.tensor([pos_l], dtype=torch.long, device=self.device)
        mask = self._packed_mask(hf_cache.length(cache), runs, pos[0], kind)
        return self.forward(cache, ids, pos, mask)[0]

    def _packed_mask(self, past: int, runs: list[PackedRun], pos: torch.Tensor, kind: str):
        allowed, dist = self._packed_allowed(past, runs, pos)
        return self._mask(allowed[None], dist[None], kind)

    def _packed_allowed(self, past: int, runs: list[PackedRun], pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each new token may see [q, past + q] and its distance in positions to each key."""
        dev = self.device
        vis, start = [], []
        at = past
        for r in runs:
            vis += [r.visible] * len(r.tokens)
            start += [at] * len(r.tokens)
            at += len(r.tokens)
        q = len(vis)
        k_idx = torch.arange(past + q, device=dev)
        q_idx = torch.arange(past, past + q, device=dev)[:, None]
        vis_t = torch.tensor(vis, device=dev, dtype=torch.long)[:, None]
        start_t = torch.tensor(start, device=dev, dtype=torch.long)[:, None]
        allowed = (k_idx[None] < vis_t) | ((k_idx[None] >= start_t) & (k_idx[None] <= q_idx))
        kv_pos = torch.cat([torch.arange(past, device=dev), pos])
        return allowed, pos[:, None] - kv_pos[None]

    def feed_packed_batch(self, caches: list, held: list[int], runs: list[list[PackedRun]]
                          ) -> tuple[list[torch.Tensor | None], list]:
        """Several requests' packed forwards as one: their caches (``held[i]`` positions each)
        stacked left-padded, their new tokens right-padded, one 4-D mask. Returns each
        request's logits [its tokens, vocab] (None without tokens) and its cache, holding
        its own positions plus its new tokens."""
        dev = self.device
        top = max(held)
        counts = [sum(len(r.tokens) for r in rs) for rs in runs]
        q = max(counts)
        batch = hf_cache.stack(caches, held, self.config)
        if q == 0:
            return [None] * len(caches), [hf_cache.unstack(batch, b, top - h, top, self.config) for b, h in enumerate(held)]
        B, kv = len(caches), top + q
        ids = torch.zeros(B, q, dtype=torch.long, device=dev)
        pos = torch.zeros(B, q, dtype=torch.long, device=dev)
        allowed = torch.zeros(B, q, kv, dtype=torch.bool, device=dev)
        dist = torch.zeros(B, q, kv, dtype=torch.long, device=dev)
        allowed[:, torch.arange(q), top + torch.arange(q)] = True  # padding tokens see themselves only
        for b, (rs, h, n) in enumerate(zip(runs, held, counts)):
            if not n:
                continue
            ids[b, :n] = torch.tensor([t for r in rs for t in r.tokens], device=dev)
            pos[b, :n] = torch.tensor([r.pos + j for r in rs for j in range(len(r.tokens))], device=dev)
            ok, d = self._packed_allowed(h, rs, pos[b, :n])
            pad = top - h
            allowed[b, :n] = False
            allowed[b, :n, pad:top] = ok[:, :h]
            allowed[b, :n, top : top + n] = ok[:, h:]
            dist[b, :n, pad:top] = d[:, :h]
            dist[b, :n, top : top + n] = d[:, h:]
        logits = self.forward(batch, ids, pos, self._mask(allowed, dist, self._mask_kind))
        out = [logits[b, :n] if n else None for b, n in enumerate(counts)]
        return out, [hf_cache.unstack(batch, b, top - h, top + n, self.config) for b, (h, n) in enumerate(zip(held, counts))]

    def _mask(self, allowed: torch.Tensor, dist: torch.Tensor, kind: str):
        """Additive 4-D mask(s) [batch, 1, q, kv] from what each query may see and its distance
        (in positions) to each key; sliding layers also drop keys a window or more behind."""
        neg = torch.finfo(self.dtype).min
        window = getattr(self.config, "sliding_window", None)

        def additive(win: int | None) -> torch.Tensor:
            ok = allowed if not win else allowed & (dist < win)
            return torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill(~ok, neg)[:, None]

        if kind == "dict":
            return {t: additive(window if t in _SLIDING else None) for t in set(self.config.layer_types)}
        return additive(window if kind == "windowed" else None)

    def decode_rows(self, cache, tokens: torch.Tensor, pos: list[int], pads: list[int]) -> torch.Tensor:
        """One decode step of several requests stacked in ``cache`` (row i left-padded by
        ``pads[i]``, its token at logical position ``pos[i]``); logits [rows, vocab]."""
        dev = self.device
        total = hf_cache.length(cache) + 1
        pads_t = torch.tensor(pads, device=dev)[:, None]
        pos_t = torch.tensor(pos, device=dev)[:, None]
        cols = torch.arange(total, device=dev)[None]
        allowed = (cols >= pads_t)[:, None]
        dist = (pos_t - (cols - pads_t))[:, None]
        mask = self._mask(allowed, dist, self._mask_kind)
        return self.forward(cache, tokens[:, None], pos_t, mask)[:, -1]

    # -- probe -----------------------------------------------------------------
    def _mask_kinds(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if getattr(self.config, "use_sliding_window", True) is False:
            window = None
        kinds = []
        if isinstance(types, (list, tuple)) and types:
            if not set(types) <= set(_MASKED):
                return []
            kinds.append("dict")
            if set(types) == {"full_attention"}:
                kinds.append("tensor")
            elif set(types) == {"sliding_attention"} and window:
                kinds.append("windowed")
        else:
            kinds.append("windowed" if window else "tensor")
        return kinds

    def _probe(self) -> tuple[str, str | None]:
        """("packed", mask kind) when a packed forward gives a separate forward's logits
        on a few tokens; else ("branches", None)."""
        cache = self.new_cache()
        vocab = self.config.get_text_config().vocab_size
        prefix = [(7 * i + 3) % vocab for i in range(5)]
        self.feed(cache, prefix, 0)
        self.recurrent = hf_cache.is_recurrent(cache)
        if self.recurrent:
            return "branches", None
        branches = [[(11 * i + 5) % vocab for i in range(3)], [(13 * i + 2) % vocab for i in range(2)]]
        refs = []
        for b in branches:
            c = hf_cache.clone(cache)
            refs.append(self.feed(c, b, len(prefix), last_only=False))
        ref = torch.cat(refs)
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        for kind in self._mask_kinds():
            c = hf_cache.clone(cache)
            runs = [PackedRun(b, len(prefix), len(prefix)) for b in branches]
            try:
                got = self.feed_packed(c, runs, kind)
            except Exception:  # noqa: BLE001 - a model that rejects the mask: try the next kind, else branches
                continue
            scale = ref.abs().max().item()
            if hf_cache.length(c) == len(prefix) + ref.shape[0] and (got - ref).abs().max().item() <= tol * max(1.0, scale):
                return "packed", kind
        return "branches", None

    # -- scores ----------------------------------------------------------------
    @staticmethod
    def score(rows: torch.Tensor, targets: list[int], lengths: list[int]) -> tuple[list[float], list[float]]:
        """Mean log-prob and mean raw logit per candidate; row i predicts ``targets[i]``."""
        t = torch.tensor(targets, dtype=torch.long, device=rows.device)[:, None]
        logp = torch.log_softmax(rows, dim=-1).gather(1, t)[:, 0]
        logit = rows.gather(1, t)[:, 0]
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=rows.device),
                                      torch.tensor(lengths, device=rows.device))
        n = torch.tensor(lengths, dtype=torch.float32, device=rows.device)
        lp = torch.zeros(len(lengths), device=rows.device).index_add_(0, seg, logp) / n
        lg = torch.zeros(len(lengths), device=rows.device).index_add_(0, seg, logit) / n
        return lp.tolist(), lg.tolist()


def _load(folder: Path, device: torch.device, dtype: torch.dtype):
    """The folder's model through transformers, never with remote code; a failure is one
    line naming the folder."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise SpecEMError(f"{folder}: the transformers backend needs transformers ({_first_line(exc)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user gets one line
        raise SpecEMError(
            f"{folder}: transformers cannot load this model as a causal LM ({_first_line(exc)}); "
            "check that the folder is a complete Hugging Face model that transformers loads without remote code"
        ) from None
    return model.to(device).eval()


def hf_memory_needs(folder: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(KV bytes per cache token and slot, weight bytes) of a transformers-backend member,
    from config.json and the safetensors headers; the KV part is an estimate (0 where the
    config does not say), a recurrent state is not counted."""
    import math

    from specem_fast.model.modeling.loader import check_safetensors, fix_hint

    cfg = read_config(folder)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    size = torch.empty((), dtype=dtype).element_size()
    kv = 0
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // int(text["num_attention_heads"]))
        kv = 2 * layers * heads * head_dim * size
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        kv = 0
    params = 0
    fix = fix_hint(folder)
    for f in sorted(folder.glob("*.safetensors")):
        for key, info in check_safetensors(f, fix).items():
            shape = info.get("shape") if key != "__metadata__" else None
            if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
                params += math.prod(shape)
    return kv, params * size
