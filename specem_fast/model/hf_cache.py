"""Every call into transformers' cache classes, in one place.

transformers changes its cache API between minor versions (``crop`` took a
length, then a negative count; layers gained and lost classes), so the
transformers backend (:mod:`.hf_runner`) touches a cache only through these
functions. Written against transformers 5.2x (``cache_utils``: a ``Cache`` is
a list of per-layer objects; attention layers hold ``keys``/``values`` of shape
``[batch, kv_heads, length, head_dim]``; linear-attention (Mamba, conv) layers
hold ``conv_states``/``recurrent_states`` dicts, which cannot be rolled back).

A cache here always holds one request (batch 1) except inside a verify pass
that runs several branches over a copied prefix.
"""

from __future__ import annotations

import copy

import torch


def new_cache(config):
    """An empty cache for a model with this config. Sliding-window layers keep every
    position (the attention mask, not the cache, applies the window), so positions can
    be cropped and selected by index like a full-attention layer's."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = DynamicLayer()
    return cache


def is_recurrent(cache) -> bool:
    """Whether some layer holds a state that cannot be cropped (Mamba/SSM, conv)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)


def has_sliding_layers(cache) -> bool:
    from transformers.cache_utils import DynamicSlidingWindowLayer

    return any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)


def _attention_layers(cache):
    from transformers.cache_utils import DynamicLayer

    return [layer for layer in cache.layers if isinstance(layer, DynamicLayer) and getattr(layer, "is_initialized", False)
            and layer.keys is not None and layer.keys.numel()]


def length(cache) -> int:
    """Positions the cache holds (0 when nothing was fed yet)."""
    if not cache.layers:
        return 0
    try:
        return int(cache.get_seq_length())
    except ValueError:  # only linear-attention layers: no sequence length
        return 0


def crop(cache, n: int) -> None:
    """Keep the first ``n`` positions (attention layers only; callers check :func:`is_recurrent`)."""
    for layer in _attention_layers(cache):
        layer.keys = layer.keys[..., :n, :]
        layer.values = layer.values[..., :n, :]


def keep_positions(cache, index: torch.Tensor) -> None:
    """Keep the positions ``index`` (ascending) of every attention layer, in that order."""
    for layer in _attention_layers(cache):
        idx = index.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


def clone(cache):
    """A copy that shares no tensor with ``cache``."""
    return copy.deepcopy(cache)


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep batch rows ``rows`` (repeats allowed: replicates a batch-1 cache), for attention
    and linear-attention states alike."""
    cache.reorder_cache(rows)


def stack(caches: list, lengths: list[int], config):
    """One batch cache of several batch-1 attention caches, each left-padded to the longest
    (``lengths``: the positions each holds); padded positions must be masked out."""
    from transformers.cache_utils import DynamicLayer

    out = new_cache(config)
    top = max(lengths)
    for i, layer in enumerate(out.layers):
        src = [c.layers[i] for c in caches]
        if not all(isinstance(s, DynamicLayer) and getattr(s, "is_initialized", False) for s in src):
            raise ValueError("only initialized attention caches can be stacked")
        keys, values = [], []
        for s, n in zip(src, lengths):
            pad = top - n
            keys.append(torch.nn.functional.pad(s.keys[..., :n, :], (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(s.values[..., :n, :], (0, 0, pad, 0)))
        k, v = torch.cat(keys), torch.cat(values)
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return out


def unstack(batch, row: int, start: int, end: int, config):
    """Row ``row`` of a stacked cache, positions ``[start, end)``, as a batch-1 cache of its own."""
    out = new_cache(config)
    for layer, src in zip(out.layers, batch.layers):
        k = src.keys[row : row + 1, :, start:end].clone()
        v = src.values[row : row + 1, :, start:end].clone()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return out
