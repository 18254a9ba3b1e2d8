"""What the family tests share: saving a tiny checkpoint with a real tokenizer, a runner
with its own cache, transformers' logits and seeded ids."""

from __future__ import annotations

import shutil

import torch

from specem_fast.model.kv_cache import KVCacheManager
from specem_fast.model.runner import ModelRunner


def save_with_tokenizer(model, folder, tokenizer_dir):
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    return folder


def runner_for(folder, dtype="float32", slots=3):
    r = ModelRunner("m", folder, "cpu", dtype, "torch")
    r.cache = KVCacheManager([r.cache_shape], slots, 128)["m"]
    return r


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 20000, (n,), generator=g).tolist()
