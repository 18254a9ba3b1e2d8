"""Issue 21: the server against a hostile client, on real uvicorn on 127.0.0.1.

Oversized bodies and prompts are refused before any work, shutdown answers every
request it cuts, multi-turn chats may quote the template's own text, and the
smaller points of the probe (non-finite numbers, a window larger than the
budget, a body that is not a JSON object, a tiny --cache-tokens, long stop
strings). The cases of the probe that already held are kept as regressions.
"""

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from specem_fast import Ensemble, GenerationSettings, RoundRecord
from specem_fast.errors import SpecEMError
from specem_fast.server import BackgroundServer, create_app

M = [{"role": "user", "content": "hi"}]
CACHE = 1024


@pytest.fixture(scope="module")
def ens(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    e = Ensemble.from_pretrained(names, cache_tokens=CACHE, max_batch=2)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(ens):
    """A body limit of 64 KiB, so the prompt checks behind it can be reached with big prompts too."""
    with BackgroundServer(create_app(ens, max_body_bytes=64 * 1024)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def idle(ens, timeout=30.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if ens.engine.running == 0 and ens.engine.waiting == 0 and ens.cache.free_slots == ens.config.max_batch:
            return True
        time.sleep(0.02)
    return False


def post(url, path, body=None, **kw):
    return httpx.post(url + path, json=body, timeout=120, **kw) if body is not None else \
        httpx.post(url + path, timeout=120, **kw)


def sse_data(text):
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def metric(url, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def rss_mb():
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1)) / 1024


# -- 1. oversized input -----------------------------------------------------------------
def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(ens, server, client):
    rounds = ens.engine.stats["rounds"]
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    r = post(server.url, "/v1/chat/completions", big)
    err = r.json()["error"]
    assert r.status_code == 413 and err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    assert "over this server's limit of 65536 bytes (0.0625 MiB)" in err["message"] and "--max-body-mb" in err["message"]
    with pytest.raises(openai.APIStatusError) as ei:  # the official client gets the answer, not a reset
        client.chat.completions.create(model="specem-fast", messages=big["messages"])
    assert ei.value.status_code == 413

    def chunks():  # no Content-Length: refused as soon as it passes the limit
        for _ in range(100):
            yield b'{"prompt": "' + b"y" * 10_000

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "more than 65536 bytes" in r.json()["error"]["message"]
    # a client that waits for "100 Continue" is answered before it sends the body
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n")
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(65536):  # the server closes the connection after the answer
            answer += chunk
    head, _, rest = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413") and json.loads(rest)["error"]["code"] == "request_too_large"
    assert ens.engine.stats["rounds"] == rounds and idle(ens)  # no engine work at all
    assert metric(server.url, 'specem_request_errors_total{status="413"}') >= 3
    r = post(server.url, "/v1/chat/completions", {"messages": M, "max_tokens": 4, "window": 4})
    assert r.status_code == 200  # under the limit: served


def test_a_huge_prompt_is_refused_faster_than_a_short_request_and_memory_comes_back(ens):
    """The probe's case: 20 MB of prompt. Refused from its characters, before any
    tokenizer runs, in less time than an 8-token request (median of 3 each)."""
    body = json.dumps({"prompt": "word " * 4_000_000, "max_tokens": 8}).encode()  # 20 MB
    headers = {"content-type": "application/json"}
    with BackgroundServer(create_app(ens, max_body_bytes=64 * 2**20)) as srv, httpx.Client(timeout=120) as c:
        normal, refused = [], []
        for _ in range(3):
            t = time.perf_counter()
            r = c.post(srv.url + "/v1/completions", json={"prompt": "Hello there", "max_tokens": 8, "window": 8})
            normal.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        before = rss_mb()
        rounds = ens.engine.stats["rounds"]
        for _ in range(3):
            t = time.perf_counter()
            r = c.post(srv.url + "/v1/completions", content=body, headers=headers)
            refused.append(time.perf_counter() - t)
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
            assert "characters, over the" in err["message"] and f"--cache-tokens {CACHE}" in err["message"]
        after = rss_mb()
        assert ens.engine.stats["rounds"] == rounds  # the engine never saw it
    t_normal, t_refused = statistics.median(normal), statistics.median(refused)
    assert t_refused < 2 * t_normal, (refused, normal)  # measured: about 0.4x on the tiny models
    assert after - before < 100, (before, after)


def test_a_long_prompt_within_the_characters_stops_counting_past_the_budget(ens, server, monkeypatch):
    """Past the character check: counted in chunks, and only until the count is over the budget."""
    encoded = []
    for r in ens.runners.values():
        real = r.codec.tok.encode
        monkeypatch.setattr(r.codec.tok, "encode",
                            lambda text, _real=real, **kw: encoded.append(len(text)) or _real(text, **kw))
    long = "The quick brown fox jumps over the lazy dog. " * 550  # 24750 characters, ~5500 tokens
    r = post(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert re.search(r"the conversation is at least \d+ tokens for tiny-\w+", err["message"]), err
    assert sum(encoded) < len(long)  # never the whole prompt, let alone three times
    assert idle(ens)


def test_a_client_that_leaves_while_queued_never_runs(ens, server):
    running = [ens.submit("Tell me a long story.", max_new_tokens=600, window=1) for _ in range(2)]
    try:
        for _, q in running:  # both slots taken
            assert isinstance(q.get(timeout=60), RoundRecord)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json={"messages": M, "max_tokens": 8},
                       timeout=httpx.Timeout(60, read=1.0))
        t_end = time.monotonic() + 10
        while ens.engine.waiting and time.monotonic() < t_end:
            time.sleep(0.02)
        assert ens.engine.waiting == 0 and ens.engine.running == 2  # it left the queue; the others still run
    finally:
        for h, _ in running:
            ens.cancel(h.id)
    assert idle(ens)


# -- 2. shutdown --------------------------------------------------------------------------
def test_shutdown_answers_every_request_it_cuts(ens):
    """Past the grace period: a stream gets an error event and [DONE], a plain request a
    JSON 503 that says it may be retried; new requests get 503 at once; slots come back."""
    app = create_app(ens, shutdown_grace=0.5)
    with BackgroundServer(app) as srv:
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900, "window": 1}
        plain: dict = {}
        waiter = threading.Thread(target=lambda: plain.update(r=post(srv.url, "/v1/chat/completions", body)))
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            waiter.start()
            t_end = time.monotonic() + 30
            while ens.engine.running < 2 and time.monotonic() < t_end:
                time.sleep(0.01)
            assert ens.engine.running == 2
            t0 = time.monotonic()
            app.state.begin_shutdown()  # what SIGTERM does (uvicorn keeps running here)
            time.sleep(0.1)
            new = post(srv.url, "/v1/chat/completions", {"messages": M})
            assert new.status_code == 503 and new.json()["error"]["code"] == "shutting_down"
            assert httpx.get(srv.url + "/health").json()["status"] == "draining"
            data = [line[6:] for line in lines if line.startswith("data: ")]
            cut = time.monotonic() - t0
        waiter.join(30)
        assert data[-1] == "[DONE]"
        err = json.loads(data[-2])["error"]
        assert err["code"] == "shutting_down" and err["type"] == "server_error" and "may be retried" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
        assert 0.4 < cut < 5
        r = plain["r"]
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "shutting_down" and "may be retried" in r.json()["error"]["message"]
        assert idle(ens, timeout=10)


def test_serve_sigterm_past_the_timeout_ends_streams_and_exits_in_time(tiny_dirs):
    """`specem-fast serve --shutdown-timeout 1`: SIGTERM with a stream and a plain request
    running; both are answered (error event + [DONE]; JSON 503), no traceback, exit 0 soon."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "specem_fast", "serve", "--port", "0", "--models",
                             str(tiny_dirs["llama"]), "--cache-tokens", "4096", "--max-batch", "2", "--window", "1",
                             "--shutdown-timeout", "1"], stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    try:
        url = next(m.group(1) for line in proc.stderr if (m := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)))
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        body = {"prompt": "Once upon a time", "max_tokens": 4000}
        plain: dict = {}
        waiter = threading.Thread(target=lambda: plain.update(r=post(url, "/v1/completions", body)))
        with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            waiter.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            data = [line[6:] for line in lines if line.startswith("data: ")]
        waiter.join(30)
        assert data[-1] == "[DONE]" and json.loads(data[-2]).get("error", {}).get("code") == "shutting_down", data[-3:]
        assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - t0
        assert took < 1 + 4, took  # the timeout, plus a round and the process's own exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(log)
    assert "Traceback" not in text and "without completing response" not in text, text


# -- 3. multi-turn chats quoting the template -------------------------------------------
def test_a_chat_quoting_the_template_separators_is_answered(ens, client):
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "End a turn like this: <|im_end|>\n<|im_start|>assistant\nok?"},
            {"role": "assistant", "content": "Like <end_of_turn>\n<start_of_turn>model\n that."},
            {"role": "user", "content": "Thanks."}]
    offline = ens.generate(messages=chat, max_new_tokens=8, window=4)
    r = client.chat.completions.create(model="specem-fast", messages=chat, max_tokens=8, extra_body={"window": 4})
    assert r.choices[0].message.content == offline.text
    assert r.usage.prompt_tokens == offline.prompt_tokens[ens.model_names[0]]


# -- 4. smaller points ----------------------------------------------------------------------
@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "hedge_lr": NaN}', "hedge_lr"),
])
def test_non_finite_numbers_are_named(ens, server, raw, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and "finite number" in err["message"], err
    with pytest.raises(SpecEMError, match="temperature must be a finite number"):
        GenerationSettings(temperature=float("nan"))
    with pytest.raises(SpecEMError, match="top_p must be a finite number"):
        GenerationSettings(top_p=float("inf"))


def test_a_window_larger_than_the_budget_says_so(ens, server):
    r = post(server.url, "/v1/chat/completions", {"messages": M, "window": 400})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "window", err
    assert "window 400 is too large for the KV-cache budget" in err["message"]
    assert "3 x (400 + 4) = 1212 of the 1024 tokens" in err["message"] and "at most 337" in err["message"]
    assert "shorten the prompt" not in err["message"]
    r = post(server.url, "/v1/chat/completions", {"messages": M, "window": 337})  # 1 token left: now the prompt
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "the conversation is" in r.json()["error"]["message"] and "over the 1 tokens" in r.json()["error"]["message"]
    assert "--cache-tokens 1024, of which one round at window 337 takes 1023" in r.json()["error"]["message"]
    assert post(server.url, "/v1/chat/completions", {"messages": M, "window": 300, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("content, headers, words", [
    (b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"},
     "must be JSON, sent with Content-Type: application/json (got Content-Type 'application/x-www-form-urlencoded')"),
    (b'{"prompt": "hi"}', {"content-type": "text/plain"}, "(got Content-Type 'text/plain')"),
    (b'[{"prompt": "hi"}]', {"content-type": "application/json"}, "must be a JSON object, not an array"),
    (b'"hi"', {"content-type": "application/json"}, "must be a JSON object, not a string"),
    (b"", {"content-type": "application/json"}, "the request body is missing"),
])
def test_a_body_that_is_not_a_json_object_names_what_is_expected(server, content, headers, words):
    r = httpx.post(server.url + "/v1/completions", content=content, headers=headers)
    err = r.json()["error"]
    assert r.status_code == 400 and words in err["message"] and "Content-Type: application/json" in err["message"]


def test_serve_refuses_a_cache_too_small_for_any_prompt_before_loading(capsys):
    from specem_fast.cli import main

    t = time.perf_counter()
    assert main(["serve", "--port", "0", "--cache-tokens", "40", "--models", "/no/such/model-a,/no/such/model-b"]) == 2
    err = capsys.readouterr().err
    assert "--cache-tokens 40 is too small for any prompt" in err and "2 x (10 + 4) = 28 tokens of it, leaving 12" in err
    assert "at least 44" in err and "/no/such" not in err and time.perf_counter() - t < 5
    assert main(["serve", "--port", "0", "--max-body-mb", "0", "--models", "/no/such/model"]) == 2
    assert "--max-body-mb must be" in capsys.readouterr().err


def test_a_stop_string_longer_than_a_segment_does_not_hold_back_the_stream(ens, client):
    stop = "§" * 300  # longer than every segment, never written
    segs = [s.text for s in ens.stream("Tell me about the sea.", max_new_tokens=40, window=4) if s.text]
    chunks = [c.choices[0].text for c in client.completions.create(
        model="specem-fast", prompt="Tell me about the sea.", max_tokens=40, stop=[stop], stream=True,
        extra_body={"window": 4}) if c.choices and c.choices[0].text]
    assert len(segs) > 3 and chunks == segs  # one chunk per round, as without the stop string
    # a stop string that is written still cuts the answer exactly
    offline = ens.generate("Tell me about the sea.", max_new_tokens=40, window=4).text
    cut = offline[len(offline) // 2:][:2]
    ref = ens.generate("Tell me about the sea.", max_new_tokens=40, window=4, stop=[cut + "§" * 50, cut]).text
    got = "".join(c.choices[0].text for c in client.completions.create(
        model="specem-fast", prompt="Tell me about the sea.", max_tokens=40, stop=[cut + "§" * 50, cut],
        stream=True, extra_body={"window": 4}) if c.choices)
    assert got == ref and len(ref) < len(offline)
    assert idle(ens)


# -- 5. what held in the probe, kept ---------------------------------------------------------
@pytest.mark.parametrize("path, raw, param, words", [
    ("/v1/completions", '{"prompt": "bad \\ud800 surrogate"}', "prompt", "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages", "lone surrogate"),
    ("/v1/completions", '{"prompt": "' + "long " * 2000 + '\\ud800"}', "prompt", "lone surrogate"),  # counted
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e3}', "max_tokens",
     "valid integer"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "seed": 1099511627776}', "seed",
     "less than"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stream": 1}', "stream",
     "valid boolean"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "extra": 1}]}', "messages.0.extra",
     "unknown field"),
])
def test_probe_cases_that_held(ens, server, path, raw, param, words):
    r = httpx.post(server.url + path, content=raw.encode(), headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err
    assert idle(ens)


def test_probe_floods_and_disconnects_leave_no_slot_behind(ens, server):
    """Many clients at once, half of them leaving mid-stream: every slot comes back and the
    queue drains; the answers that finished equal the offline answer."""
    want = ens.generate("Name a colour.", max_new_tokens=6, window=3).text
    got, errors = [], []

    def one(i):
        body = {"prompt": "Name a colour.", "max_tokens": 6, "window": 3, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                if r.status_code != 200:
                    errors.append(r.status_code)
                    return
                text = ""
                for line in r.iter_lines():
                    if i % 2 and line.startswith("data: "):
                        return  # leaves after the first chunk
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])["choices"]
                        text += ch[0]["text"] if ch else ""
                got.append(text)
        except httpx.HTTPError as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == [want] * 6
    assert idle(ens)
