"""Members in Ray actors, on a real local Ray cluster (2 CPUs) with tiny models: the same
greedy text as in process, an actor killed or stuck mid-request fails that request with
an error naming the member and nothing is lost, and clear errors where Ray is missing
or unreachable."""

import os
import queue
import signal
import sys
import time

import pytest
import ray

from specem_fast import Ensemble
from specem_fast.errors import SpecEMError
from specem_fast.members.interface import CommitCall, DraftCall, OpenCall
from specem_fast.members.ray import RayMember, RayMemberLost
from specem_fast.results import GenerationResult

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?"]
KW = dict(max_new_tokens=16, window=4)
BUILD = dict(cache_tokens=512, max_batch=2, dtype="float32")  # float32 in the actors too (this CPU has bf16)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def names(tiny_dirs):
    return [str(tiny_dirs[a]) for a in ("llama", "qwen2")]


@pytest.fixture(scope="module")
def local(names):
    ens = Ensemble.from_pretrained(names, **BUILD)
    yield ens
    ens.close()


def _cpus_back(n: float = 2, within: float = 30) -> None:
    """Killed actors give their CPUs back a moment later."""
    deadline = time.monotonic() + within
    while ray.available_resources().get("CPU", 0) < n and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def on_ray(cluster, names, local):
    _cpus_back()
    ens = Ensemble.from_pretrained(names, placement="ray", **BUILD)
    yield ens
    ens.close()
    _cpus_back()


def _wait_restarted(m: RayMember, old_pid: int, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if ray.get(m.actor.ping.remote(), timeout=30)["pid"] != old_pid:
                return
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.2)
    raise AssertionError("the actor did not come back")


def _wait_dead(actor, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except ray.exceptions.ActorDiedError:
            return
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.2)
    raise AssertionError("the actor is still there")


def _last_event(q: queue.Queue, within: float = 120):
    deadline = time.monotonic() + within
    while True:
        ev = q.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(ev, (BaseException, GenerationResult)):
            return ev


def test_a_mixed_ensemble_one_local_one_ray_member_answers_the_same(cluster, names, local):
    """Runs first: the cluster's 2 CPUs go to this member, then to the all-Ray ensemble."""
    ens = Ensemble.from_pretrained([names[0], "ray:" + names[1]], **BUILD)
    try:
        assert isinstance(ens.members["ray:" + names[1]], RayMember) and list(ens.runners) == [names[0]]
        assert ens.metadata["remote"]["ray:" + names[1]]["kind"] == "ray"
        got = ens.generate(PROMPTS, **KW)
        want = local.generate(PROMPTS, **KW)
        assert [r.text for r in got] == [r.text for r in want]
        assert [list(r.tokens_per_model.values()) for r in got] == [list(r.tokens_per_model.values()) for r in want]
        # an actor that will not come back: the ensemble says so at once, and loses no slot
        actor = ens.members["ray:" + names[1]].actor
        ray.kill(actor, no_restart=True)
        _wait_dead(actor)
        t0 = time.monotonic()
        with pytest.raises(RayMemberLost, match=f"ray:{names[1]}"):
            ens.generate(PROMPTS[0], **KW)
        with pytest.raises(RayMemberLost, match="dead and will not be restarted.*build a new Ensemble"):
            ens.generate(PROMPTS[0], **KW)
        assert time.monotonic() - t0 < 60
        assert ens.cache.free_slots == ens.config.max_batch
    finally:
        ens.close()


def test_greedy_and_sampled_text_on_ray_equal_the_in_process_ensemble(local, on_ray):
    assert all(isinstance(m, RayMember) for m in on_ray.members.values()) and not on_ray.runners
    meta = on_ray.metadata["remote"]
    assert {d["kind"] for d in meta.values()} == {"ray"} and len({d["pid"] for d in meta.values()}) == 2
    assert all(d["dtype"] == "float32" and d["threads"] == 1 for d in meta.values())
    want, got = local.generate(PROMPTS, **KW), on_ray.generate(PROMPTS, **KW)
    assert [r.text for r in got] == [r.text for r in want]
    for a, b in zip(got, want):
        assert a.tokens_per_model == b.tokens_per_model
        assert [rd.winner_model for rd in a.rounds] == [rd.winner_model for rd in b.rounds]
        for ra, rb in zip(a.rounds, b.rounds):
            for v in ra.raw_scores:
                assert ra.raw_scores[v] == pytest.approx(rb.raw_scores[v], abs=1e-4)
    sampled = dict(KW, temperature=0.8, seed=3)
    assert on_ray.generate(PROMPTS[0], **sampled).text == local.generate(PROMPTS[0], **sampled).text
    single = on_ray.generate_single(on_ray.model_names[1], PROMPTS, max_new_tokens=8)
    assert [r.text for r in single] == [r.text for r in local.generate_single(local.model_names[1], PROMPTS,
                                                                              max_new_tokens=8)]
    assert on_ray.count_tokens(PROMPTS[0]) == local.count_tokens(PROMPTS[0])
    assert on_ray.cache.free_slots == 2 and all(not m.requests for m in on_ray.members.values())


def test_an_actor_killed_mid_request_fails_it_and_the_next_request_is_served(local, on_ray):
    want = local.generate(PROMPTS[1], **KW).text
    name = on_ray.model_names[1]
    m = on_ray.members[name]
    pid = m.describe()["pid"]
    os.kill(pid, signal.SIGSTOP)  # the actor stops inside its next call...
    try:
        handle, q = on_ray.submit(PROMPTS[0], **KW)
        deadline = time.monotonic() + 30
        while on_ray.engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        ray.kill(m.actor, no_restart=False)  # ...and is killed there; Ray restarts it
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    ev = _last_event(q)
    assert isinstance(ev, RayMemberLost) and name in str(ev) and "went down" in str(ev), ev
    assert on_ray.cache.free_slots == on_ray.config.max_batch
    assert all(not mm.requests for mm in on_ray.members.values())
    assert on_ray.generate(PROMPTS[1], **KW).text == want  # waits for the restart, then runs on it
    assert m.describe()["pid"] != pid and m.describe()["restarts"] == 1


def test_an_actor_that_does_not_answer_fails_the_call_in_time_and_is_restarted(local, on_ray):
    want = local.generate(PROMPTS[1], **KW).text
    m = on_ray.members[on_ray.model_names[0]]
    pid = m.describe()["pid"]
    real, m.timeout = m.timeout, 2.0
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(RayMemberLost, match=f"{m.name} .*did not answer open within 2 s"):
            on_ray.generate(PROMPTS[0], **KW)
        assert time.monotonic() - t0 < 30
    finally:
        m.timeout = real
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert on_ray.cache.free_slots == on_ray.config.max_batch
    assert on_ray.generate(PROMPTS[1], **KW).text == want
    assert m.describe()["pid"] != pid


def test_a_request_survives_a_restart_between_its_calls(on_ray):
    """The restarted actor holds nothing; the proxy re-opens the request with its prompt and
    committed ids and retries the call: a greedy draft is the one the old actor would make."""
    m = on_ray.members[on_ray.model_names[0]]
    slot = on_ray.cache.allocate()
    try:
        ids = tuple(m.prompt_ids("Hi there"))
        m.open([OpenCall(900, slot, ids)])
        first = m.draft([DraftCall(900, len(ids), 4)])[0]
        added = m.commit([CommitCall(900, len(ids), first.text)])[0]
        want = m.draft([DraftCall(900, len(ids) + len(added), 4)])[0]
        m.close([900])

        m.open([OpenCall(901, slot, ids)])
        assert m.draft([DraftCall(901, len(ids), 4)])[0] == first
        assert m.commit([CommitCall(901, len(ids), first.text)])[0] == added
        pid, before = m.describe()["pid"], m.reopened
        ray.kill(m.actor, no_restart=False)
        _wait_restarted(m, pid)
        assert m.draft([DraftCall(901, len(ids) + len(added), 4)])[0] == want
        assert m.reopened == before + 1 and m.describe()["pid"] != pid
    finally:
        m.close([900, 901])
        on_ray.cache.free(slot)


def test_ray_placement_errors_are_clear(names, monkeypatch):
    with pytest.raises(SpecEMError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:1 .*ray start --head"):
        Ensemble.from_pretrained([names[0]], placement="ray", ray_address="127.0.0.1:1", **BUILD)
    with pytest.raises(SpecEMError, match="not HOST:PORT"):
        Ensemble.from_pretrained([names[0]], placement="ray", ray_address="head:port", **BUILD)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SpecEMError, match=r"needs Ray, which is not installed: pip install 'specem-fast\[ray\]'"):
        Ensemble.from_pretrained(["ray:" + names[0]], **BUILD)


def test_the_cli_takes_the_placement():
    from specem_fast.cli import build_parser

    for cmd in (["generate"], ["eval", "items.jsonl"], ["bench"], ["serve"]):
        args = build_parser().parse_args(cmd + ["--placement", "ray", "--ray-address", "10.0.0.1:6379"])
        assert (args.placement, args.ray_address) == ("ray", "10.0.0.1:6379")
        assert build_parser().parse_args(cmd).placement == "local"
