"""The engine loop driven by scripted members (no model): admission, the waiting
queue, cancellation, failures and the weights a request learns, in milliseconds.

Admission (issue 28): a request that arrives while a slot is free takes it at the
next round boundary and never counts as waiting; ``max_waiting`` bounds only the
requests with no slot to go to; ``max_waiting=0`` refuses exactly when every slot is
busy.
"""

import queue
import threading
import time

import pytest

from scripted_member import ScriptedCrew, ScriptedMember, Slots
from specem_fast.config import GenerationSettings
from specem_fast.engine.core import EngineCore, Job
from specem_fast.errors import QueueFullError, RequestCancelled
from specem_fast.results import GenerationResult, RoundRecord, SingleResult
from specem_fast.rounds.executor import RoundExecutor
from specem_fast.rounds.single import Baseline
from specem_fast.rounds.weights import WeightBook

LONG = ["w "] * 200  # a drafter that never ends on its own


class Gate:
    """Holds member ``a``'s draft calls while closed, so a round is in flight."""

    def __init__(self):
        self.open = threading.Event()
        self.entered = threading.Event()

    def __call__(self, method):
        if method == "draft":
            self.entered.set()
            assert self.open.wait(10), "the gate was never opened"

    def hold(self):
        """Wait until a round is drafting behind the gate."""
        assert self.entered.wait(10)


def make(slots=2, max_waiting=4, drafts=(LONG, LONG), gate=None, **kw):
    members = [ScriptedMember("a", drafts=drafts[0], hook=gate, **kw), ScriptedMember("b", drafts=drafts[1])]
    crew = ScriptedCrew(members)
    ex = RoundExecutor(crew, ["a", "b"], ["a", "b"])
    pool = Slots(slots)
    engine = EngineCore(ex, Baseline(crew), pool, max_waiting=max_waiting)
    return engine, members, pool


def job(engine, prompt="Q:", book=None, single=None, **settings):
    st = GenerationSettings(**{"max_new_tokens": 40, "window": 4, **settings})
    members = engine.executor.crew.members
    return Job(prompt, {m: members[m].prompt_ids(prompt) for m in members}, st, single=single, book=book,
               metadata={"made_by": "test"})


def last(q, timeout=10):
    while True:
        ev = q.get(timeout=timeout)
        if not isinstance(ev, RoundRecord):
            return ev


def idle(engine, pool, members):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if engine.running == 0 and engine.waiting == 0 and pool.free_slots == pool.num_slots:
            return all(not m.requests for m in members)
        time.sleep(0.001)
    return False


@pytest.fixture
def closing():
    engines = []
    yield engines.append
    for e in engines:
        e.close()


def test_requests_run_to_their_results_with_their_metadata(closing):
    engine, members, pool = make(drafts=(["x ", ("y.", True)], ["p ", ("q.", True)]))
    closing(engine)
    out = dict(engine.run([job(engine), job(engine, "Other:")]))
    assert [out[i].text for i in (0, 1)] == ["x y.", "x y."]  # ties go to the first drafter
    assert out[0].metadata == {"made_by": "test"} and out[0].stop_reason == "stop"
    assert engine.stats["rounds"] == 2 and engine.stats["batched_rounds"] == 2 and engine.stats["max_running"] == 2
    assert idle(engine, pool, members)


def test_a_request_arriving_mid_round_takes_a_free_slot_even_with_no_queue(closing):
    gate = Gate()
    engine, members, pool = make(slots=2, max_waiting=0, gate=gate)
    closing(engine)
    ha, qa = engine.submit(job(engine, max_new_tokens=8))
    gate.hold()  # a's first round is drafting; one slot is free
    assert (engine.running, engine.waiting) == (1, 0)
    hb, qb = engine.submit(job(engine, max_new_tokens=8))  # not refused: a slot is free
    assert (engine.running, engine.waiting) == (2, 0)
    with pytest.raises(QueueFullError, match=r"\(0 requests wait for a slot, max_waiting=0, and all 2 slots"):
        engine.submit(job(engine))  # both slots are taken or promised, and there is no queue
    gate.open.set()
    assert last(qa).text == last(qb).text == "w w w w "
    # four rounds of "w " each; b joined at the next boundary: a's rounds 2-4 were b's 1-3
    assert (engine.stats["rounds"], engine.stats["batched_rounds"]) == (5, 3)
    assert idle(engine, pool, members)
    engine.submit(job(engine, max_new_tokens=2))  # slots are back: taken again
    assert idle(engine, pool, members)


def test_max_waiting_one_queues_one_request_beyond_the_slots(closing):
    gate = Gate()
    engine, members, pool = make(slots=2, max_waiting=1, gate=gate)
    closing(engine)
    subs = [engine.submit(job(engine, max_new_tokens=4))]
    gate.hold()
    subs.append(engine.submit(job(engine, max_new_tokens=4)))  # the free slot
    assert (engine.running, engine.waiting) == (2, 0)
    subs.append(engine.submit(job(engine, max_new_tokens=4)))  # waits for a slot
    assert (engine.running, engine.waiting) == (2, 1)
    with pytest.raises(QueueFullError, match=r"\(1 requests wait for a slot, max_waiting=1"):
        engine.submit(job(engine))
    gate.open.set()
    assert [last(q).text for _, q in subs] == ["w w "] * 3
    assert idle(engine, pool, members)


@pytest.mark.parametrize("max_waiting", [3, 5])
def test_a_burst_fills_the_slots_then_the_queue_then_is_refused(closing, max_waiting):
    gate = Gate()
    engine, members, pool = make(slots=2, max_waiting=max_waiting, gate=gate)
    closing(engine)
    q: queue.Queue = queue.Queue()
    n = 2 + max_waiting
    handles = engine.submit_many([(job(engine, max_new_tokens=2), q.put) for _ in range(n)], all_or_none=True)
    assert len(handles) == n and (engine.running, engine.waiting) == (2, max_waiting)
    with pytest.raises(QueueFullError):
        engine.submit_many([(job(engine), q.put)])
    gate.open.set()
    texts = []
    while len(texts) < n:
        ev = q.get(timeout=10)
        if isinstance(ev, GenerationResult):
            texts.append(ev.text)
    assert texts == ["w "] * n and engine.stats["max_running"] == 2
    assert idle(engine, pool, members)


def test_a_burst_without_all_or_none_takes_what_fits(closing):
    gate = Gate()
    engine, members, pool = make(slots=2, max_waiting=1, gate=gate)
    closing(engine)
    q: queue.Queue = queue.Queue()
    handles = engine.submit_many([(job(engine, max_new_tokens=2), q.put) for _ in range(5)])
    assert len(handles) == 3 and (engine.running, engine.waiting) == (2, 1)
    with pytest.raises(QueueFullError):
        engine.submit_many([(job(engine), q.put)] * 2, all_or_none=True)
    gate.open.set()
    assert idle(engine, pool, members)


def test_run_feeds_a_list_longer_than_slots_and_queue_as_slots_come_back(closing):
    engine, members, pool = make(slots=2, max_waiting=0)
    closing(engine)
    out = dict(engine.run([job(engine, max_new_tokens=2) for _ in range(7)]))
    assert sorted(out) == list(range(7)) and {r.text for r in out.values()} == {"w "}
    assert engine.stats["max_running"] == 2 and idle(engine, pool, members)


def test_cancelling_a_running_request_frees_its_slot_within_a_round(closing):
    gate = Gate()
    engine, members, pool = make(slots=1, max_waiting=1, gate=gate)
    closing(engine)
    h, q = engine.submit(job(engine, max_new_tokens=100))
    gate.hold()
    engine.cancel(h.id)
    gate.open.set()
    events = [q.get(timeout=10), q.get(timeout=10)]
    assert isinstance(events[0], RoundRecord) and isinstance(events[1], RequestCancelled)
    assert members[0].counts["draft"] <= 2 and idle(engine, pool, members)


def test_cancelling_a_waiting_request_ends_it_at_once(closing):
    gate = Gate()
    engine, members, pool = make(slots=1, max_waiting=1, gate=gate)
    closing(engine)
    ha, qa = engine.submit(job(engine, max_new_tokens=4))
    gate.hold()
    hb, qb = engine.submit(job(engine, max_new_tokens=4))
    assert engine.waiting == 1
    engine.cancel(hb.id)
    assert isinstance(qb.get(timeout=1), RequestCancelled) and engine.waiting == 0
    gate.open.set()
    assert last(qa).text == "w w " and idle(engine, pool, members)


def test_a_member_that_raises_ends_the_round_s_requests_and_the_engine_goes_on(closing):
    engine, members, pool = make(fail={"draft": 2})
    closing(engine)
    with pytest.raises(RuntimeError, match="a: draft exploded"):
        list(engine.run([job(engine), job(engine)]))
    assert idle(engine, pool, members)
    out = dict(engine.run([job(engine, max_new_tokens=4)]))
    assert out[0].text == "w w "  # the script moved on: this request drafts from where the member is


def test_a_request_that_fails_to_open_ends_alone(closing):
    engine, members, pool = make(fail={"open": 1})
    closing(engine)
    q: queue.Queue = queue.Queue()
    bad, good = engine.submit_many([(job(engine, max_new_tokens=4), q.put), (job(engine, "B:", max_new_tokens=4),
                                                                              q.put)])
    first = q.get(timeout=10)
    assert isinstance(first, RuntimeError) and "open exploded" in str(first) and bad.done.is_set()
    assert last(q).text == "w w " and good.done.is_set()
    assert idle(engine, pool, members)


def test_a_single_model_request_decodes_one_token_a_round(closing):
    engine, members, pool = make(drafts=(["H", "i", "!", ("", True)], LONG))
    closing(engine)
    out = dict(engine.run([job(engine, single="a")]))
    assert isinstance(out[0], SingleResult) and out[0].text == "Hi!" and out[0].stop_reason == "stop"
    assert [c.window for c in members[0].method_calls("draft")] == [1, 1, 1, 1]
    assert idle(engine, pool, members)


def test_close_ends_what_runs_and_what_waits(closing):
    gate = Gate()
    engine, members, pool = make(slots=1, max_waiting=1, gate=gate)
    ha, qa = engine.submit(job(engine))
    gate.hold()
    hb, qb = engine.submit(job(engine))
    closer = threading.Thread(target=engine.close)
    closer.start()
    gate.open.set()
    closer.join(10)
    assert isinstance(last(qa), RequestCancelled) and isinstance(last(qb), RequestCancelled)
    assert engine.closed and not engine.alive and pool.free_slots == 1
    with pytest.raises(Exception, match="engine is closed"):
        engine.submit(job(engine))


def test_learned_weights_are_taken_at_admission_and_learned_once_per_request(closing):
    engine, members, pool = make(drafts=(["good ", ("end", True)], ["bad ", ("end", True)]))
    members[0].scores.update({"good ": -0.1})
    closing(engine)
    book = WeightBook(["a", "b"])
    before = dict(book.learned)
    out = dict(engine.run([job(engine, book=book, init_weights="learned", hedge_lr=5.0,
                              hedge_schedule="constant", window=8)]))
    assert out[0].text == "good end" and book.requests == 1
    assert book.learned["a"] > before["a"]
    # uniform-start requests teach the book nothing
    dict(engine.run([job(engine, book=book, hedge_lr=5.0)]))
    assert book.requests == 1


def test_stop_strings_and_cache_full_end_requests_in_one_batch(closing):
    engine, members, pool = make(drafts=(["abEN", "Dxy", "more"], ["", "", ""]), capacity=12)
    closing(engine)
    out = dict(engine.run([job(engine, "0123", stop=("END",)), job(engine, "0123")]))
    assert (out[0].text, out[0].stop_reason) == ("ab", "stop_string")
    # no stop string: prompt 4 + "abEN" 4 + "Dxy" 3 hold 11 of 12 tokens; a third window of 4 does not fit
    assert (out[1].text, out[1].stop_reason) == ("abENDxy", "cache_full")
    assert idle(engine, pool, members)
