"""Candidates with identical text get identical scores: each verifier scores the text
once and every drafter of it shares that score, so the tie breaks by drafter order
exactly, whatever the float rounding of the CPU or the batch (issue 25 part 7).

The first tests drive the round executor with a scripted crew (plain data, no model);
the last runs two local members with the same weights under different names.
"""

from __future__ import annotations

import shutil

from specem_fast.config import GenerationSettings
from specem_fast.members.interface import DraftOut, VerifyOut
from specem_fast.rounds import policy
from specem_fast.rounds.executor import RoundExecutor


def test_distinct_texts_numbers_texts_by_first_appearance():
    assert policy.distinct_texts([" sea is", " waves", " sea is"]) == [0, 1, 0]
    assert policy.distinct_texts(["a", "a", "a"]) == [0, 0, 0]
    assert policy.distinct_texts(["x", "y", "z"]) == [0, 1, 2]
    assert policy.distinct_texts([]) == []


class _Member:
    def __init__(self, name: str):
        self.name = name
        self.capacity = 10_000

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(map(chr, ids))


class _ScriptedCrew:
    """Members that draft fixed texts and score a text by a fixed table, plus float
    noise that depends on who drafted the copy being scored (as a verifier's own
    draft, scored from its drafting K/V, differs in the last bits from a re-encoded copy)."""

    def __init__(self, drafts: dict[str, str], score: dict[str, float], noisy: str):
        self.members = {m: _Member(m) for m in drafts}
        self.drafts, self.score, self.noisy = drafts, score, noisy
        self.verify_calls: list[dict] = []
        self.commit_calls: list[dict] = []

    def open(self, calls) -> None:
        pass

    def close(self, requests) -> None:
        pass

    def draft(self, calls):
        out = {}
        for m, cs in calls.items():
            ids = tuple(ord(c) for c in self.drafts[m])
            out[m] = [DraftOut(ids, self.drafts[m], ids, False) for _ in cs]
        return out

    def verify(self, calls):
        self.verify_calls.append(calls)
        out = {}
        for v, cs in calls.items():
            out[v] = []
            for c in cs:
                s = tuple(self.score[t] + (3e-6 if m == self.noisy else 0.0) for m, t in c.candidates)
                out[v].append(VerifyOut(s, s, lengths=tuple(len(t) for _, t in c.candidates)))
        return out

    def commit(self, calls):
        self.commit_calls.append(calls)
        return {m: [tuple(ord(ch) for ch in c.text) for c in cs] for m, cs in calls.items()}


def _one_round(crew: _ScriptedCrew, **settings):
    names = list(crew.members)
    ex = RoundExecutor(crew, names, names)
    st = GenerationSettings(max_new_tokens=50, **settings)
    req = ex.open(1, "p", settings=st, prompt_ids={m: [1, 2] for m in names},
                  weights={m: 1 / len(names) for m in names}, slot=0)
    [(_, record)] = list(ex.round([req]))
    return req, record


def test_two_drafters_of_one_text_get_equal_scores_and_the_earlier_wins():
    # b's copies score 3e-6 higher: scored separately, b would win on float noise alone
    crew = _ScriptedCrew({"a": " sea is", "b": " sea is", "c": " waves"}, {" sea is": -0.5, " waves": -2.0},
                         noisy="b")
    req, rec = _one_round(crew)
    # one verify call per verifier, each text once, named by the verifier where it drafted it
    calls = crew.verify_calls[0]
    assert calls["a"][0].candidates == (("a", " sea is"), ("c", " waves"))
    assert calls["b"][0].candidates == (("b", " sea is"), ("c", " waves"))
    assert calls["c"][0].candidates == (("a", " sea is"), ("c", " waves"))
    for v, raw in rec.raw_scores.items():
        assert raw[0] == raw[1], v  # exactly equal, not approximately
        assert rec.verify_tokens[v] == [7, 7, 6]
    assert rec.raw_scores["b"] == [-0.5 + 3e-6, -0.5 + 3e-6, -2.0]
    assert rec.combined[0] == rec.combined[1]
    assert rec.winner == 0 and rec.winner_model == "a"
    # Hedge: a and b won every comparison (a tie counts as a win for both), c none
    assert req.weights["a"] == req.weights["b"] > req.weights["c"]
    # the commit names the winner's branch among the texts each verifier scored
    assert {c[0].winner for c in crew.commit_calls[0].values()} == {0}
    assert req.answer == " sea is"


def test_the_commit_names_the_winning_text_among_the_distinct_ones():
    crew = _ScriptedCrew({"a": " x", "b": " x", "c": " y"}, {" x": -3.0, " y": -0.1}, noisy="a")
    req, rec = _one_round(crew)
    assert rec.winner == 2 and rec.winner_model == "c"
    assert {c[0].winner for c in crew.commit_calls[0].values()} == {1}  # the second distinct text
    assert req.answer == " y"


def test_without_self_votes_identical_texts_still_share_each_verifiers_score():
    crew = _ScriptedCrew({"a": " sea is", "b": " sea is", "c": " waves"}, {" sea is": -0.5, " waves": -2.0},
                         noisy="b")
    _, rec = _one_round(crew, self_votes=False)
    for v, raw in rec.scores.items():
        assert raw[0] == raw[1], v
    assert rec.winner_model in ("a", "b")  # each is judged without its own vote; the rule is exact arithmetic


def test_two_local_members_with_the_same_weights_tie_exactly(tiny_dirs, tmp_path):
    """Two copies of one tiny model draft the same greedy text every round; their
    candidates' scores are equal to the bit under every verifier and the first wins."""
    from specem_fast import Ensemble

    twin = tmp_path / "tiny-llama-twin"
    shutil.copytree(tiny_dirs["llama"], twin)
    ens = Ensemble.from_pretrained([str(tiny_dirs["llama"]), str(twin), str(tiny_dirs["qwen2"])],
                                   cache_tokens=512, max_batch=2, dtype="float32", kernels="torch",
                                   preset="reference")
    first, second = ens.model_names[0], ens.model_names[1]
    results = ens.generate(["Write a short poem about the sea.", "List three colours."], max_new_tokens=16, window=4)
    tied = 0
    for res in results:
        for rd in res.rounds:
            models = [c.model for c in rd.candidates]
            if first not in models or second not in models:
                continue
            i, j = models.index(first), models.index(second)
            assert rd.candidates[i].text == rd.candidates[j].text
            if not rd.verified:
                continue
            tied += 1
            for v, raw in rd.raw_scores.items():
                assert raw[i] == raw[j], (v, raw)
            assert rd.combined[i] == rd.combined[j]
            if rd.winner_model in (first, second):
                assert rd.winner_model == first
    assert tied >= 2
    alone = ens.generate("Write a short poem about the sea.", max_new_tokens=16, window=4)
    assert alone.text == results[0].text
    assert [rd.winner_model for rd in alone.rounds] == [rd.winner_model for rd in results[0].rounds]

