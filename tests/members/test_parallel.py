"""Issue 11 item 4: members draft and verify in parallel, with the same result as one at a time."""

import threading
import time

import pytest
import torch

from specem_fast import Ensemble
from specem_fast.errors import SpecEMError
from specem_fast.members.pool import MemberPool, member_groups

from known_outputs import PROMPTS

KW = dict(max_new_tokens=24, window=6)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def three(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    made = {mode: Ensemble.from_pretrained(names, cache_tokens=256, max_batch=4, kernels="torch", parallel=mode)
            for mode in ("off", "on")}
    yield made
    for e in made.values():
        e.close()


def _rounds(res):
    return [(r.drafters, [(c.model, c.text) for c in r.candidates], r.winner_model, r.verified) for r in res.rounds]


def test_parallel_members_write_the_same_rounds_as_one_at_a_time(three):
    seq, par = three["off"], three["on"]
    assert par.metadata["parallel"] == [[m] for m in par.runners] and seq.metadata["parallel"] is None
    settings = [dict(), dict(temperature=0.9, top_p=0.9, seed=7), dict(exit_threshold=0.34, exit_patience=1)]
    for extra in settings:
        a, b = seq.generate(PROMPTS, **KW, **extra), par.generate(PROMPTS, **KW, **extra)
        for x, y in zip(a, b):
            assert y.text == x.text and y.stop_reason == x.stop_reason
            assert _rounds(y) == _rounds(x)
            for rx, ry in zip(x.rounds, y.rounds):  # thread counts differ: BLAS sums round differently
                for v in rx.raw_scores:
                    assert ry.raw_scores[v] == pytest.approx(rx.raw_scores[v], abs=1e-4)
    # the cached-equals-recompute property holds with workers too
    assert par.generate(PROMPTS[0], mode="recompute", **KW).text == seq.generate(PROMPTS[0], **KW).text


def test_a_failing_member_ends_the_round_and_the_engine_stays_usable(three, monkeypatch):
    par = three["on"]
    want = par.generate(PROMPTS[1], **KW).text
    victim = par.runners[list(par.runners)[1]]
    real = victim.forward
    calls = {"n": 0}

    def broken(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(*a, **k)

    monkeypatch.setattr(victim, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        par.generate(PROMPTS[1], **KW)
    assert par.cache.free_slots == par.config.max_batch
    assert par.generate(PROMPTS[1], **KW).text == want


def test_parallel_setting_is_checked(tiny_dirs):
    with pytest.raises(SpecEMError, match="parallel must be one of auto, on, off"):
        Ensemble.from_pretrained([str(tiny_dirs["llama"])], parallel="yes")
    names = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    with pytest.raises(SpecEMError, match="parallel='on' cannot run Triton kernels on the CPU"):
        Ensemble.from_pretrained(names, kernels="triton", parallel="on", cache_tokens=64)
    interpreted = Ensemble.from_pretrained(names, kernels="triton", cache_tokens=64)  # auto: in turn
    assert interpreted.metadata["parallel"] is None
    interpreted.close()


def test_groups_follow_devices():
    devs = {"a": CPU, "b": torch.device("cuda", 0), "c": torch.device("cuda", 1), "d": torch.device("cuda", 0)}
    assert member_groups(devs, "auto", cpu_threads=1) == [["a"], ["b", "d"], ["c"]]
    cpus = {"a": CPU, "b": CPU, "c": torch.device("cuda", 0)}
    assert member_groups(cpus, "auto", cpu_threads=2) == [["a"], ["b"], ["c"]]
    assert member_groups(cpus, "auto", cpu_threads=1) == [["a", "b"], ["c"]]
    assert member_groups(devs, "on") == [["a"], ["b"], ["c"], ["d"]]
    assert member_groups(devs, "off") == [["a", "b", "c", "d"]]
    one = MemberPool({"a": CPU, "b": CPU}, "off")
    assert not one.concurrent and one.map(lambda m: threading.current_thread(), ["a", "b"]) == \
        [threading.current_thread()] * 2


def test_pool_runs_members_concurrently_in_order_and_splits_the_cores():
    pool = MemberPool({"a": CPU, "b": CPU, "c": CPU}, "on")
    barrier = threading.Barrier(3, timeout=10)  # deadlocks (BrokenBarrierError) unless all three run at once
    before = torch.get_num_threads()

    def work(m):
        barrier.wait()
        return m, torch.get_num_threads(), threading.current_thread().name

    try:
        out = pool.map(work, ["c", "a", "b"])
    finally:
        pool.close()
    assert [o[0] for o in out] == ["c", "a", "b"]
    assert all(o[1] == max(1, before // 3) for o in out)
    assert len({o[2] for o in out}) == 3 and all(o[2].startswith("specem-member") for o in out)
    assert torch.get_num_threads() == before  # the caller's thread count is its own


def test_pool_waits_for_every_worker_before_raising_the_first_error():
    pool = MemberPool({"a": CPU, "b": CPU, "c": CPU}, "on")
    finished = []

    def work(m):
        if m == "b":
            raise ValueError("b failed")
        if m == "c":
            raise KeyError("c failed")
        time.sleep(0.3)
        finished.append(m)
        return m

    try:
        with pytest.raises(ValueError, match="b failed"):
            pool.map(work, ["a", "b", "c"])
        assert finished == ["a"]
    finally:
        pool.close()


def test_cli_runs_members_in_parallel_and_checks_devices(tiny_dirs, capsys):
    import json

    from specem_fast.cli import main

    models = f"{tiny_dirs['llama']},{tiny_dirs['qwen2']}"
    base = ["generate", "--models", models, "--prompt", "Say hello.", "--max-new-tokens", "8", "--window", "4",
            "--json", "--cache-tokens", "256"]
    assert main(base + ["--parallel", "on", "--devices", "cpu,cpu"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert main(base + ["--parallel", "off"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert on["text"] == off["text"] and len(on["metadata"]["parallel"]) == 2 and off["metadata"]["parallel"] is None
    assert main(base + ["--devices", "cpu"]) == 2
    assert "devices lists 1 entries for 2 models; give one per model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--parallel", "sometimes"])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
