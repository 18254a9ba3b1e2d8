"""The transformers backend: architectures the native runtime lacks join as members.

Tiny random checkpoints built by transformers here (2 layers, hidden 64, SmolLM2's
tokenizer): qwen3, an MLA model (deepseek_v3), attention sinks with sliding layers
(gpt_oss), a hybrid Mamba model (falcon_h1). Greedy tokens equal transformers'
``generate``; verify scores equal a separate transformers forward of prefix +
candidate (the kept cache is right after a commit); mixed ensembles run; batched
equals alone; a native architecture forced onto transformers writes the native text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from specem_fast import Ensemble
from specem_fast.errors import SpecEMError
from specem_fast.members.interface import CommitCall, DraftCall, OpenCall, VerifyCall

PROMPT = "Write a short poem about the sea and the old lighthouse keeper."
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096)
ARCHS = {
    "qwen3": dict(head_dim=16),
    "deepseek_v3": dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "falcon_h1": dict(head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                      mamba_n_groups=1, mamba_chunk_size=16),
}
MODES = {"qwen3": "packed", "deepseek_v3": "packed", "gpt_oss": "packed", "falcon_h1": "branches"}


def _build(root: Path, arch: str, tokenizer_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    cfg = AutoConfig.for_model(arch, **{**COMMON, "vocab_size": vocab, **ARCHS[arch]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # larger than the init so logits are not flat
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    out = root / arch
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, default_model_dirs):
    root = tmp_path_factory.mktemp("hf_backend")
    return {a: _build(root, a, default_model_dirs["smollm2-135m-instruct"]) for a in ARCHS}


@pytest.fixture(scope="module")
def members(hf_dirs):
    from specem_fast.members.local.hf_member import HFMember
    from specem_fast.model.hf_runner import HFRunner

    return {a: HFMember(HFRunner(a, d, "cpu", "float32"), 1024) for a, d in hf_dirs.items()}


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_equal_generate(arch, hf_dirs, members):
    m = members[arch]
    assert m.runner.mode == MODES[arch]
    ids = m.prompt_ids(PROMPT)
    m.open([OpenCall(1, 0, tuple(ids))])
    got, n = [], len(ids)
    for _ in range(4):  # the cache goes on across rounds: the last sampled token is fed next round
        d = m.draft([DraftCall(1, n, 5, raw=True, ignore_stop=True)])[0]
        kept = m.commit([CommitCall(1, n, d.text)])[0]
        got += kept
        n += len(kept)
    m.close([1])
    want = _hf(hf_dirs[arch]).generate(torch.tensor([ids]), max_new_tokens=len(got), min_new_tokens=len(got),
                                       do_sample=False)[0, len(ids):].tolist()
    assert got == want


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3", "falcon_h1"])
def test_requests_together_equal_alone(arch, members):
    """Requests of different lengths in one call: drafts stacked (left-padded, masked) for one
    forward per step, packed verify passes stacked into one forward; each request's tokens
    and scores are those it gets alone (float32); sliding layers included."""
    m = members[arch]
    prompts = [m.prompt_ids(PROMPT), m.prompt_ids("What is 17 plus 25?")]

    def run(groups):
        got, scores = {}, {}
        for group in groups:
            seq = {r: list(prompts[r]) for r in group}
            m.open([OpenCall(10 + r, r, tuple(seq[r])) for r in group])
            for k, w in enumerate((5, 3, 6)):
                calls = [DraftCall(10 + r, len(seq[r]), w + r, raw=True, ignore_stop=True) for r in group]
                cands = {r: ((arch, d.text or " x"), ("b", " the sea")) for r, d in zip(group, m.draft(calls))}
                outs = m.verify([VerifyCall(10 + r, len(seq[r]), cands[r]) for r in group])
                for r, o in zip(group, outs):
                    scores[r, k] = o.mean_logprob
                    win = k % 2
                    seq[r] += m.commit([CommitCall(10 + r, len(seq[r]), cands[r][win][1], winner=win)])[0]
            m.close([10 + r for r in group])
            got.update(seq)
        return got, scores

    (together, s1), (alone, s2) = run([[0, 1]]), run([[0], [1]])
    assert together == alone
    for key, v in s1.items():
        assert v == pytest.approx(s2[key], abs=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_scores_equal_a_separate_forward(arch, hf_dirs, members):
    """Two rounds: draft, verify three candidates (the member's own among them), commit
    another member's text; each round's scores equal transformers on prefix + candidate."""
    m, hf = members[arch], _hf(hf_dirs[arch])
    ids = m.prompt_ids(PROMPT)
    m.open([OpenCall(2, 0, tuple(ids))])
    seq = list(ids)
    for rnd, other in enumerate([" the tide rolls in", " and a lamp"]):
        d = m.draft([DraftCall(2, len(seq), 6)])[0]
        cands = ((arch, d.text or " x"), ("b", other), ("c", " keeper of the light"))
        out = m.verify([VerifyCall(2, len(seq), cands)])[0]
        for (_, text), lp, lg in zip(cands, out.mean_logprob, out.mean_logit):
            cid = m.encode(text)
            with torch.no_grad():
                logits = hf(torch.tensor([seq + cid])).logits[0, len(seq) - 1 : -1].float()
            t = torch.tensor(cid)[:, None]
            assert lp == pytest.approx(torch.log_softmax(logits, -1).gather(1, t).mean().item(), abs=2e-4)
            assert lg == pytest.approx(logits.gather(1, t).mean().item(), abs=2e-4)
        seq += m.commit([CommitCall(2, len(seq), other, winner=1 + rnd % 2)])[0]
        if rnd:  # the winner was "c": its text, not "b"'s
            assert m.decode(seq[len(ids):]).endswith("keeper of the light")
    # a text committed without a verify pass is pending: the next verify folds it in first,
    # then the same with the reference cost model (cache rebuilt from the start)
    for recompute in (False, True):
        seq += m.commit([CommitCall(2, len(seq), " and then")])[0]
        cands = (("b", " the waves"), ("c", " a gull"))
        out = m.verify([VerifyCall(2, len(seq), cands, recompute=recompute)])[0]
        for (_, text), lp in zip(cands, out.mean_logprob):
            cid = m.encode(text)
            with torch.no_grad():
                logits = hf(torch.tensor([seq + cid])).logits[0, len(seq) - 1 : -1].float()
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(cid)[:, None]).mean().item()
            assert lp == pytest.approx(want, abs=2e-4)
        seq += m.commit([CommitCall(2, len(seq), " a gull", winner=1)])[0]
    m.close([2])


@pytest.fixture(scope="module")
def mixed(tiny_dirs, hf_dirs):
    # qwen3 may run natively: forced onto transformers by the spec prefix; falcon_h1 goes there by itself
    names = [str(tiny_dirs["llama"]), f"hf:{hf_dirs['qwen3']}", str(hf_dirs["falcon_h1"])]
    ens = Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2, dtype="float32")
    yield ens, names
    ens.close()


def test_mixed_ensemble_runs_and_batched_equals_alone(mixed, capsys):
    ens, names = mixed
    prompts = [PROMPT, "What is 17 plus 25?"]
    together = ens.generate(prompts, max_new_tokens=16, window=4, temperature=0.0)
    alone = [ens.generate(p, max_new_tokens=16, window=4, temperature=0.0) for p in prompts]
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.text for r in together)
    meta = together[0].metadata
    assert meta["backends"] == {names[0]: "native", names[1]: "transformers", names[2]: "transformers"}
    assert meta["remote"][names[2]]["verify"] == "branches"


def test_native_architecture_forced_onto_transformers_writes_the_same_text(tiny_dirs, capsys):
    names = [str(tiny_dirs[a]) for a in ("llama", "mistral")]
    kw = dict(cache_tokens=512, max_batch=1, dtype="float32")
    gen = dict(max_new_tokens=20, window=5, temperature=0.0)
    native = Ensemble.from_pretrained(names, **kw)
    forced = Ensemble.from_pretrained([f"hf:{n}" for n in names], **kw)
    try:
        assert forced.metadata["backends"] == {f"hf:{n}": "transformers" for n in names}
        assert native.metadata["backends"] == dict.fromkeys(names, "native")
        assert "backend transformers" in capsys.readouterr().err  # one line per member at load
        for p in (PROMPT, "What is 17 plus 25?"):
            assert forced.generate(p, **gen).text == native.generate(p, **gen).text
    finally:
        native.close()
        forced.close()


def test_backend_choice_and_errors(hf_dirs, tiny_dirs):
    from specem_fast.members.loading import choose_backend

    assert choose_backend("m", hf_dirs["falcon_h1"], "auto") == "transformers"
    assert choose_backend("m", tiny_dirs["llama"], "auto") == "native"
    assert choose_backend("m", tiny_dirs["llama"], "transformers") == "transformers"
    with pytest.raises(SpecEMError, match=r"falcon_h1.*backend='transformers'") as e:
        Ensemble.from_pretrained([str(hf_dirs["falcon_h1"])], backend="native", cache_tokens=256, max_batch=1)
    assert str(hf_dirs["falcon_h1"]) in str(e.value)
    with pytest.raises(SpecEMError, match="must be one of auto, native, transformers"):
        Ensemble.from_pretrained([str(hf_dirs["qwen3"])], backend="vllm", cache_tokens=256, max_batch=1)


def test_unloadable_folder_is_one_line_naming_it(tmp_path, hf_dirs):
    from specem_fast.model.hf_runner import HFRunner

    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["qwen3"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_arch"}))
    with pytest.raises(SpecEMError, match="transformers cannot load") as e:
        HFRunner("bad", bad, "cpu", "float32")
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_in_a_ray_actor_writes_the_local_text(hf_dirs, mixed):
    """placement="ray": the transformers member lives in an actor and writes what it writes here."""
    ray = pytest.importorskip("ray")
    names = [f"hf:{hf_dirs['qwen3']}", str(hf_dirs["falcon_h1"])]
    kw = dict(cache_tokens=512, max_batch=1, dtype="float32")
    gen = dict(max_new_tokens=12, window=4, temperature=0.0)
    local = Ensemble.from_pretrained(names, **kw)
    want = local.generate(PROMPT, **gen).text
    local.close()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        remote = Ensemble.from_pretrained(names, placement="ray", **kw)
        try:
            res = remote.generate(PROMPT, **gen)
            assert res.text == want
            assert res.metadata["remote"][names[1]]["backend"] == "transformers"
        finally:
            remote.close()
    finally:
        ray.shutdown()


def test_spec_prefixes_and_cli_flag():
    from specem_fast.cli.options import _backend_arg
    from specem_fast.members.loading import parse_spec

    assert (parse_spec("hf:/m/x").model, parse_spec("hf:/m/x").backend) == ("/m/x", "transformers")
    sp = parse_spec("ray:hf:/m/x")
    assert (sp.kind, sp.model, sp.backend) == ("ray", "/m/x", "transformers")
    assert parse_spec("native:/m/x").backend == "native" and parse_spec("/m/x").backend is None
    assert _backend_arg(None) == "auto" and _backend_arg(["transformers"]) == "transformers"
    assert _backend_arg(["auto", "native"]) == ["auto", "native"]
    with pytest.raises(SpecEMError, match="names no model"):
        parse_spec("hf:")
