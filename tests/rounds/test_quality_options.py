"""Issue 8's quality options on the real engine (tiny random models, real tokenizers):
model exit, the agreement fast path, weights across requests, no self-votes,
Hedge schedules."""

import json
import shutil

import pytest
import torch

from specem_fast import Ensemble

from specem_fast.rounds import scoring
from specem_fast.config import GenerationSettings
from specem_fast.errors import SpecEMError
from specem_fast.rounds.weights import apply_floor

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?", "List three colours."]


@pytest.fixture(scope="module")
def names(tiny_dirs):
    """Three small-vocabulary members (the SmolLM2 tokenizer): cheap rounds, three votes."""
    from tiny_models import make_tiny_model_dir

    third = make_tiny_model_dir(tiny_dirs["llama"].parent, "llama", "smollm2-135m-instruct", seed=1)
    return [str(tiny_dirs["llama"]), str(tiny_dirs["mistral"]), str(third)]


@pytest.fixture(scope="module")
def tiny(names):
    return Ensemble.from_pretrained(names, cache_tokens=1024, max_batch=4)


@pytest.fixture(scope="module")
def twins(tiny_dirs, tmp_path_factory):
    """Two copies of one model drafting (their drafts always agree); a third model only verifies."""
    copy = tmp_path_factory.mktemp("twin") / "llama-copy"
    shutil.copytree(tiny_dirs["llama"], copy)
    drafters = [str(tiny_dirs["llama"]), str(copy)]  # the judge has another tokenizer
    return Ensemble.from_pretrained(drafters, drafters + [str(tiny_dirs["qwen2"])], cache_tokens=1024, max_batch=2)


def _reset_book(ens):
    ens.set_prior_weights(None)  # no prior, uniform running estimate


# -- model exit -----------------------------------------------------------------------
def test_model_exit_triggers_after_patience_and_is_recorded(tiny, names):
    _reset_book(tiny)
    tiny.set_prior_weights({names[0]: 0.8, names[1]: 0.1, names[2]: 0.1})
    res = tiny.generate(PROMPTS[0], max_new_tokens=40, window=4, init_weights="prior",
                        exit_threshold=0.2, exit_patience=2)
    assert len(res.rounds) >= 3
    assert res.rounds[0].drafters == names  # below the threshold for 1 round: still drafting
    for rd in res.rounds[1:]:
        assert rd.drafters == [names[0]]  # exited at the start of round 2, for good
        assert not rd.verified and rd.raw_scores == {}  # one candidate: no verify pass
        assert rd.winner_model == names[0]
    assert res.mean_drafters == pytest.approx((3 + (len(res.rounds) - 1)) / len(res.rounds))
    assert res.skipped_verify == len(res.rounds) - 1 + (not res.rounds[0].verified)


def test_model_exit_off_and_heaviest_never_exits(tiny, names):
    _reset_book(tiny)
    tiny.set_prior_weights({names[0]: 0.8, names[1]: 0.1, names[2]: 0.1})
    res = tiny.generate(PROMPTS[0], max_new_tokens=24, window=4, init_weights="prior")
    assert all(rd.drafters == names for rd in res.rounds)  # no threshold: nobody exits
    # a threshold above every weight still leaves the heaviest drafter
    res = tiny.generate(PROMPTS[0], max_new_tokens=24, window=4, init_weights="prior",
                        exit_threshold=0.9, exit_patience=1)
    assert all(rd.drafters == [names[0]] for rd in res.rounds)


def test_model_exit_keeps_caches_exact(tiny, names):
    _reset_book(tiny)
    tiny.set_prior_weights({names[0]: 0.2, names[1]: 0.7, names[2]: 0.1})
    kw = dict(max_new_tokens=40, window=5, init_weights="prior", exit_threshold=0.15, exit_patience=2)
    for r in tiny.runners.values():
        r.tokens_refed = 0
    cached = tiny.generate(PROMPTS[1], **kw)
    assert all(r.tokens_refed == 0 for r in tiny.runners.values())
    rec = tiny.generate(PROMPTS[1], mode="recompute", **kw)
    assert cached.text == rec.text and len(cached.rounds) >= 3
    assert [rd.drafters for rd in cached.rounds] == [rd.drafters for rd in rec.rounds]
    assert names[2] not in cached.rounds[-1].drafters


# -- agreement fast path --------------------------------------------------------------
def test_agreement_skips_verification_and_keeps_caches_exact(twins):
    for r in twins.runners.values():
        r.tokens_refed = r.tokens_fed = 0
    kw = dict(max_new_tokens=40, window=5, skip_agreed=True)
    fast = twins.generate(PROMPTS[2], **kw)
    assert all(r.tokens_refed == 0 for r in twins.runners.values())
    fed_fast = {n: r.tokens_fed for n, r in twins.runners.items()}
    for r in twins.runners.values():
        r.tokens_fed = 0
    slow = twins.generate(PROMPTS[2], max_new_tokens=40, window=5)
    fed_slow = {n: r.tokens_fed for n, r in twins.runners.items()}
    rec = twins.generate(PROMPTS[2], mode="recompute", **kw)
    assert fast.text == slow.text == rec.text and len(fast.text) > 0
    assert len(fast.rounds) >= 3
    assert all(len({c.text for c in rd.candidates}) == 1 for rd in fast.rounds)
    assert fast.skipped_verify == len(fast.rounds) and all(rd.raw_scores == {} for rd in fast.rounds)
    assert all(rd.verified for rd in slow.rounds)  # off by default
    # skipped rounds leave the weights alone; verifying identical texts taught Hedge next to
    # nothing either (equal scores up to rounding of the packed pass)
    third = {v: 1 / 3 for v in twins.verifiers}
    assert fast.rounds[-1].weights == pytest.approx(third)
    assert slow.rounds[-1].weights == pytest.approx(third, abs=0.02)
    # skipped verify passes are work not done: the verifier-only model processed the accepted
    # text once instead of both candidates
    judge = twins.verifiers[2]
    assert fed_fast[judge] < 0.75 * fed_slow[judge]


# -- weights across requests ------------------------------------------------------------
def test_learned_weights_carry_over_persist_and_reload(tiny, names, tmp_path):
    _reset_book(tiny)
    kw = dict(max_new_tokens=16, window=4, hedge_lr=5.0, hedge_schedule="constant", init_weights="learned")
    first = tiny.generate(PROMPTS[0], **kw)
    assert tiny.weights.requests == 1
    after_one = apply_floor(first.rounds[-1].weights, 0.1)  # running mean of one request, floored
    assert tiny.weights.learned == pytest.approx(after_one)
    assert max(after_one.values()) > 0.5  # it learned something
    second = tiny.generate(PROMPTS[1], **kw)
    assert tiny.weights.requests == 2
    expect = {n: (after_one[n] + second.rounds[-1].weights[n]) / 2 for n in names}
    assert tiny.weights.learned == pytest.approx(apply_floor(expect, 0.1))
    # the next request starts from the learned weights (lr 0: they stay put)
    third = tiny.generate(PROMPTS[2], max_new_tokens=12, window=4, hedge_lr=0.0, init_weights="learned")
    assert third.rounds[0].weights == pytest.approx(tiny.weights.learned)
    # other requests neither read nor move them
    before = dict(tiny.weights.learned)
    tiny.generate(PROMPTS[2], max_new_tokens=12, window=4, hedge_lr=20.0)
    assert tiny.weights.learned == before
    path = tmp_path / "w.json"
    tiny.save_weights(str(path))
    data = json.loads(path.read_text())
    assert data["format"] == "specem-fast-weights/1" and data["requests"] == 3
    learned = dict(tiny.weights.learned)
    _reset_book(tiny)  # a fresh process
    tiny.load_weights(str(path))
    assert tiny.weights.learned == pytest.approx(learned) and tiny.weights.requests == 3
    again = tiny.generate(PROMPTS[2], max_new_tokens=12, window=4, hedge_lr=0.0, init_weights="learned")
    assert again.text == third.text and again.rounds[0].weights == pytest.approx(third.rounds[0].weights)


def test_resumed_learned_eval_answers_as_an_uninterrupted_one(tiny, tmp_path, capsys):
    """A learned run's later batches start from weights learned on earlier ones; a run
    stopped after its first batch and resumed in a fresh process must pick them up."""
    from specem_fast.measure.datasets import load_items
    from specem_fast.measure.evaluate import LEARNED_KEY, run_eval

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in PROMPTS + [PROMPTS[0]]))
    items = load_items(str(data))
    kw = dict(dataset=str(data), settings=GenerationSettings(max_new_tokens=12, window=4, hedge_lr=5.0,
              hedge_schedule="constant", init_weights="learned"), systems=["ensemble"], progress=False, batch=2)

    def answers(path):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        return [(r["item_id"], r["output"], r[LEARNED_KEY]) for r in recs if r.get("type") == "item"]

    _reset_book(tiny)
    whole = tmp_path / "whole.jsonl"
    run_eval(tiny, items, out_path=whole, trace_path=tmp_path / "whole.trace", **kw)
    assert tiny.weights.requests == 4
    rounds = [r for r in map(json.loads, (tmp_path / "whole.trace").read_text().splitlines()) if r["round"] == 1]
    assert rounds[2]["weights"] != pytest.approx(rounds[0]["weights"])  # batch 2 really started elsewhere

    _reset_book(tiny)
    part = tmp_path / "part.jsonl"
    run_eval(tiny, items[:2], out_path=part, **kw)
    _reset_book(tiny)  # what a fresh process has
    run_eval(tiny, items, out_path=part, **kw)
    assert answers(part) == answers(whole)
    assert tiny.weights.requests == 4

    # stopped halfway through writing a batch: the rest of it cannot start from the weights
    # before the batch any more, and the user is told
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-1]))
    _reset_book(tiny)
    capsys.readouterr()
    run_eval(tiny, items, out_path=part, **kw)
    assert "stopped while writing a batch" in capsys.readouterr().err

    # the batch decides which requests learn from which: another batch is another run
    with pytest.raises(SpecEMError, match="batch"):
        run_eval(tiny, items, out_path=part, **{**kw, "batch": 1})


def test_prior_weights_start_the_request(tiny, names, tmp_path):
    _reset_book(tiny)
    with pytest.raises(SpecEMError, match="no prior weights"):
        tiny.generate(PROMPTS[0], max_new_tokens=8, init_weights="prior")
    assert tiny.cache.free_slots == tiny.config.max_batch  # refused before a slot was taken
    tiny.set_prior_weights({names[0]: 2, names[1]: 1, names[2]: 1})
    res = tiny.generate(PROMPTS[0], max_new_tokens=8, window=4, hedge_lr=0.0, init_weights="prior")
    assert res.rounds[0].weights == pytest.approx({names[0]: 0.5, names[1]: 0.25, names[2]: 0.25})
    with pytest.raises(SpecEMError, match="missing"):
        tiny.set_prior_weights({names[0]: 1.0})
    with pytest.raises(SpecEMError, match="finite number > 0"):
        tiny.set_prior_weights({names[0]: 1.0, names[1]: float("nan"), names[2]: 1.0})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "specem-fast-weights/1", "verifiers": ["x", "y"]}))
    with pytest.raises(SpecEMError, match="holds weights for"):
        tiny.load_weights(str(bad))
    bad.write_text("{not json")
    with pytest.raises(SpecEMError, match="cannot read weights file"):
        tiny.load_weights(str(bad))
    _reset_book(tiny)


# -- no self-votes, schedules -----------------------------------------------------------
@pytest.mark.parametrize("schedule,self_votes", [("constant", False), ("sqrt", True), ("reference", False)])
def test_weights_and_winner_follow_the_recorded_scores(tiny, names, schedule, self_votes):
    res = tiny.generate(PROMPTS[0], max_new_tokens=40, window=4, hedge_lr=3.0, hedge_schedule=schedule,
                        self_votes=self_votes)
    w = {n: 1 / 3 for n in names}
    checked = 0
    for rd in res.rounds:
        if not rd.verified:
            continue
        models = [c.model for c in rd.candidates]
        rewards = scoring.win_rate_rewards(rd.scores, models, names, self_votes)
        w = scoring.hedge_update(w, rewards, scoring.hedge_learning_rate(3.0, 3, rd.index, schedule))
        assert rd.weights == pytest.approx(w)
        combined = scoring.combine(rd.scores, w, None if self_votes else models)
        assert rd.combined == pytest.approx(combined)
        assert rd.winner == scoring.argmax_first(combined)
        checked += 1
    assert checked >= 3
    if schedule == "constant":  # weights move within one answer
        assert max(abs(v - 1 / 3) for v in w.values()) > 0.05


def test_bad_quality_settings_are_clear_errors():
    for kw, msg in [
        (dict(hedge_schedule="fast"), "hedge_schedule"),
        (dict(init_weights="best"), "init_weights"),
        (dict(exit_threshold=1.5), "exit_threshold"),
        (dict(exit_threshold=float("nan")), "exit_threshold"),
        (dict(exit_patience=0), "exit_patience"),
        (dict(skip_agreed="yes"), "skip_agreed"),
        (dict(self_votes=0), "self_votes"),
        (dict(fast_eos="no"), "fast_eos"),
        (dict(prefer_finished=1), "prefer_finished"),
        (dict(seed=10**14), "seed"),
    ]:
        with pytest.raises(SpecEMError, match=msg):
            GenerationSettings(**kw)


# -- the command line: calibrate, then use the weights ----------------------------------
def _cli(capsys, *argv):
    from specem_fast.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrate_then_generate_and_eval_with_the_weights(tiny_dirs, capsys, tmp_path):
    a, b = str(tiny_dirs["llama"]), str(tiny_dirs["mistral"])
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)))
    w = tmp_path / "w.json"
    code, out, err = _cli(capsys, "calibrate", str(data), "--skip", "1", "--limit", "3", "--models", f"{a},{b}",
                          "--max-new-tokens", "4", "--batch", "2", "--out", str(w), "--no-progress")
    assert code == 0, err
    book = json.loads(w.read_text())
    cal = book["calibration"]
    assert cal["skip"] == 1 and cal["limit"] == 3 and set(cal["accuracy"]) == {a, b}
    assert all(v["graded"] == 3 for v in cal["accuracy"].values())
    assert sum(book["prior"].values()) == pytest.approx(1.0) and book["learned"] == book["prior"]
    answers = [json.loads(x) for x in (tmp_path / "w.answers.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["item_id"] for r in answers) == sorted(["line-2", "line-3", "line-4"] * 2)  # item 1 skipped
    # generate starts from the prior (lr 0: it stays put) and can save the book again
    saved = tmp_path / "saved.json"
    code, out, err = _cli(capsys, "generate", "--prompt", "Say hi.", "--models", f"{a},{b}", "--weights", str(w),
                          "--init-weights", "prior", "--hedge-lr", "0", "--max-new-tokens", "6", "--window", "3",
                          "--exit-threshold", "0.01", "--skip-agreed", "--no-self-votes", "--hedge-schedule", "sqrt",
                          "--prefer-finished",
                          "--json", "--save-weights", str(saved))
    assert code == 0, err
    res = json.loads(out)
    assert res["rounds"][0]["weights"] == pytest.approx(book["prior"])
    assert res["settings"]["skip_agreed"] is True and res["settings"]["self_votes"] is False
    assert res["settings"]["prefer_finished"] is True
    assert res["settings"]["hedge_schedule"] == "sqrt" and res["settings"]["exit_threshold"] == 0.01
    assert json.loads(saved.read_text())["prior"] == pytest.approx(book["prior"])
    # eval with learned weights writes the learned book and reports drafting/verification
    out_file = tmp_path / "e.jsonl"
    code, out, err = _cli(capsys, "eval", str(data), "--limit", "2", "--models", f"{a},{b}", "--max-new-tokens", "4",
                          "--window", "3", "--weights", str(w), "--init-weights", "learned", "--no-singles",
                          "--save-weights", str(saved), "--out", str(out_file), "--no-progress", "--json")
    assert code == 0, err
    summary = json.loads(out)
    row = summary["systems"][0]
    assert 1.0 <= row["mean_drafters"] <= 2.0 and 0.0 <= row["skipped_verify_share"] <= 1.0
    assert json.loads(saved.read_text())["requests"] == summary["weights"]["requests"] >= 1


@pytest.mark.parametrize("args,message", [
    (["--init-weights", "prior"], "--init-weights prior needs prior weights"),
    (["--weights", "/nonexistent/w.json"], "does not exist"),
    (["--exit-threshold", "2"], "exit_threshold"),
    (["--hedge-schedule", "fast"], "invalid choice"),
    (["--save-weights", "/nonexistent/dir/w.json"], "does not exist"),
])
def test_quality_option_errors_exit_2_before_loading(capsys, args, message):
    code, out, err = _cli(capsys, "generate", "--prompt", "x", "--models", "/nonexistent-model", *args)
    assert code == 2 and message in err and out == ""


def test_default_dtype_follows_the_cpu(tmp_path):
    from specem_fast.model import runner as runtime

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n")
    assert runtime.bf16_in_cpuinfo(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert not runtime.bf16_in_cpuinfo(str(info))
    assert not runtime.bf16_in_cpuinfo(str(tmp_path / "missing"))
    assert runtime.resolve_dtype("cpu", "float32") == torch.float32
    assert runtime.resolve_dtype("cpu", None) == torch.float32  # the suite pins float32 (conftest)


def test_eval_results_remember_the_prior_they_started_from(tiny, names, tmp_path):
    from specem_fast.measure.evaluate import run_eval
    from specem_fast.measure.datasets import EvalItem

    items = [EvalItem(id="a", prompt="What is 2 plus 2?", answer="4", grader="number", dataset="d")]
    kw = dict(out_path=tmp_path / "r.jsonl", dataset="d", progress=False, systems=["ensemble"],
              settings={"max_new_tokens": 4, "window": 4, "init_weights": "prior"})
    _reset_book(tiny)
    tiny.set_prior_weights({names[0]: 0.5, names[1]: 0.25, names[2]: 0.25})
    run_eval(tiny, items, **kw)
    tiny.set_prior_weights({names[0]: 0.25, names[1]: 0.5, names[2]: 0.25})
    with pytest.raises(SpecEMError, match="prior"):  # other weights: another run, not a resume
        run_eval(tiny, items, **kw)
    _reset_book(tiny)


def test_a_drafter_left_alone_writes_what_it_writes_alone(tiny, names):
    """After the others exit, the last drafter keeps its exact sampled ids (no word-boundary
    cut, no re-encoding), so the answer is the one it writes decoding alone."""
    _reset_book(tiny)
    tiny.set_prior_weights({names[0]: 0.1, names[1]: 0.8, names[2]: 0.1})
    for prompt in PROMPTS:
        res = tiny.generate(prompt, max_new_tokens=30, window=4, init_weights="prior",
                            exit_threshold=0.2, exit_patience=1)
        assert all(rd.drafters == [names[1]] for rd in res.rounds)
        alone = tiny.generate_single(names[1], prompt, max_new_tokens=30)
        assert res.text == alone.text
        assert res.tokens_per_model[names[1]] == alone.new_tokens
    _reset_book(tiny)
