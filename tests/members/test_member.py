"""The member interface: plain data in and out, and a member that is out of step says so."""

import dataclasses
import pickle

import pytest

from specem_fast import Ensemble
from specem_fast.members.interface import DraftCall, DraftOut, MemberStateError, OpenCall, VerifyCall, VerifyOut

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?"]
KW = dict(max_new_tokens=16, window=4)


@pytest.fixture(scope="module")
def ens(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    return Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)


def _plain(x):
    """Only ints, floats, bools, strs, None and tuples/lists/dicts/dataclasses of them."""
    if dataclasses.is_dataclass(x):
        return all(_plain(getattr(x, f.name)) for f in dataclasses.fields(x))
    if isinstance(x, (tuple, list)):
        return all(_plain(v) for v in x)
    if isinstance(x, dict):
        return all(_plain(k) and _plain(v) for k, v in x.items())
    return x is None or isinstance(x, (int, float, bool, str))


class PickledCrew:
    """Every call and every answer goes through pickle, as across a process boundary,
    and each is checked to be plain data; members run one after another."""

    def __init__(self, members):
        self.members = members
        self.calls = 0

    def _call(self, m, method, arg):
        assert _plain(arg)
        out = getattr(self.members[m], method)(pickle.loads(pickle.dumps(arg)))
        assert _plain(out)
        self.calls += 1
        return pickle.loads(pickle.dumps(out))

    def open(self, calls):
        for m, cs in calls.items():
            self._call(m, "open", cs)

    def draft(self, calls):
        return {m: self._call(m, "draft", cs) for m, cs in calls.items() if cs}

    def verify(self, calls):
        return {m: self._call(m, "verify", cs) for m, cs in calls.items() if cs}

    def commit(self, calls):
        return {m: self._call(m, "commit", cs) for m, cs in calls.items() if cs}

    def close(self, requests):
        for m in self.members:
            self._call(m, "close", list(requests))


def test_rounds_across_a_process_boundary_answer_the_same(ens, monkeypatch):
    want = ens.generate(PROMPTS, **KW)
    want_sampled = ens.generate(PROMPTS[0], temperature=0.8, seed=4, **KW)
    want_single = ens.generate_single(ens.model_names[1], PROMPTS, max_new_tokens=8)
    crew = PickledCrew(ens.members)
    monkeypatch.setattr(ens.executor, "crew", crew)
    monkeypatch.setattr(ens.engine.baseline, "crew", crew)
    got = ens.generate(PROMPTS, **KW)
    assert [r.text for r in got] == [r.text for r in want]
    for a, b in zip(got, want):
        assert [rd.raw_scores for rd in a.rounds] == [rd.raw_scores for rd in b.rounds]
        assert a.tokens_per_model == b.tokens_per_model
    assert ens.generate(PROMPTS[0], temperature=0.8, seed=4, **KW).text == want_sampled.text
    assert [r.text for r in ens.generate_single(ens.model_names[1], PROMPTS, max_new_tokens=8)] == \
        [r.text for r in want_single]
    assert crew.calls > 20
    assert all(not m.requests for m in ens.members.values())


def test_a_call_out_of_step_is_refused_and_changes_nothing(ens):
    m = ens.members[ens.model_names[0]]
    slot = ens.cache.allocate()
    try:
        ids = m.prompt_ids("Hi there")
        m.open([OpenCall(900, slot, tuple(ids))])
        with pytest.raises(MemberStateError, match=f"holds {len(ids)} tokens of request 900, the call expects"):
            m.draft([DraftCall(900, len(ids) + 1, 4)])
        with pytest.raises(MemberStateError, match="holds no request 901"):
            m.draft([DraftCall(901, len(ids), 4)])
        with pytest.raises(MemberStateError, match="already holds request 900"):
            m.open([OpenCall(900, slot, tuple(ids))])
        assert ens.cache[m.name].length[slot] == 0  # nothing was written
        out = m.draft([DraftCall(900, len(ids), 4)])[0]
        assert isinstance(out, DraftOut) and 1 <= len(out.tokens) <= 4
        res = m.verify([VerifyCall(900, len(ids), ((m.name, out.text), ("other", " a b")))])[0]
        assert isinstance(res, VerifyOut) and res.room and len(res.mean_logprob) == 2
        assert all(lp <= 0 for lp in res.mean_logprob)
    finally:
        m.close([900])
        ens.cache.free(slot)
    assert m.requests == []


def test_an_out_of_step_member_fails_its_request_not_the_engine(ens, monkeypatch):
    want = ens.generate(PROMPTS[1], **KW).text
    real = ens.executor._commit

    def commit_off_by_one(turns):
        out = real(turns)
        for t in turns:
            t.req.counts[ens.model_names[2]] += 1  # the scheduler now expects one token more
        return out

    monkeypatch.setattr(ens.executor, "_commit", commit_off_by_one)
    with pytest.raises(MemberStateError, match="out of step"):
        ens.generate(PROMPTS[0], **KW)
    monkeypatch.undo()
    assert ens.cache.free_slots == ens.config.max_batch
    assert all(not m.requests for m in ens.members.values())
    assert ens.generate(PROMPTS[1], **KW).text == want
