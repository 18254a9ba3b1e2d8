"""The rounds end to end on tiny random models with the real tokenizers."""

import pytest
import torch

from specem_fast import Ensemble

from specem_fast.rounds import scoring
from specem_fast.errors import SpecEMError

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?", "List three colours."]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    return Ensemble.from_pretrained(names, cache_tokens=1024, max_batch=4)


def texts(results):
    return [r.text for r in results]


def test_cached_equals_recompute_and_never_recomputes(tiny):
    for r in tiny.runners.values():
        r.tokens_refed = 0
    cached = tiny.generate(PROMPTS[0], max_new_tokens=40, window=6)
    assert all(r.tokens_refed == 0 for r in tiny.runners.values())
    rec = tiny.generate(PROMPTS[0], max_new_tokens=40, window=6, mode="recompute")
    assert all(r.tokens_refed > 0 for r in tiny.runners.values())
    assert cached.text == rec.text and len(cached.text) > 0
    assert [x.winner_model for x in cached.rounds] == [x.winner_model for x in rec.rounds]
    for a, b in zip(cached.rounds, rec.rounds):
        for v in a.raw_scores:
            assert a.raw_scores[v] == pytest.approx(b.raw_scores[v], abs=1e-4)


def test_batched_equals_alone_greedy_and_sampled(tiny):
    alone = [tiny.generate(p, max_new_tokens=25, window=5) for p in PROMPTS]
    batched = tiny.generate(PROMPTS, max_new_tokens=25, window=5)
    assert texts(batched) == texts(alone)
    kw = dict(max_new_tokens=25, window=5, temperature=0.8, top_p=0.9, seed=7)
    s_alone = [tiny.generate(p, **kw) for p in PROMPTS]
    s_batch = tiny.generate(PROMPTS, **kw)
    assert texts(s_batch) == texts(s_alone)
    again = tiny.generate(PROMPTS[0], **kw)
    assert again.text == s_alone[0].text


def test_round_scores_equal_an_independent_transformers_computation(tiny):
    from transformers import AutoModelForCausalLM

    res = tiny.generate(PROMPTS[2], max_new_tokens=20, window=4)
    assert len(res.rounds) >= 2
    answer_so_far = ""
    for rd in res.rounds[:2]:
        for v, runner in tiny.runners.items():
            hf = AutoModelForCausalLM.from_pretrained(str(runner.folder), dtype=torch.float64).eval()
            prefix = runner.codec.prompt_ids(PROMPTS[2]) + (runner.codec.encode_segment(answer_so_far) if answer_so_far else [])
            expect = []
            for c in rd.candidates:
                ids = runner.codec.encode_segment(c.text)
                with torch.no_grad():
                    lp = torch.log_softmax(hf(torch.tensor([prefix + ids])).logits[0], -1)
                expect.append(float(torch.stack([lp[len(prefix) - 1 + j, t] for j, t in enumerate(ids)]).mean()))
            assert rd.raw_scores[v] == pytest.approx(expect, abs=2e-3)
        answer_so_far += rd.accepted


def test_summed_logprob_scores_are_each_candidates_log_probability(tiny):
    from transformers import AutoModelForCausalLM

    rd = tiny.generate(PROMPTS[1], max_new_tokens=8, window=4, score="logprob_sum").rounds[0]
    assert rd.verified and rd.raw_scores
    for v, runner in tiny.runners.items():
        hf = AutoModelForCausalLM.from_pretrained(str(runner.folder), dtype=torch.float64).eval()
        prefix = runner.codec.prompt_ids(PROMPTS[1])
        expect = []
        for c in rd.candidates:
            ids = runner.codec.encode_segment(c.text)
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([prefix + ids])).logits[0], -1)
            expect.append(float(sum(lp[len(prefix) - 1 + j, t] for j, t in enumerate(ids))))
        assert rd.raw_scores[v] == pytest.approx(expect, abs=1e-2)
        assert rd.scores[v] == pytest.approx(scoring.normalise(expect, "logprob_sum"), abs=1e-3)


def test_hedge_weights_follow_the_recorded_scores(tiny):
    res = tiny.generate(PROMPTS[0], max_new_tokens=40, window=4, hedge_lr=5.0)
    names = tiny.model_names
    w = {n: 1 / 3 for n in names}
    for rd in res.rounds:
        if not rd.scores:
            continue
        rewards = scoring.win_rate_rewards(rd.scores, [c.model for c in rd.candidates], names)
        w = scoring.hedge_update(w, rewards, scoring.hedge_learning_rate(5.0, 3, rd.index))
        assert rd.weights == pytest.approx(w)
        assert rd.winner == scoring.argmax_first(scoring.combine(rd.scores, w))


def test_text_handoff_round_trips_for_every_model(tiny):
    res = tiny.generate(PROMPTS[0], max_new_tokens=60, window=7)
    for n, runner in tiny.runners.items():
        seq = []
        for rd in res.rounds:
            seq += runner.codec.encode_segment(rd.accepted)
        assert runner.codec.decode(seq) == res.text
        assert len(seq) == res.tokens_per_model[n]


def test_separate_verifiers_logit_mode_and_hedge_off(tiny_dirs):
    drafters = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    verifier = [str(tiny_dirs["gemma3_text"])]
    ens = Ensemble.from_pretrained(drafters, verifier, cache_tokens=512, max_batch=2)
    res = ens.generate(PROMPTS[1], max_new_tokens=20, window=5, score="logit", hedge_lr="off")
    for rd in res.rounds:
        if rd.raw_scores:
            assert list(rd.raw_scores) == verifier
            raw = rd.raw_scores[verifier[0]]
            assert rd.scores[verifier[0]] == pytest.approx([x / sum(raw) for x in raw])
            assert rd.combined == pytest.approx(rd.scores[verifier[0]])
    assert {c.model for rd in res.rounds for c in rd.candidates} <= set(drafters)


def test_max_new_tokens_and_stop_strings(tiny):
    res = tiny.generate(PROMPTS[0], max_new_tokens=12, window=5)
    assert res.stop_reason in ("length", "stop", "empty")
    if res.stop_reason == "length":
        assert res.new_tokens == 12
    full = tiny.generate(PROMPTS[0], max_new_tokens=40, window=5).text
    words = [w for w in full.split(" ") if len(w) > 2]
    stop = words[len(words) // 2]
    cut = tiny.generate(PROMPTS[0], max_new_tokens=40, window=5, stop=[stop])
    assert cut.stop_reason == "stop_string"
    assert cut.text == full[: full.find(stop)]


def test_fast_eos_ends_on_the_first_draft_that_stops(tiny, monkeypatch):
    """Deterministic: the second drafter's stop tokens are made to include a token it
    surely drafts in round 1, so its first draft ends with a stop token."""
    m = tiny.drafters[1]
    runner = tiny.runners[m]
    member = tiny.members[m].drafter
    chosen = []
    real_choose = member._choose
    monkeypatch.setattr(member, "_choose", lambda logits, seqs: chosen.append(real_choose(logits, seqs)) or chosen[-1])
    kw = dict(max_new_tokens=30, window=6)
    base = tiny.generate(PROMPTS[0], **kw)
    monkeypatch.setattr(member, "_choose", real_choose)
    assert base.stop_reason != "fast_eos" and not any(c.ended_with_stop for c in base.rounds[0].candidates)
    # round 1's draft of m: m's first 6 token choices
    toks = [t[0] for t in chosen][:6]
    assert len(toks) == 6
    k = next(j for j in range(1, len(toks)) if toks[j] not in toks[:j])
    monkeypatch.setattr(runner.codec, "stop_ids", runner.codec.stop_ids | {toks[k]})

    res = tiny.generate(PROMPTS[0], fast_eos=True, **kw)
    assert res.stop_reason == "fast_eos" and len(res.rounds) == 1
    rd = res.rounds[0]
    win = rd.candidates[rd.winner]
    assert rd.winner_model == m and win.model == m and win.ended_with_stop and win.draft_tokens == k
    assert not rd.verified and rd.raw_scores == {}
    assert rd.weights == pytest.approx({v: 1 / len(tiny.verifiers) for v in tiny.verifiers})  # no update
    assert win.text == runner.codec.decode(toks[:k]) == res.text == rd.accepted
    assert [c.ended_with_stop for c in rd.candidates if c.model != m] == [False] * (len(rd.candidates) - 1)
    # the same drafts without fast_eos: the stopped draft is verified like any other
    slow = tiny.generate(PROMPTS[0], **kw)
    assert slow.stop_reason != "fast_eos" and slow.rounds[0].verified
    assert any(c.model == m and c.ended_with_stop and c.text == win.text for c in slow.rounds[0].candidates)


def test_length_stop_is_exactly_max_new_tokens(tiny):
    """A segment from another tokenizer can be longer in the first model's tokens than
    the window left: the last one is cut so the budget holds exactly."""
    cut_rounds = 0
    for budget in (7, 12, 13):
        for res in tiny.generate(PROMPTS, max_new_tokens=budget, window=5):
            assert res.stop_reason == "length" and res.new_tokens == budget
            last = res.rounds[-1]
            won = last.candidates[last.winner].text
            assert won.startswith(last.accepted) and res.text.endswith(last.accepted)
            cut_rounds += last.accepted != won
            assert res.tokens_per_model[tiny.drafters[1]] == len(
                sum((tiny.runners[tiny.drafters[1]].codec.encode_segment(r.accepted) for r in res.rounds), []))
    assert cut_rounds  # the cut really happened on these prompts


def test_stream_never_shows_text_a_straddling_stop_string_removes(tiny):
    def straddling_stop(segs):
        """A stop string whose first occurrence starts in one segment and ends in the next."""
        full, end = "".join(segs), 0
        for a, b in zip(segs, segs[1:]):
            end += len(a)
            for k in range(1, min(4, len(a)) + 1):
                for m in range(1, min(4, len(b)) + 1):
                    stop = a[-k:] + b[:m]
                    if full.find(stop) == end - k:
                        return stop
        return None

    for prompt in PROMPTS:
        stop = straddling_stop([s.text for s in tiny.stream(prompt, max_new_tokens=30, window=5)])
        if stop:
            break
    assert stop, "no segment boundary usable as a stop string"
    full = tiny.generate(prompt, max_new_tokens=30, window=5).text
    segs = list(tiny.stream(prompt, max_new_tokens=30, window=5, stop=[stop, "never-appears"]))
    res = tiny.generate(prompt, max_new_tokens=30, window=5, stop=[stop, "never-appears"])
    assert res.stop_reason == "stop_string" and res.text == full[: full.find(stop)]
    assert "".join(s.text for s in segs) == res.text
    assert res.rounds[-1].answer_chars == len(res.text)


def test_stream_yields_the_accepted_segments(tiny):
    segs = list(tiny.stream(PROMPTS[1], max_new_tokens=20, window=5))
    res = tiny.generate(PROMPTS[1], max_new_tokens=20, window=5)
    assert "".join(s.text for s in segs) == res.text
    assert [s.model for s in segs] == [rd.winner_model for rd in res.rounds]


def test_a_long_stop_string_holds_back_only_what_may_start_it(tiny):
    """A stop string longer than a segment that never matches releases every round's text
    at once; held is only an end of the answer that could begin the stop string."""
    long_stop = "\u2603" * 40  # never written by these models
    segs = list(tiny.stream(PROMPTS[1], max_new_tokens=20, window=5, stop=[long_stop]))
    res = tiny.generate(PROMPTS[1], max_new_tokens=20, window=5)
    assert [s.text for s in segs[: len(res.rounds)]] == [rd.accepted for rd in res.rounds]
    assert "".join(s.text for s in segs) == res.text


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(window=0), "window must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(score="prob"), "score must be one of"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(windw=3), "unknown generation setting"),
    ],
)
def test_bad_settings_are_clear_errors(tiny, settings, message):
    with pytest.raises(SpecEMError, match=message):
        tiny.generate(PROMPTS[0], **settings)


def test_bad_prompts_and_model_lists(tiny, tiny_dirs):
    with pytest.raises(SpecEMError, match="prompt is empty"):
        tiny.generate("   ")
    with pytest.raises(SpecEMError, match="shorten the prompt or raise cache_tokens"):
        tiny.generate("word " * 2000)
    with pytest.raises(SpecEMError, match="more than once"):
        Ensemble.from_pretrained([str(tiny_dirs["llama"])] * 2)
    with pytest.raises(SpecEMError, match="empty"):
        Ensemble.from_pretrained([])
    with pytest.raises(SpecEMError, match="unknown model"):
        Ensemble.from_pretrained(["no-such-model"])
    # nothing leaked: every slot is free again
    assert tiny.cache.free_slots == tiny.config.max_batch


def test_single_model_baseline_matches_a_plain_greedy_loop(tiny):
    name = tiny.model_names[1]
    runner = tiny.runners[name]
    out = tiny.generate_single(name, PROMPTS[1], max_new_tokens=8, ignore_eos=True)
    assert out.new_tokens == 8
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(runner.folder), dtype=torch.float32).eval()
    ids = runner.codec.prompt_ids(PROMPTS[1])
    new = []
    with torch.no_grad():
        for _ in range(8):
            new.append(int(hf(torch.tensor([ids + new])).logits[0, -1].argmax()))
    assert out.text == runner.codec.decode(new)


def test_members_keep_their_own_dtype(tiny_dirs):
    names = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    ens = Ensemble.from_pretrained(names, dtypes=["float32", "bfloat16"], cache_tokens=256, max_batch=1)
    assert ens.cache[names[1]].k.dtype == torch.bfloat16 and ens.cache[names[0]].k.dtype == torch.float32
    res = ens.generate(PROMPTS[1], max_new_tokens=10, window=5)
    assert res.metadata["dtypes"] == {names[0]: "float32", names[1]: "bfloat16"}
    assert res.text and all(-50 < s < 0 for rd in res.rounds for v in rd.raw_scores.values() for s in v)
    with pytest.raises(SpecEMError, match="dtypes lists 1 entries for 2 models"):
        Ensemble.from_pretrained(names, dtypes=["float32"])
    with pytest.raises(SpecEMError, match="dtype must be"):
        Ensemble.from_pretrained(names, dtypes=["float32", "int8"])


def test_more_prompts_than_slots_queue_and_match(tiny_dirs, tiny):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    small = Ensemble.from_pretrained(names, cache_tokens=1024, max_batch=2)
    got = small.generate(PROMPTS, max_new_tokens=20, window=5)
    assert texts(got) == texts(tiny.generate(PROMPTS, max_new_tokens=20, window=5))
    assert small.cache.free_slots == 2


def test_cache_budget_ends_the_answer_instead_of_failing(tiny_dirs):
    """An answer that outgrows cache_tokens stops with 'cache_full' and keeps its text;
    every slot is free afterwards and the engine keeps working."""
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2")]
    ens = Ensemble.from_pretrained(names, cache_tokens=128, max_batch=2)
    long_run = Ensemble.from_pretrained(names, cache_tokens=1024, max_batch=2)
    got = ens.generate(PROMPTS[:2], max_new_tokens=400, window=5)
    ref = long_run.generate(PROMPTS[:2], max_new_tokens=400, window=5)
    for g, r in zip(got, ref):
        assert g.stop_reason == "cache_full" and 20 < g.new_tokens < 128
        assert r.text.startswith(g.text) and len(r.text) > len(g.text)  # the same answer, cut short
        for name in names:  # the budget holds in every model
            prompt = ens.runners[name].codec.prompt_ids(g.prompt)
            assert len(prompt) + g.tokens_per_model[name] <= 128
    assert ens.cache.free_slots == 2
    assert ens.generate(PROMPTS[2], max_new_tokens=6, window=3).stop_reason == "length"


def test_slots_come_back_after_an_error_or_an_abandoned_stream(tiny_dirs, monkeypatch):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2")]
    ens = Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)
    for seg in ens.stream(PROMPTS[0], max_new_tokens=30, window=5):
        break  # the caller stops listening after the first segment
    stream = ens.stream(PROMPTS[0], max_new_tokens=30, window=5)
    next(stream)
    stream.close()
    assert ens.cache.free_slots == 2
    # two unread streams hold both slots, but the engine runs them on: a third
    # generation from the same thread waits for a slot and completes, not hangs
    a, b = (ens.stream(p, max_new_tokens=30, window=5) for p in PROMPTS[:2])
    next(a), next(b)
    assert ens.generate(PROMPTS[2], max_new_tokens=5).new_tokens == 5
    a.close(), b.close()
    assert ens.cache.free_slots == 2
    runner = ens.runners[names[1]]
    calls = {"n": 0}
    real_forward = runner.forward

    def failing(runs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real_forward(runs)

    monkeypatch.setattr(runner, "forward", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        ens.generate(PROMPTS, max_new_tokens=30, window=5)
    monkeypatch.undo()
    assert ens.cache.free_slots == 2
    assert ens.generate(PROMPTS[1], max_new_tokens=6, window=3).new_tokens == 6


def test_threads_share_one_ensemble(tiny_dirs):
    """Rounds of generations from several threads are serialised; answers match running alone."""
    import threading

    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2")]
    ens = Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)
    alone = [ens.generate(p, max_new_tokens=15, window=5).text for p in PROMPTS]
    single = ens.generate_single(names[0], PROMPTS[0], max_new_tokens=10).text
    got, errors = {}, []

    def work(i):
        try:
            got[i] = ens.generate(PROMPTS[i], max_new_tokens=15, window=5).text
            got[("single", i)] = ens.generate_single(names[0], PROMPTS[0], max_new_tokens=10).text
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]  # 3 requests, 2 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [got[i] for i in range(3)] == alone
    assert all(got[("single", i)] == single for i in range(3))
    assert ens.cache.free_slots == 2


def test_single_model_baseline_stops_at_the_cache_budget(tiny_dirs):
    ens = Ensemble.from_pretrained([str(tiny_dirs["llama"])], cache_tokens=64, max_batch=1)
    prompt_len = ens.count_tokens(PROMPTS[0])
    out = ens.generate_single(ens.model_names[0], PROMPTS[0], max_new_tokens=500, ignore_eos=True)
    assert out.stop_reason == "cache_full" and out.new_tokens == 64 - prompt_len + 1
    assert ens.cache.free_slots == 1
