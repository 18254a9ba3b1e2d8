"""The round executor driven by scripted members: no model, no tensor, milliseconds each.

Each test states what the members draft and how they score, and checks the
rounds the executor runs: who won, whether a verify pass ran, how the answer
was cut and why the request ended.
"""

import math

import pytest

from scripted_member import ScriptedCrew, ScriptedMember
from specem_fast.config import GenerationSettings
from specem_fast.rounds.executor import RoundExecutor


def executor(*members, drafters=None, verifiers=None):
    names = [m.name for m in members]
    return RoundExecutor(ScriptedCrew(members), drafters or names, verifiers or names)


def start(ex, prompt="Q:", rid=1, slot=0, **settings):
    st = GenerationSettings(**settings)
    ids = {m: ex.crew.members[m].prompt_ids(prompt) for m in ex.crew.members}
    weights = {v: 1.0 / len(ex.verifiers) for v in ex.verifiers}
    return ex.open(rid, prompt, settings=st, prompt_ids=ids, weights=weights, slot=slot)


def run(ex, req, max_rounds=50):
    records = []
    for _ in range(max_rounds):
        records += [rec for r, rec in ex.round([req]) if r is req]
        if req.stop_reason:
            return ex.close(req), records
    raise AssertionError("the request did not end")


def test_the_best_scored_candidate_wins_and_every_member_appends_it():
    a = ScriptedMember("a", drafts=["The sea ", ("is blue.", True)], scores={"A sky ": -2.0})
    b = ScriptedMember("b", drafts=["A sky ", ("is grey.", True)], scores={"A sky ": -2.0})
    ex = executor(a, b)
    res, recs = run(ex, start(ex))
    assert res.text == "The sea is blue." and res.stop_reason == "stop"
    assert [r.winner_model for r in recs] == ["a", "a"] and all(r.verified for r in recs)
    assert [c.text for c in recs[0].candidates] == ["The sea ", "A sky "]
    # both verifiers scored the two texts -1.0 and -2.0: softmax shares, equal weights
    share = 1 / (1 + math.exp(-1.0))
    assert recs[0].scores["a"] == pytest.approx([share, 1 - share])
    assert recs[0].raw_scores == {"a": [-1.0, -2.0], "b": [-1.0, -2.0]}
    # every member appended every winner: prompt plus answer, in its own tokens
    assert [c.text for c in a.method_calls("commit")] == [c.text for c in b.method_calls("commit")] == \
        ["The sea ", "is blue."]
    assert res.tokens_per_model == {"a": 16, "b": 16} and res.new_tokens == 16
    assert not a.requests and not b.requests  # close() made both forget it


def test_agreeing_drafts_skip_the_verify_pass_with_skip_agreed():
    a = ScriptedMember("a", drafts=["same text ", ("end.", True)])
    b = ScriptedMember("b", drafts=["same text ", ("end.", True)])
    ex = executor(a, b)
    res, recs = run(ex, start(ex, skip_agreed=True))
    assert res.text == "same text end." and res.stop_reason == "stop"
    assert [r.verified for r in recs] == [False, False] and [r.winner_model for r in recs] == ["a", "a"]
    assert a.counts.get("verify", 0) == 0 and b.counts.get("verify", 0) == 0
    # without skip_agreed the same rounds are verified, and the tie goes to the first drafter
    a2 = ScriptedMember("a", drafts=["same text ", ("end.", True)])
    b2 = ScriptedMember("b", drafts=["same text ", ("end.", True)])
    ex2 = executor(a2, b2)
    res2, recs2 = run(ex2, start(ex2))
    assert res2.text == res.text and [r.verified for r in recs2] == [True, True]
    assert [r.winner_model for r in recs2] == ["a", "a"] and a2.counts["verify"] == 2


def test_one_competing_candidate_wins_without_a_verify_pass():
    a = ScriptedMember("a", drafts=["only me ", ("done", True)])
    b = ScriptedMember("b", drafts=["", ""])  # empty drafts do not compete
    ex = executor(a, b)
    res, recs = run(ex, start(ex))
    assert res.text == "only me done" and [r.verified for r in recs] == [False, False]
    assert [[c.model for c in r.candidates] for r in recs] == [["a"], ["a"]]


def test_every_draft_empty_ends_the_request_as_empty():
    ex = executor(ScriptedMember("a"), ScriptedMember("b"))
    res, recs = run(ex, start(ex))
    assert res.text == "" and res.stop_reason == "empty" and recs == []


def test_a_drafter_whose_weight_stays_low_stops_drafting_but_keeps_verifying():
    """Constant Hedge rate 2: after round 1 b's weight is 1 / (1 + e^2) = 0.119, below
    0.4 at the start of rounds 2 and 3, so with patience 2 b drafts rounds 1-2 only."""
    good = {f"a{i} ": -0.1 for i in range(6)}
    a = ScriptedMember("a", drafts=[f"a{i} " for i in range(6)], scores=good, default_score=-3.0)
    b = ScriptedMember("b", drafts=[f"b{i} " for i in range(6)], scores=good, default_score=-3.0)
    ex = executor(a, b)
    res, recs = run(ex, start(ex, max_new_tokens=15, window=3, hedge_lr=2.0, hedge_schedule="constant",
                             exit_threshold=0.4, exit_patience=2))
    assert [r.drafters for r in recs] == [["a", "b"], ["a", "b"], ["a"], ["a"], ["a"]]
    assert recs[0].weights["b"] == pytest.approx(1 / (1 + math.exp(2.0)))
    assert res.text == "a0 a1 a2 a3 a4 " and res.stop_reason == "length"
    assert b.counts["draft"] == 2 and b.counts["verify"] == 2  # rounds 3-5 had one candidate: no verify at all
    assert [r.verified for r in recs] == [True, True, False, False, False]


def test_a_longer_winner_in_the_lead_drafters_tokens_is_trimmed_to_the_budget():
    """b's tokens are two characters: its 4-token draft is 8 of a's tokens, and a
    (the lead drafter) has 5 left, so the answer keeps 5 of a's tokens."""
    a = ScriptedMember("a", drafts=["xy"], scores={"abcdefgh": -0.1})
    b = ScriptedMember("b", drafts=["abcdefghij"], chars_per_token=2, scores={"abcdefgh": -0.1})
    ex = executor(a, b)
    res, recs = run(ex, start(ex, max_new_tokens=5, window=4))
    assert recs[0].winner_model == "b" and recs[0].candidates[1].text == "abcdefgh"
    assert res.text == "abcde" and res.stop_reason == "length" and recs[0].accepted == "abcde"
    assert res.new_tokens == 5 and res.tokens_per_model == {"a": 5, "b": 3}  # "ab" "cd" "e"


def test_the_window_shrinks_to_what_the_budget_leaves():
    a = ScriptedMember("a", drafts=["aaaa", "bbbb", "cccc"])
    ex = executor(a)
    res, recs = run(ex, start(ex, max_new_tokens=10, window=4))
    assert [c.window for c in a.method_calls("draft")] == [4, 4, 2]
    assert res.text == "aaaabbbbcc" and res.stop_reason == "length" and res.new_tokens == 10


def test_no_room_to_draft_ends_the_request_with_cache_full():
    a = ScriptedMember("a", drafts=["aaaa", "bbbb", "cccc"], capacity=12)
    ex = executor(a)
    res, recs = run(ex, start(ex, prompt="0123", window=4))  # 4 + 4 + 4 fit; a third window does not
    assert res.text == "aaaabbbb" and res.stop_reason == "cache_full" and len(recs) == 2
    assert a.counts["draft"] == 2


def test_a_verifier_without_room_for_the_candidates_ends_the_request_with_cache_full():
    a = ScriptedMember("a", drafts=["aaaa"], capacity=100)
    b = ScriptedMember("b", drafts=["bbbb"], capacity=100)
    v = ScriptedMember("v", capacity=9)  # prompt 2 + 8 candidate tokens > 9
    ex = executor(a, b, v, drafters=["a", "b"], verifiers=["a", "b", "v"])
    res, recs = run(ex, start(ex))
    assert res.text == "" and res.stop_reason == "cache_full" and recs == []
    assert a.counts.get("commit", 0) == 0


def test_a_stop_string_across_two_segments_cuts_the_answer_before_it():
    a = ScriptedMember("a", drafts=["abEN", "Dxy", "more"])
    ex = executor(a)
    res, recs = run(ex, start(ex, stop=("END",)))
    assert res.text == "ab" and res.stop_reason == "stop_string" and len(recs) == 2
    assert [(r.accepted, r.answer_chars) for r in recs] == [("abEN", 4), ("", 2)]


def test_prefer_finished_lets_only_the_finished_drafts_compete():
    scores = {"a long answer that goes on": -0.1, "short.": -5.0}
    drafts = dict(a=["a long answer that goes on"], b=[("short.", True)])

    def members():
        return [ScriptedMember(n, drafts=d, scores=scores) for n, d in drafts.items()]

    ex = executor(*members())
    res, recs = run(ex, start(ex, window=40, max_new_tokens=40, prefer_finished=True))
    assert res.text == "short." and res.stop_reason == "stop"
    assert not recs[0].verified and [c.model for c in recs[0].candidates] == ["b"]
    ex = executor(*members())  # without it the better-scored unfinished draft wins
    res, recs = run(ex, start(ex, window=40, max_new_tokens=26))
    assert res.text == "a long answer that goes on" and res.stop_reason == "length" and recs[0].verified


def test_fast_eos_accepts_a_finished_draft_at_once():
    a = ScriptedMember("a", drafts=["keep going "], scores={"keep going ": 0.0})
    b = ScriptedMember("b", drafts=[("bye", True)])
    ex = executor(a, b)
    res, recs = run(ex, start(ex, fast_eos=True))
    assert res.text == "bye" and res.stop_reason == "fast_eos" and not recs[0].verified
    assert a.counts.get("verify", 0) == 0


def test_requests_in_one_round_are_batched_in_one_call_per_member():
    a = ScriptedMember("a", drafts=["x ", ("y", True)])
    b = ScriptedMember("b", drafts=["z ", ("w", True)], scores={"z ": 0.0, "w": 0.0})
    ex = executor(a, b)
    r1, r2 = start(ex, rid=1, slot=0), start(ex, rid=2, slot=1)
    events = list(ex.round([r1, r2]))
    assert [r.id for r, _ in events] == [1, 2]
    assert a.counts["draft"] == 1 and len(a.method_calls("draft")) == 2 and a.counts["verify"] == 1
    assert r1.answer == r2.answer == "z "


def test_a_member_that_raises_fails_the_round():
    a = ScriptedMember("a", drafts=["x", "y"], fail={"verify": 1})
    b = ScriptedMember("b", drafts=["p", "q"])
    ex = executor(a, b)
    req = start(ex)
    with pytest.raises(RuntimeError, match="a: verify exploded"):
        list(ex.round([req]))
    ex.discard([req.id])
    assert not a.requests and not b.requests


def test_a_member_out_of_step_is_refused():
    from specem_fast.members.interface import MemberStateError

    a = ScriptedMember("a", drafts=["x"])
    ex = executor(a)
    req = start(ex)
    req.counts["a"] += 1  # the executor's idea of the sequence no longer matches the member's
    with pytest.raises(MemberStateError, match="holds 2 tokens of request 1, the call expects 3"):
        list(ex.round([req]))
