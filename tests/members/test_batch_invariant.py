"""Issue 28: batch-independent answers (``batch_invariant=True``, ``serve --deterministic``).

Under the mode every local member runs each request's draft steps and verify
pass as a forward of its own, so no reduction mixes two requests' rows and a
greedy answer in bfloat16 is the one the request gets alone. Checked on the
tiny models in bfloat16 on the CPU: texts in a batch equal texts alone, and
every forward touches one request's cache slot only.
"""

import httpx
import pytest

from specem_fast import Ensemble
from specem_fast.errors import SpecEMError
from specem_fast.server import BackgroundServer, create_app

PROMPTS = ["Write a short poem about the sea.", "What is 17 * 23?", "List three colours of the rainbow, please.",
           "def fibonacci(n):"]
KW = dict(max_new_tokens=24, window=4, temperature=0.0)


@pytest.fixture(scope="module")
def ens(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    e = Ensemble.from_pretrained(names, dtype="bfloat16", cache_tokens=512, max_batch=4, preset="reference",
                                 batch_invariant=True)
    yield e
    e.close()


def test_a_batch_gives_each_request_its_text_alone_in_bfloat16(ens):
    assert all(d == "bfloat16" for d in ens.metadata["dtypes"].values())
    alone = [ens.generate(p, **KW).text for p in PROMPTS]
    together = [r.text for r in ens.generate(PROMPTS, **KW)]
    assert together == alone
    reversed_ = [r.text for r in ens.generate(PROMPTS[::-1], **KW)]  # other slots, other neighbours
    assert reversed_[::-1] == alone


def test_every_forward_holds_one_request(ens, monkeypatch):
    slots_per_forward = []
    for runner in ens.runners.values():
        real = runner.forward

        def spy(runs, real=real):
            slots = {r.slot for r in runs} if isinstance(runs, list) else {int(s) for s in runs.meta.slot.tolist()} \
                if runs.meta is not None else set(runs.rows)
            slots_per_forward.append(len(slots))
            return real(runs)

        monkeypatch.setattr(runner, "forward", spy)
    ens.generate(PROMPTS, **KW)
    assert slots_per_forward and max(slots_per_forward) == 1


def test_the_server_says_whether_answers_are_batch_independent(ens):
    assert ens.metadata["batch_invariant"] is True
    with BackgroundServer(create_app(ens)) as srv:
        card = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]
    assert card["batch_independent"] is True


def test_vllm_members_are_refused_under_the_mode():
    with pytest.raises(SpecEMError, match="batch_invariant cannot hold for vLLM members"):
        Ensemble.from_pretrained(["vllm:http://127.0.0.1:1#smollm2-135m-instruct"], batch_invariant=True)
    with pytest.raises(SpecEMError, match="batch_invariant must be True or False"):
        Ensemble.from_pretrained(["smollm2-135m-instruct"], batch_invariant="yes")


def test_transformers_backend_members_draft_each_request_alone_under_the_mode(tiny_dirs, monkeypatch):
    from specem_fast.members.local.hf_member import HFMember

    stacked = []
    real = HFMember._draft_stacked
    monkeypatch.setattr(HFMember, "_draft_stacked", lambda self, *a: stacked.append(1) or real(self, *a))
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2")]
    e = Ensemble.from_pretrained(names, dtype="bfloat16", cache_tokens=512, max_batch=4, preset="reference",
                                 backend="transformers", batch_invariant=True)
    try:
        assert all(m.batch_invariant for m in e.members.values())
        alone = [e.generate(p, **KW).text for p in PROMPTS[:3]]
        assert [r.text for r in e.generate(PROMPTS[:3], **KW)] == alone
        assert not stacked
    finally:
        e.close()
