"""Exact outputs of a fixed set of generations, saved before the draft step was
reworked (issue 11): the rework must not change a single token or score.

``python tests/known_outputs.py tiny OUT.json`` writes the tiny-model snapshot
(tests/data/known_outputs_tiny.json), ``... real OUT.json`` the default-model one.
Stop tokens are widened to the tokens a drafter drafts most, so drafts end on a
stop token in the middle of a round (greedy and sampled) and later rounds go on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?", "List three colours."]


def _result(res) -> dict:
    n = lambda m: Path(m).name  # noqa: E731 - model folders differ between runs, their names do not
    return {
        "text": res.text,
        "stop_reason": res.stop_reason,
        "new_tokens": res.new_tokens,
        "tokens_per_model": {n(m): c for m, c in res.tokens_per_model.items()},
        "rounds": [
            {
                "winner_model": n(rd.winner_model),
                "candidates": [[n(c.model), c.text, c.ended_with_stop, c.draft_tokens] for c in rd.candidates],
                "raw_scores": {n(v): [repr(float(x)) for x in s] for v, s in rd.raw_scores.items()},
                "weights": {n(v): repr(float(w)) for v, w in rd.weights.items()},
            }
            for rd in res.rounds
        ],
    }


def snapshot(ens, max_new_tokens: int = 30, window: int = 5, prompts=PROMPTS) -> dict:
    """Greedy and sampled generations, batched and alone, with and without mid-draft stops."""
    out: dict = {}
    kw = dict(max_new_tokens=max_new_tokens, window=window)
    out["greedy_batch"] = [_result(r) for r in ens.generate(list(prompts), **kw)]
    out["greedy_alone"] = [_result(ens.generate(p, **kw)) for p in prompts]
    skw = dict(kw, temperature=0.8, top_p=0.9, seed=7)
    out["sampled_batch"] = [_result(r) for r in ens.generate(list(prompts), **skw)]
    out["sampled_plain"] = _result(ens.generate(prompts[0], **dict(kw, temperature=1.0, seed=3)))
    single = ens.model_names[1]
    out["single_greedy"] = [r.text for r in ens.generate_single(single, list(prompts), max_new_tokens=max_new_tokens)]
    out["single_sampled"] = [r.text for r in ens.generate_single(single, list(prompts), max_new_tokens=max_new_tokens,
                                                                  temperature=0.8, top_p=0.9, seed=4)]
    # mid-draft stops: the second token of each drafter's round-2 candidates becomes a
    # stop token, so round 1 runs as before and round 2's drafts stop after one token
    saved = {n: r.codec.stop_ids for n, r in ens.runners.items()}
    try:
        for name, base, extra in (("greedy", "greedy_batch", {}), ("sampled", "sampled_batch", skw)):
            for n in ens.drafters:
                codec = ens.runners[n].codec
                picks = {ids[1] for r in out[base] for rd in r["rounds"][1:2] for c in rd["candidates"]
                         if c[0] == n and len(ids := codec.encode_segment(c[1])) > 1}
                codec.stop_ids = frozenset(saved[n] | picks)
            out[f"stops_{name}"] = [_result(r) for r in ens.generate(list(prompts), **dict(kw, **extra))]
            out[f"stops_{name}_fast_eos"] = [_result(r) for r in ens.generate(list(prompts), fast_eos=True,
                                                                                **dict(kw, **extra))]
    finally:
        for n, r in ens.runners.items():
            r.codec.stop_ids = saved[n]
    return out


def tiny_ensemble(root: Path, **options):
    from tiny_models import make_tiny_model_dir

    from specem_fast import Ensemble

    dirs = [make_tiny_model_dir(root, a, t) for a, t in (("llama", "smollm2-135m-instruct"),
                                                         ("qwen2", "qwen2.5-coder-0.5b-instruct"),
                                                         ("gemma3_text", "gemma3-270m"))]
    return Ensemble.from_pretrained([str(d) for d in dirs], cache_tokens=1024, max_batch=4, dtype="float32",
                                    kernels="torch", **options)


def real_ensemble(**options):
    from specem_fast import Ensemble

    # the snapshot was taken with the reference method, before presets existed
    return Ensemble.from_pretrained(cache_tokens=1024, max_batch=4, dtype="float32", kernels="torch",
                                    preset="reference", **options)


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    which, dest = sys.argv[1], Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        if which == "tiny":
            snap = snapshot(tiny_ensemble(Path(tmp)))
        else:
            snap = snapshot(real_ensemble(), max_new_tokens=24, window=8, prompts=PROMPTS[:2])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(snap, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest}")
