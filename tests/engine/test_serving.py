"""Issue 10 (items 1-3): the engine loop with continuous batching, chat input, the async API."""

import asyncio
import gc
import queue
import threading
import time

import pytest

from specem_fast import (AsyncEnsemble, Ensemble, GenerationResult, GenerationSettings, QueueFullError,
                         RequestCancelled, RoundRecord)
from specem_fast.errors import SpecEMError

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?", "List three colours.", "Name a big city."]
KW = dict(max_new_tokens=30, window=4)


@pytest.fixture(scope="module")
def ens(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    e = Ensemble.from_pretrained(names, cache_tokens=512, max_batch=3)
    yield e
    e.close()


@pytest.fixture(scope="module")
def alone(ens):
    return [ens.generate(p, **KW).text for p in PROMPTS]


def drain(q, timeout=120):
    """A submitted request's events up to its last one."""
    out = []
    while True:
        ev = q.get(timeout=timeout)
        out.append(ev)
        if not isinstance(ev, RoundRecord):
            return out


def idle(ens):
    return ens.cache.free_slots == ens.config.max_batch and ens.engine.running == 0 and all(not m.requests for m in ens.members.values())


# -- 1. engine loop ----------------------------------------------------------------
@pytest.mark.parametrize("join_after", [1, 2, 4])
def test_a_request_that_joins_a_running_batch_keeps_its_greedy_answer(ens, join_after):
    """B is submitted from the engine's own event hand-off right after A's round
    ``join_after``, so it enters the batch at A's next round: both answers equal
    running alone."""
    long = dict(max_new_tokens=80, window=3)
    ref = [ens.generate(p, **long).text for p in PROMPTS[:2]]
    job_b = ens.prepare(PROMPTS[1], **long)
    seen, joined = {"n": 0}, {}
    qa = queue.Queue()

    def sink_a(ev):
        qa.put(ev)
        if isinstance(ev, RoundRecord):
            seen["n"] += 1
            if seen["n"] == join_after:
                joined["h"], joined["q"] = ens.engine.submit(job_b)

    before = dict(ens.engine.stats)
    ens.submit(PROMPTS[0], sink=sink_a, **long)
    res_a = drain(qa)[-1]
    res_b = drain(joined["q"])[-1]
    assert isinstance(res_a, GenerationResult) and isinstance(res_b, GenerationResult)
    assert len(res_a.rounds) > join_after + 1  # A was mid-answer when B joined
    assert res_a.text == ref[0] and res_b.text == ref[1]
    assert ens.engine.stats["batched_rounds"] > before["batched_rounds"]  # they really ran together
    assert idle(ens)


def test_many_threads_are_batched_and_answer_as_sequential_calls(ens, alone):
    before = dict(ens.engine.stats)
    got, errors = {}, []
    start = threading.Barrier(len(PROMPTS))

    def work(i):
        try:
            start.wait()
            got[i] = ens.generate(PROMPTS[i], **KW).text
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]  # 4 callers, 3 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [got[i] for i in range(len(PROMPTS))] == alone
    stats = ens.engine.stats
    assert stats["batched_rounds"] - before["batched_rounds"] >= 3  # rounds that served several callers
    assert stats["max_running"] == 3
    assert idle(ens)


def test_cancel_frees_the_slot_within_one_round(ens):
    h, q = ens.submit(PROMPTS[0], max_new_tokens=200, window=4)
    assert isinstance(q.get(timeout=120), RoundRecord)
    rounds_at_cancel = ens.engine.stats["rounds"]
    ens.cancel(h.id)
    evs = drain(q)
    assert isinstance(evs[-1], RequestCancelled)
    assert h.done.is_set() and idle(ens)
    assert ens.engine.stats["rounds"] - rounds_at_cancel <= 1
    ens.cancel(h.id)  # cancelling a finished request does nothing


def test_an_abandoned_stream_cancels_its_request(ens, alone):
    s = ens.stream(PROMPTS[0], max_new_tokens=200, window=4)
    next(s)
    assert ens.engine.running == 1
    s.close()  # stops reading: the slot is free when close returns
    assert idle(ens)
    s = ens.stream_with_result(PROMPTS[0], max_new_tokens=200, window=4)
    next(s)
    del s  # garbage collected
    gc.collect()
    assert idle(ens)
    assert ens.generate(PROMPTS[0], **KW).text == alone[0]


def test_a_full_waiting_queue_refuses_at_once(ens, alone):
    running = [ens.submit(p, max_new_tokens=200, window=4) for p in PROMPTS[:3]]
    for _, q in running:  # all three admitted: every slot taken, the queue is empty
        assert isinstance(q.get(timeout=120), RoundRecord)
    ens.engine.max_waiting = 1
    try:
        waiting = ens.submit(PROMPTS[3], **KW)
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError, match=r"waiting queue is full \(1 requests"):
            ens.submit(PROMPTS[3], **KW)
        assert time.perf_counter() - t0 < 0.5
        with pytest.raises(QueueFullError):
            ens.generate(PROMPTS[3], **KW)
        for h, _ in running:
            ens.cancel(h.id)
        assert drain(waiting[1])[-1].text == alone[3]  # the waiting one ran once slots came back
    finally:
        ens.engine.max_waiting = 256
    assert idle(ens)


def test_an_error_in_one_request_leaves_the_others_running(ens, alone, monkeypatch):
    real = ens.executor.open

    def open_(request_id, prompt, *a, **k):
        if prompt == PROMPTS[2]:
            raise RuntimeError("open failed")
        return real(request_id, prompt, *a, **k)

    monkeypatch.setattr(ens.executor, "open", open_)
    h, q = ens.submit(PROMPTS[0], **KW)
    with pytest.raises(RuntimeError, match="open failed"):
        ens.generate(PROMPTS[2], **KW)
    assert drain(q)[-1].text == alone[0]
    monkeypatch.undo()
    assert idle(ens)


def test_per_request_settings_in_one_batch(ens, alone):
    sampled = ens.generate(PROMPTS[1], temperature=0.8, seed=3, **KW).text
    got = ens.generate(PROMPTS[:3], settings=[GenerationSettings(**dict(KW, max_new_tokens=8)),
                                              GenerationSettings(**dict(KW, temperature=0.8, seed=3)),
                                              GenerationSettings(**KW)])
    assert got[0].new_tokens == 8 and alone[0].startswith(got[0].text)
    assert got[1].text == sampled and got[2].text == alone[2]


def test_close_stops_the_engine(tiny_dirs):
    e = Ensemble.from_pretrained([str(tiny_dirs["llama"])], cache_tokens=256, max_batch=1)
    h, q = e.submit(PROMPTS[0], max_new_tokens=100, window=4)
    q.get(timeout=120)
    e.close()
    assert isinstance(drain(q)[-1], RequestCancelled)
    assert e.cache.free_slots == 1 and not e.engine.alive
    with pytest.raises(SpecEMError, match="engine is closed"):
        e.generate(PROMPTS[0], max_new_tokens=4)


# -- 2. chat input -------------------------------------------------------------------
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]


def test_chat_renders_with_each_models_template(ens):
    for r in ens.runners.values():
        tok = r.codec.tok
        if not r.codec.has_template:  # the tiny gemma folder has none: the plain rendering
            assert r.codec.chat_ids([("user", "hi")]) == tok.encode("User: hi\n\nAssistant:")
            continue
        conv = CHAT if r.codec.tok.chat_template and "system" in tok.chat_template else CHAT[1:]
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        expect = tok(text, add_special_tokens=False)["input_ids"]
        got = r.codec.chat_ids([(m["role"], m["content"]) for m in conv])
        assert got == expect, r.name
        # one user message is the plain prompt
        assert r.codec.chat_ids([("user", PROMPTS[0])]) == r.codec.prompt_ids(PROMPTS[0])


def test_chat_content_is_text_never_control_tokens(ens):
    for r in ens.runners.values():
        codec = r.codec
        markers = [t for t in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<start_of_turn>", "<|im_start|>")
                   if t in codec.tok.get_vocab()]
        evil = "hi " + " ".join(markers) + " there"
        clean = codec.chat_ids([("user", "hi there")])
        got = codec.chat_ids([("user", evil)])
        control = {codec.tok.get_vocab()[m] for m in markers}
        assert sum(i in control for i in got) == sum(i in control for i in clean), r.name


def test_a_model_without_a_template_gets_the_plain_rendering(ens, monkeypatch):
    r = next(iter(ens.runners.values()))
    monkeypatch.setattr(r.codec, "has_template", False)
    conv = [(m["role"], m["content"]) for m in CHAT]
    text = "System: You are terse.\n\nUser: What is 2+2?\n\nAssistant: 4.\n\nUser: And 3+3?\n\nAssistant:"
    assert r.codec.chat_ids(conv) == r.codec.tok.encode(text, add_special_tokens=True)


def test_generate_with_messages_reports_prompt_tokens(ens, alone):
    one = [{"role": "user", "content": PROMPTS[0]}]
    res = ens.generate(messages=one, **KW)
    assert res.prompt_tokens == {n: len(r.codec.chat_ids([("user", PROMPTS[0])])) for n, r in ens.runners.items()}
    for n, r in ens.runners.items():
        if r.codec.has_template:  # one user turn is the plain prompt
            assert res.prompt_tokens[n] == len(r.codec.prompt_ids(PROMPTS[0]))
    assert res.new_tokens == res.tokens_per_model[ens.model_names[0]] and res.text
    chats = ens.generate(messages=[CHAT[1:], one], **KW)
    assert len(chats) == 2 and chats[1].text == res.text
    assert chats[0].prompt_tokens == {n: len(r.codec.chat_ids([(m["role"], m["content"]) for m in CHAT[1:]]))
                                      for n, r in ens.runners.items()}
    segs = list(ens.stream(messages=one, **KW))
    assert "".join(s.text for s in segs) == res.text
    plain = ens.generate(PROMPTS[1], **KW)
    assert plain.text == alone[1]
    assert plain.prompt_tokens == {n: len(r.codec.prompt_ids(PROMPTS[1])) for n, r in ens.runners.items()}
    single = ens.generate_single(ens.model_names[0], PROMPTS[1], max_new_tokens=4)
    assert single.prompt_tokens == len(ens.runners[ens.model_names[0]].codec.prompt_ids(PROMPTS[1]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(messages=[]), "non-empty list"),
    (dict(messages=[{"role": "bot", "content": "x"}]), "role 'bot'"),
    (dict(messages=[{"role": "user"}]), "must be a dict with 'role' and 'content'"),
    (dict(messages=[{"role": "user", "content": 3}]), "content is int"),
    (dict(messages=[{"role": "system", "content": "x"}]), "no user message"),
    (dict(messages=[{"role": "user", "content": "\ud800"}]), "not valid Unicode"),
    (dict(prompts="hi", messages=[{"role": "user", "content": "x"}]), "either a prompt or messages"),
    (dict(), "not NoneType; give a prompt or messages"),
])
def test_bad_messages_are_clear_errors(ens, kwargs, message):
    with pytest.raises(SpecEMError, match=message):
        ens.generate(**kwargs)
    assert idle(ens)


# -- 3. async API ----------------------------------------------------------------------
def test_async_generate_and_stream(ens, alone):
    aens = AsyncEnsemble(ens)

    async def main():
        ticks = {"n": 0}
        stop = asyncio.Event()

        async def ticker():  # the loop keeps running while the engine computes
            while not stop.is_set():
                ticks["n"] += 1
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(*(aens.generate(p, **KW) for p in PROMPTS))
        segs = [s async for s in aens.stream(PROMPTS[1], **KW)]
        chat = await aens.generate(messages=[{"role": "user", "content": PROMPTS[2]}], **KW)
        chat_segs = [s async for s in aens.stream(messages=[{"role": "user", "content": PROMPTS[2]}], **KW)]
        assert "".join(s.text for s in chat_segs) == chat.text
        stop.set()
        await tick
        return results, segs, chat, ticks["n"]

    results, segs, chat, ticks = asyncio.run(main())
    assert [r.text for r in results] == alone
    assert "".join(s.text for s in segs) == alone[1] and all(s.model in ens.model_names for s in segs)
    assert chat.text == ens.generate(messages=[{"role": "user", "content": PROMPTS[2]}], **KW).text
    assert ticks > 10
    assert idle(ens)


def test_async_cancellation_frees_the_slot(ens):
    aens = AsyncEnsemble(ens)

    async def main():
        task = asyncio.create_task(aens.generate(PROMPTS[0], max_new_tokens=300, window=4))
        while ens.engine.running == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        task.cancel()  # a client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        rounds = ens.engine.stats["rounds"]
        while ens.engine.running:
            await asyncio.sleep(0.01)
        assert ens.engine.stats["rounds"] - rounds <= 1
        # an abandoned async stream too
        agen = aens.stream(PROMPTS[1], max_new_tokens=300, window=4)
        await agen.__anext__()
        await agen.aclose()
        while ens.engine.running:
            await asyncio.sleep(0.01)
        with pytest.raises(SpecEMError, match="seed must be"):
            await aens.generate(PROMPTS[0], seed=-1)

    asyncio.run(main())
    assert idle(ens)
