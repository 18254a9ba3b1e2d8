"""Issue 10 item 4: the OpenAI-compatible server, driven by the official `openai`
client (and raw httpx for what the client hides) against a real uvicorn on 127.0.0.1."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from specem_fast import Ensemble, GenerationSettings, RoundRecord
from specem_fast.server import BackgroundServer, create_app

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
KW = dict(max_new_tokens=12, window=4)
BODY = {"max_tokens": 12, "window": 4}


@pytest.fixture(scope="module")
def ens(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    e = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=2)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(ens):
    with BackgroundServer(create_app(ens)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def idle(ens, timeout=30.0):
    """Wait until every slot is free and nothing runs or waits."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if ens.engine.running == 0 and ens.engine.waiting == 0 and ens.cache.free_slots == ens.config.max_batch:
            return True
        time.sleep(0.02)
    return False


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def sse_data(text):
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


# -- answers ---------------------------------------------------------------------------
def test_chat_completion_equals_offline_greedy(ens, client):
    offline = ens.generate(messages=CHAT, **KW)
    r = client.chat.completions.create(model="specem-fast", messages=CHAT, max_tokens=12, extra_body={"window": 4})
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.message.content == offline.text
    assert ch.finish_reason == "length" and ch.model_extra["engine_stop_reason"] == offline.stop_reason == "length"
    lead = ens.model_names[0]
    assert r.usage.prompt_tokens == offline.prompt_tokens[lead]
    assert r.usage.completion_tokens == offline.new_tokens and r.usage.total_tokens == offline.prompt_tokens[lead] + 12
    assert r.model == "specem-fast" and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model_extra["specem"]["rounds"] == len(offline.rounds) and "trace" not in r.model_extra["specem"]
    # max_completion_tokens is the same limit; temperature 0 is the default
    r2 = client.chat.completions.create(model="specem-fast", messages=CHAT, max_completion_tokens=12, temperature=0,
                                        extra_body={"window": 4})
    assert r2.choices[0].message.content == offline.text
    assert idle(ens)


def test_chat_stream_one_chunk_per_segment_then_usage_and_done(ens, client, server):
    segs = [s for s in ens.stream(messages=CHAT, **KW) if s.text]
    stream = client.chat.completions.create(model="specem-fast", messages=CHAT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"window": 4})
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert [c.choices[0].delta.content for c in content] == [s.text for s in segs]
    assert content[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-2].choices[0].model_extra["engine_stop_reason"] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    # the raw stream is OpenAI's SSE format and ends with [DONE]
    raw = post(server, "/v1/chat/completions", dict(BODY, messages=CHAT, stream=True))
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    data = sse_data(raw.text)
    assert data[-1] == "[DONE]" and "".join(
        json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]) == "".join(s.text for s in segs)
    assert idle(ens)


def test_completions_with_stop_and_seeded_sampling_match_offline(ens, client):
    prompt = "The capital of France is"
    offline = ens.generate(prompt, max_new_tokens=24, window=4)
    stop = offline.text[len(offline.text) // 2:][:3]
    assert stop.strip()
    ref = ens.generate(prompt, max_new_tokens=24, window=4, stop=[stop])
    r = client.completions.create(model="specem-fast", prompt=prompt, max_tokens=24, stop=stop,
                                  extra_body={"window": 4})
    assert r.choices[0].text == ref.text and r.object == "text_completion"
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["engine_stop_reason"] == "stop_string"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="specem-fast", prompt=[prompt], max_tokens=24, stop=[stop], stream=True, extra_body={"window": 4})
        if c.choices)
    assert streamed == ref.text
    sampled = ens.generate(prompt, max_new_tokens=12, window=4, temperature=0.9, top_p=0.95, seed=7)
    r = client.completions.create(model="specem-fast", prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.95,
                                  seed=7, extra_body={"window": 4})
    assert r.choices[0].text == sampled.text
    assert idle(ens)


def test_trace_and_ensemble_settings_as_extra_fields(ens, client):
    offline = ens.generate(messages=CHAT, max_new_tokens=12, window=3, hedge_lr=None, score="logit")
    r = client.chat.completions.create(model="specem-fast", messages=CHAT, max_tokens=12,
                                       extra_body={"window": 3, "hedge_lr": "off", "score": "logit", "trace": True})
    spec = r.model_extra["specem"]
    assert r.choices[0].message.content == offline.text
    assert spec["settings"]["window"] == 3 and spec["settings"]["hedge_lr"] is None
    assert [t["winner_model"] for t in spec["trace"]] == [rd.winner_model for rd in offline.rounds]
    assert [[c["text"] for c in t["candidates"]] for t in spec["trace"]] == \
        [[c.text for c in rd.candidates] for rd in offline.rounds]
    chunks = list(client.chat.completions.create(model="specem-fast", messages=CHAT, max_tokens=12, stream=True,
                                                 extra_body={"window": 3, "hedge_lr": "off", "score": "logit",
                                                             "trace": True}))
    rounds = [c.model_extra["specem"]["round"] for c in chunks if "round" in (c.model_extra.get("specem") or {})]
    assert [t["index"] for t in rounds] == list(range(1, len(offline.rounds) + 1))
    assert idle(ens)


def test_models_health_and_metrics(ens, client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["specem-fast"] and models[0].model_extra["drafters"] == ens.model_names
    assert client.models.retrieve("specem-fast").id == "specem-fast"
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("specem_requests_running", "specem_requests_waiting", "specem_rounds_total",
                 "specem_generated_tokens_total", "specem_time_to_first_segment_seconds_bucket",
                 "specem_round_seconds_bucket", "specem_segments_won_total"):
        assert name in text, name
    won = sum(float(v) for v in re.findall(r'^specem_segments_won_total\{model="[^"]+"\} (\S+)$', text, re.M))
    rounds = float(re.search(r"^specem_rounds_total (\S+)$", text, re.M).group(1))
    assert won >= 1 and rounds >= 1
    assert float(re.search(r"^specem_generated_tokens_total (\S+)$", text, re.M).group(1)) >= 12


# -- errors ------------------------------------------------------------------------------
M = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {"messages": M, "max_tokens": "12"}, "max_tokens", "valid integer"),
    ("/v1/chat/completions", {"messages": M, "temperature": "hot"}, "temperature", "valid number"),
    ("/v1/chat/completions", {"messages": M, "stop": 5}, "stop", "valid string"),
    ("/v1/chat/completions", {"messages": M, "stream": "yes"}, "stream", "valid boolean"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages", "valid list"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1 item"),
    ("/v1/chat/completions", {}, "messages", "required"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role", "'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "valid string"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "messages", "no user message"),
    ("/v1/chat/completions", {"messages": M, "n": 2}, "n", "only n=1 is supported"),
    ("/v1/chat/completions", {"messages": M, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": M, "max_tokens": 5, "max_completion_tokens": 6}, None, "disagree"),
    ("/v1/chat/completions", {"messages": M, "top_p": 0}, "top_p", "greater than 0"),
    ("/v1/chat/completions", {"messages": M, "temperature": 1e-7}, "temperature", "too small"),
    ("/v1/chat/completions", {"messages": M, "seed": -1}, "seed", "greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": M, "stop": [""]}, "stop", "non-empty"),
    ("/v1/chat/completions", {"messages": M, "window": 0}, "window", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": M, "score": "vibes"}, "score", "'logprob', 'logit' or 'logprob_sum'"),
    ("/v1/chat/completions", {"messages": M, "logprobs": True}, "logprobs", "not supported"),
    ("/v1/chat/completions", {"messages": M, "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ("/v1/chat/completions", {"messages": M, "tools": []}, "tools", "unknown field"),
    ("/v1/chat/completions", {"messages": M, "init_weights": "prior"}, "init_weights", "prior"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ("/v1/completions", {"prompt": [1, 2]}, "prompt", "valid string"),
    ("/v1/completions", {"prompt": "  "}, "prompt", "empty"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo", "not supported"),
])
def test_bad_input_is_a_400_naming_the_field(ens, server, path, body, param, words):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err
    assert idle(ens)


def test_unknown_model_prompt_too_long_and_bad_json(ens, client, server):
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.chat.completions.create(model="gpt-4o", messages=M)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="specem-fast", messages=M, n=2)
    long = "word " * 400
    r = post(server, "/v1/completions", {"prompt": long})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "over the 214 tokens a prompt may take" in err["message"] and "--cache-tokens 256" in err["message"]
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert idle(ens)


def test_an_engine_failure_is_a_500_or_an_error_event_in_the_stream(ens, server, monkeypatch):
    def broken(reqs):
        raise RuntimeError("verify exploded")
        yield  # pragma: no cover

    monkeypatch.setattr(ens.executor, "round", broken)
    r = post(server, "/v1/chat/completions", {"messages": M})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "RuntimeError: verify exploded" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"messages": M, "stream": True})
    data = sse_data(r.text)
    assert r.status_code == 200 and data[-1] == "[DONE]" and "verify exploded" in json.loads(data[-2])["error"]["message"]
    monkeypatch.undo()
    assert idle(ens)


def test_a_full_queue_is_a_429_with_retry_after(ens, client, server):
    running = [ens.submit("Tell me a long story.", max_new_tokens=200, window=4) for _ in range(2)]
    try:
        for _, q in running:  # both slots taken
            assert isinstance(q.get(timeout=60), RoundRecord)
        ens.engine.max_waiting = 0
        r = post(server, "/v1/chat/completions", {"messages": M})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full" and "waiting queue is full" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="specem-fast", messages=M, stream=True)
    finally:
        ens.engine.max_waiting = 256
        for h, _ in running:
            ens.cancel(h.id)
    assert idle(ens)


def test_no_queue_still_admits_a_request_while_a_slot_is_free(ens, server):
    """--max-waiting 0 is "no queue" (issue 28): with one of two slots busy a request is
    served, never a 429, and /health counts nothing as waiting."""
    h, q = ens.submit("Tell me a long story.", max_new_tokens=200, window=4)
    try:
        assert isinstance(q.get(timeout=60), RoundRecord)  # one slot runs, the other is free
        ens.engine.max_waiting = 0
        assert httpx.get(server.url + "/health").json()["waiting"] == 0
        r = post(server, "/v1/chat/completions", {"messages": M, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    finally:
        ens.engine.max_waiting = 256
        ens.cancel(h.id)
    assert idle(ens)


def test_a_client_that_disconnects_frees_its_slot(ens, server):
    body = {"messages": M, "max_tokens": 200, "window": 4}
    rounds = ens.engine.stats["rounds"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert ens.engine.running == 1
    # closed after the first chunk: cancelled within a round or two, long before 50 rounds
    assert idle(ens, timeout=20)
    assert ens.engine.stats["rounds"] - rounds < 10
    # a non-streaming client that gives up too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    assert idle(ens, timeout=20)
    text = httpx.get(server.url + "/metrics").text
    assert float(re.search(r"^specem_requests_cancelled_total (\S+)$", text, re.M).group(1)) >= 2


def test_api_key(ens):
    with BackgroundServer(create_app(ens, api_key="s3cret", model_name="ens",
                                     defaults=GenerationSettings(max_new_tokens=4, window=4))) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": M}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        r = good.chat.completions.create(model="ens", messages=M)
        assert r.usage.completion_tokens <= 4  # the server's defaults apply
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
    assert idle(ens)


def test_concurrent_http_clients_are_batched_and_exact(ens, client):
    prompts = ["Hello there.", "What is 2+2?", "Name a fruit."]
    offline = [ens.generate(p, **KW).text for p in prompts]
    before = ens.engine.stats["batched_rounds"]
    got = {}

    def work(i):
        got[i] = client.completions.create(model="specem-fast", prompt=prompts[i], max_tokens=12,
                                           extra_body={"window": 4}).choices[0].text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(3)] == offline
    assert ens.engine.stats["batched_rounds"] > before
    assert idle(ens)


def test_load_test_smoke(ens):
    """benchmarks/load_test.py on the tiny models: 1 and 2 streaming clients, GSM8K prompts."""
    import importlib.util
    from pathlib import Path

    from specem_fast.measure.datasets import load_gsm8k

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    report = lt.run_load(ens, [it.prompt for it in load_gsm8k(2)], [1, 2], max_tokens=8, per_client=1,
                         time_limit=120, log=lambda s: None)
    assert report["ok"], report
    assert [r["clients"] for r in report["levels"]] == [1, 2]
    assert all(r["tokens"] == 8 * r["requests"] and r["tokens_per_s"] > 0 for r in report["levels"])
    assert lt.percentile([3.0, 1.0, 2.0], 50) == 2.0 and lt.percentile([1.0, 2.0], 95) == 2.0
    assert idle(ens)


# -- the command ---------------------------------------------------------------------------
def test_serve_refuses_a_taken_port_before_loading(capsys):
    from specem_fast.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port), "--models", "/nonexistent-model-folder-xyz"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_command_streams_and_exits_0_on_sigterm(tiny_dirs):
    models = str(tiny_dirs["llama"])  # one member: the process starts faster
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "specem_fast", "serve", "--port", "0", "--models", models,
                             "--cache-tokens", "256", "--max-batch", "2", "--window", "4", "--shutdown-timeout", "20"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                url = m.group(1)
                break
        assert url, "the server did not say where it listens"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        for _ in range(200):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 24, "stream": True},
                          timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-stream: it is allowed to finish
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        text = "".join(json.loads(d[6:])["choices"][0]["text"] for d in [first] + rest[:-1]
                       if json.loads(d[6:])["choices"])
        assert text
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the default models ---------------------------------------------------------------------
@pytest.mark.slow
def test_real_models_over_http_equal_offline(real_ensemble):
    msgs = [{"role": "user", "content": "What is 12 times 7?"}]
    offline = real_ensemble.generate(messages=msgs, max_new_tokens=16, window=8)
    with BackgroundServer(create_app(real_ensemble)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        chunks = list(c.chat.completions.create(model="specem-fast", messages=msgs, max_tokens=16, stream=True,
                                                extra_body={"window": 8}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == offline.text and len(offline.text.split()) >= 2
    assert idle(real_ensemble)


# -- extreme sampling values (issue 28 part 2) ----------------------------------------------
@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45])
def test_a_top_p_that_rounds_to_zero_samples_the_top_token(ens, server, top_p):
    """float32 holds such a top_p as 0, which dropped every token and drew token 0 ('!!!!');
    it is clamped to what it means: the top token alone, i.e. the greedy text."""
    greedy = ens.generate("Hi", max_new_tokens=6).text
    r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 6, "temperature": 1, "top_p": top_p, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy != "!" * len(greedy)


def test_a_top_p_that_rounds_to_one_samples_as_one(server):
    body = {"prompt": "Hi", "max_tokens": 6, "temperature": 1, "seed": 3}
    a, b = post(server, "/v1/completions", dict(body, top_p=1 - 1e-9)), post(server, "/v1/completions", body)
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "Hi", "top_p": 0}', "top_p"),
    (b'{"prompt": "Hi", "top_p": 1.0000001}', "top_p"),
    (b'{"prompt": "Hi", "temperature": 1e-300}', "temperature"),
    (b'{"prompt": "Hi", "temperature": 1e999}', "temperature"),
    (b'{"prompt": "Hi", "hedge_lr": 1e999}', "hedge_lr"),
])
def test_sampling_values_that_would_break_the_sampler_are_a_400_naming_the_field(server, raw, param):
    r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param, err
    assert "\n" not in err["message"]
