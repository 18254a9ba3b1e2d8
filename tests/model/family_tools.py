"""What the family tests share: saving a tiny checkpoint with a real tokenizer, a runner
with its own cache, transformers' logits and seeded ids."""

from __future__ import annotations

import shutil

import torch

from specem_fast.model.kv_cache import KVCacheManager
from specem_fast.model.runner import ModelRunner, Run, score_all


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


def check_packed_branches(r, hf, slot, tol):
    """Candidates packed after one prefix score as separate forwards of prefix + candidate."""
    prefix = ids(20, 1)
    cands = [ids(n, 10 + n) for n in (5, 1, 7)]
    h0 = r.forward([Run(slot, prefix, 0, 0, 0)])
    r.cache.append(slot, len(prefix))
    runs, q = [], len(prefix)
    for c in cands:
        runs.append(Run(slot, c, q, len(prefix), len(prefix)))
        q += len(c)
    h = r.forward(runs)
    # rows predicting each candidate token: the prefix's last row, then the branch's own rows
    rows, targets, offsets, at = [], [], [0], 0
    for c in cands:
        rows += [h0[-1:], h[at : at + len(c) - 1]]
        targets += c
        offsets.append(offsets[-1] + len(c))
        at += len(c)
    scores = score_all([r], [r.scoring_problem(torch.cat(rows), targets, offsets)])[0]
    at = 0
    for i, c in enumerate(cands):
        ref = hf_logits(hf, prefix + c)
        tol(r.logits(h[at : at + len(c)]), ref[len(prefix):])
        logp = torch.log_softmax(ref[len(prefix) - 1 : -1], -1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
        tol(scores.token_logprob[offsets[i] : offsets[i + 1]], logp)
        at += len(c)
