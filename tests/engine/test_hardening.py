"""Issue 9: bad input and failures at any point never break the engine.

Every case is a SpecEMError with a one-line message naming the problem and the
fix, raised before anything is reserved or loaded; an exception at any step of
a request's life gives its slot back, and the engine answers the same after.
"""

import fcntl
import json
import re
from pathlib import Path

import pytest

import specem_fast.members.loading as loading_mod
import specem_fast.members.local.member as member_mod
import specem_fast.members.local.draft_loop as draft_mod
import specem_fast.model.runner as runtime_mod
from specem_fast import Ensemble, kernels
from specem_fast.config import GenerationSettings
from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import model_dir
from specem_fast.measure.datasets import load_items
from specem_fast.measure.evaluate import run_eval

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?", "List three colours."]
KW = dict(max_new_tokens=14, window=4)


@pytest.fixture(scope="module")
def ens(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    return Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)


@pytest.fixture(scope="module")
def baseline(ens):
    """What the engine answers when nothing goes wrong (3 prompts, 2 slots: one queues)."""
    return {
        "batch": [r.text for r in ens.generate(PROMPTS, **KW)],
        "sampled": ens.generate(PROMPTS[0], temperature=0.8, seed=5, **KW).text,
        "single": [r.text for r in ens.generate_single(ens.model_names[1], PROMPTS, max_new_tokens=10)],
    }


def assert_engine_intact(ens, baseline):
    assert ens.cache.free_slots == ens.config.max_batch
    assert ens.engine.running == 0 and all(not m.requests for m in ens.members.values())
    assert [r.text for r in ens.generate(PROMPTS, **KW)] == baseline["batch"]
    assert ens.generate(PROMPTS[0], temperature=0.8, seed=5, **KW).text == baseline["sampled"]
    assert [r.text for r in ens.generate_single(ens.model_names[1], PROMPTS, max_new_tokens=10)] == baseline["single"]
    assert ens.cache.free_slots == ens.config.max_batch


class Boom(RuntimeError):
    pass


def fail_on_call(monkeypatch, obj, attr, nth):
    """Make obj.attr raise Boom on its nth call (once), and behave normally otherwise."""
    real = getattr(obj, attr)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            raise Boom(f"injected failure in {attr}")
        return real(*a, **k)

    monkeypatch.setattr(obj, attr, wrapper)
    return calls


# (where, attribute, nth call): every step of a request's life, first and later calls
STEPS = [
    ("codec", "prompt_ids", 1),  # prepare
    ("executor", "open", 1),
    ("executor", "open", 3),  # the queued third prompt, after a round ran
    ("executor", "round", 1),
    ("executor", "_draft", 1),
    ("executor", "_draft", 3),
    ("member", "draft", 2),
    ("member", "_catch_up", 4),
    ("executor", "_verify", 1),
    ("executor", "_verify", 2),
    ("member", "lay_out", 2),
    ("module", "score_all", 2),  # the local members' verify passes, scored together
    ("executor", "_record", 3),
    ("executor", "_commit", 1),
    ("executor", "_commit", 4),
    ("member", "commit", 2),
    ("executor", "_finish_round", 2),
    ("executor", "close", 1),
    ("executor", "close", 2),
    ("runner", "forward", 7),
    ("runner", "logits", 3),
    ("cache", "commit", 5),
]


@pytest.mark.parametrize("where, attr, nth", STEPS, ids=[f"{w}.{a}#{n}" for w, a, n in STEPS])
def test_a_failure_at_any_step_keeps_no_slot(ens, baseline, monkeypatch, where, attr, nth):
    runner = ens.runners[ens.model_names[1]]
    target = {"codec": runner.codec, "executor": ens.executor, "module": member_mod, "runner": runner,
              "member": ens.members[ens.model_names[1]], "cache": ens.cache[ens.model_names[0]]}[where]
    calls = fail_on_call(monkeypatch, target, attr, nth)
    with pytest.raises(Boom):
        ens.generate(PROMPTS, **KW)
    assert calls["n"] >= nth  # the failure really happened
    monkeypatch.undo()
    assert_engine_intact(ens, baseline)


def test_a_failure_while_streaming_or_learning_keeps_no_slot(ens, baseline, monkeypatch):
    fail_on_call(monkeypatch, ens.executor, "_draft", 2)
    stream = ens.stream(PROMPTS[0], **KW)
    next(stream)  # the first round's segment
    with pytest.raises(Boom):
        list(stream)
    monkeypatch.undo()
    assert ens.cache.free_slots == ens.config.max_batch
    # the learned-weights update after a request finishes
    fail_on_call(monkeypatch, ens.weights, "observe", 1)
    with pytest.raises(Boom):
        ens.generate(PROMPTS[:2], init_weights="learned", **KW)
    monkeypatch.undo()
    assert_engine_intact(ens, baseline)


@pytest.mark.parametrize("where, attr, nth", [("runner", "forward", 1), ("runner", "forward", 4),
                                              ("runner", "logits", 2), ("module", "sample_tokens", 3),
                                              ("member", "commit", 2)])
def test_a_failure_in_the_single_model_loop_keeps_no_slot(ens, baseline, monkeypatch, where, attr, nth):
    runner = ens.runners[ens.model_names[1]]
    target = {"runner": runner, "module": draft_mod, "member": ens.members[ens.model_names[1]]}[where]
    fail_on_call(monkeypatch, target, attr, nth)
    with pytest.raises(Boom):
        ens.generate_single(ens.model_names[1], PROMPTS, max_new_tokens=10)
    monkeypatch.undo()
    assert_engine_intact(ens, baseline)


def test_huge_seed_is_refused_every_time_and_the_engine_still_works(ens, baseline):
    """The issue's case: seed=10**14 overflowed torch's generator after the slot was taken."""
    for _ in range(ens.config.max_batch + 3):
        with pytest.raises(SpecEMError, match=r"seed must be an integer in \[0, 2\*\*40\)"):
            ens.generate("hi", temperature=0.7, seed=10**14)
    with pytest.raises(SpecEMError, match="seed must be"):
        ens.generate_single(ens.model_names[0], "hi", temperature=0.7, seed=10**14)
    with pytest.raises(SpecEMError, match="seed must be"):
        next(ens.stream("hi", temperature=0.7, seed=-1))
    assert_engine_intact(ens, baseline)


def _gen():
    yield "a prompt"


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"prompt": "hi"}, "not dict"),
        (_gen(), "not generator"),
        (b"hi", "not bytes; decode it to str first"),
        (None, "not NoneType"),
        (42, "not int"),
        (["ok", None], "prompt 1 is NoneType, not a string"),
        ("bad \ud800 text", r"lone surrogate U\+D800 at character 4"),
        (["ok", "\udcff"], r"prompt 1 is not valid Unicode text"),
        (["ok", "  "], "prompt 1 is empty"),
    ],
)
def test_bad_prompts_are_clear_errors_everywhere(ens, prompt, message):
    with pytest.raises(SpecEMError, match=message):
        ens.generate(prompt, max_new_tokens=4)
    with pytest.raises(SpecEMError, match=message):
        ens.generate_single(ens.model_names[0], prompt, max_new_tokens=4)
    if not isinstance(prompt, list):
        with pytest.raises(SpecEMError, match=message):
            ens.stream(prompt, max_new_tokens=4)  # refused when called, not at the first segment
        with pytest.raises(SpecEMError, match=message):
            ens.stream_with_result(prompt, max_new_tokens=4)
    assert ens.cache.free_slots == ens.config.max_batch


def test_tiny_temperatures_are_refused_and_surrogate_stop_strings_too():
    with pytest.raises(SpecEMError, match=r"temperature 1e-40 is too small .* use 0 for greedy"):
        GenerationSettings(temperature=1e-40)
    with pytest.raises(SpecEMError, match="too small"):
        GenerationSettings(temperature=5e-6)
    assert not GenerationSettings(temperature=1e-5).greedy
    with pytest.raises(SpecEMError, match="a stop string is not valid Unicode"):
        GenerationSettings(stop=("\ud800",))


def test_small_temperature_still_samples_without_overflow(ens):
    res = ens.generate(PROMPTS[1], temperature=1e-5, seed=3, **KW)
    assert res.text == ens.generate(PROMPTS[1], **KW).text  # that cold is greedy


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if any weights are loaded."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(runtime_mod, "load_transformer", refuse)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(cache_tokens=4096.5), r"cache_tokens must be a whole number of tokens >= 16 \(got 4096.5\)"),
        (dict(cache_tokens="4096"), r"cache_tokens must be a whole number .*\(got '4096'\)"),
        (dict(cache_tokens=True), r"cache_tokens must be a whole number .*\(got True\)"),
        (dict(cache_tokens=None), "cache_tokens must be a whole number"),
        (dict(max_batch="2"), r"max_batch must be a whole number >= 1 \(got '2'\)"),
        (dict(max_batch=2.0), r"max_batch must be a whole number >= 1 \(got 2.0\)"),
        (dict(max_batch=False), r"max_batch must be a whole number >= 1 \(got False\)"),
    ],
)
def test_engine_settings_of_the_wrong_type(tiny_dirs, no_loading, kw, message):
    with pytest.raises(SpecEMError, match=message):
        Ensemble.from_pretrained([str(tiny_dirs["llama"])], **kw)


def test_kv_cache_too_large_for_memory_is_refused_before_loading(tiny_dirs, monkeypatch):
    names = [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]
    real_load = runtime_mod.load_transformer
    monkeypatch.setattr(runtime_mod, "load_transformer",
                        lambda *a, **k: pytest.fail("weights were loaded before the memory check"))
    with pytest.raises(SpecEMError, match=r"cache_tokens=1000000000 x max_batch=4 needs .* GiB of KV cache on cpu "
                                          r".* is available; at most cache_tokens=\d+ with max_batch=4 fits; "
                                          r"lower --cache-tokens or max_batch"):
        Ensemble.from_pretrained(names, cache_tokens=10**9, max_batch=4)
    # with little memory the message's suggestion is what fits
    per_token = sum(runtime_mod.memory_needs(Path(n), runtime_mod.resolve_dtype("cpu", None))[0] for n in names)
    weights = sum(runtime_mod.memory_needs(Path(n), runtime_mod.resolve_dtype("cpu", None))[1] for n in names)
    avail = weights + per_token * 300 * 2
    monkeypatch.setattr(loading_mod, "available_memory", lambda dev: avail)
    with pytest.raises(SpecEMError, match="at most cache_tokens=300 with max_batch=2 or max_batch=1 with "
                                          "cache_tokens=512 fits") as exc:
        Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)
    assert "\n" not in str(exc.value)
    monkeypatch.setattr(loading_mod, "available_memory", lambda dev: weights // 2)
    with pytest.raises(SpecEMError, match="the weights alone nearly fill it"):
        Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)
    monkeypatch.setattr(loading_mod, "available_memory", lambda dev: avail)
    monkeypatch.setattr(runtime_mod, "load_transformer", real_load)
    ok = Ensemble.from_pretrained(names, cache_tokens=300, max_batch=2)
    assert ok.cache.bytes == per_token * 300 * 2


def test_available_memory_reads_meminfo():
    avail = runtime_mod.available_memory("cpu")
    assert avail is None or avail > 0
    if Path("/proc/meminfo").exists():
        assert avail is not None


def test_triton_on_a_cpu_without_the_interpreter_fails_at_construction(tiny_dirs, monkeypatch, no_loading):
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    with pytest.raises(SpecEMError, match=r"kernels='triton' cannot run on cpu: .*TRITON_INTERPRET=1.*"
                                          r"use kernels='torch'"):
        Ensemble.from_pretrained([str(tiny_dirs["llama"])], kernels="triton")
    monkeypatch.setenv("SPECEM_KERNELS", "triton")
    with pytest.raises(SpecEMError, match="SPECEM_KERNELS=triton cannot run on cpu"):
        Ensemble.from_pretrained([str(tiny_dirs["llama"])])
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(SpecEMError, match="triton is not installed"):
        Ensemble.from_pretrained([str(tiny_dirs["llama"])])
    monkeypatch.delenv("SPECEM_KERNELS")
    assert kernels.use_triton("cuda", "auto") is False  # auto never picks a Triton that is missing


@pytest.mark.parametrize("var, value", [("SPECEM_KERNELS", "trition"), ("SPECEM_KERNELS", "cuda"),
                                        ("SPECEM_FLASH_ATTN", "of"), ("SPECEM_FLASH_ATTN", "1")])
def test_environment_variable_typos_are_errors(tiny_dirs, monkeypatch, no_loading, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SpecEMError, match=f"environment variable {var} must be .* \\(got '{value}'\\); fix it or unset it"):
        Ensemble.from_pretrained([str(tiny_dirs["llama"])])
    if var == "SPECEM_KERNELS":  # the kernels package reads no environment: it is given the choice
        assert kernels.use_triton("cpu") is False
        with pytest.raises(ValueError, match="kernel choice 'trition'"):
            kernels.use_triton("cpu", "trition")


def test_one_model_under_two_spellings_is_refused_before_loading(tiny_dirs, tmp_path, monkeypatch):
    folder = tiny_dirs["llama"]
    link = tmp_path / "link-to-llama"
    link.symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(folder.parent)
    real_load = runtime_mod.load_transformer
    monkeypatch.setattr(runtime_mod, "load_transformer", lambda *a, **k: pytest.fail("loaded"))
    for pair in ([str(folder), str(folder) + "/"], [f"./{folder.name}", folder.name], [str(folder), str(link)],
                 [folder.name, str(folder.parent / "." / folder.name)]):
        with pytest.raises(SpecEMError, match="the models list names one model twice: .* are both"):
            Ensemble.from_pretrained(pair)
        with pytest.raises(SpecEMError, match="the verifiers list names one model twice"):
            Ensemble.from_pretrained([str(tiny_dirs["qwen2"])], verifiers=pair)
    registry = "smollm2-135m-instruct"
    with pytest.raises(SpecEMError, match=f"'{registry}' and .* are both"):
        Ensemble.from_pretrained([registry, str(model_dir(registry))])
    # a verifier spelled differently from a drafter is that drafter: loaded once, one vote
    monkeypatch.setattr(runtime_mod, "load_transformer", real_load)
    ens = Ensemble.from_pretrained([str(folder), str(tiny_dirs["qwen2"])], verifiers=[f"./{folder.name}/"],
                                   cache_tokens=256, max_batch=1)
    assert list(ens.runners) == [str(folder), str(tiny_dirs["qwen2"])] and ens.verifiers == [str(folder)]


def test_eval_item_with_a_lone_surrogate_is_recorded_and_skipped(ens, tmp_path):
    data = tmp_path / "data.jsonl"
    lines = [{"prompt": "What is 2 plus 2?", "answer": "4"},
             {"prompt": "bad \ud800 prompt", "answer": "5"},
             {"prompt": "What is 3 plus 3?", "answer": "6\ud800", "id": "odd-\udcff-id"}]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="ascii")  # \\ud800 escapes
    items = load_items(str(data))
    assert items[2].id == "odd-\\udcff-id"
    out = tmp_path / "res.jsonl"
    kw = dict(out_path=out, dataset="data", settings={"max_new_tokens": 6, "window": 3}, progress=False,
              systems=["ensemble", ens.model_names[0]], trace_path=tmp_path / "trace.jsonl", batch=2)
    summary = run_eval(ens, items, **kw)
    recs = [json.loads(x) for x in out.read_bytes().decode("utf-8").splitlines()][1:]
    assert len(recs) == 6
    bad = [r for r in recs if r["item_id"] == "line-2"]
    assert [r["stop_reason"] for r in bad] == ["error", "error"]
    assert all("lone surrogate" in r["error"] and r["correct"] is None for r in bad)
    assert all(r["stop_reason"] != "error" for r in recs if r["item_id"] != "line-2")
    assert [r["gold"] for r in recs if r["item_id"] == "odd-\\udcff-id"] == ["6\ud800", "6\ud800"]
    assert all(row["n_done"] == 3 and row["n_errors"] == 1 for row in summary["systems"])
    before = out.read_bytes()
    again = run_eval(ens, items, **kw)  # resuming: nothing left to do, no crash, nothing rewritten
    assert out.read_bytes() == before and again["systems"] == summary["systems"]
    assert ens.cache.free_slots == ens.config.max_batch


def test_two_evals_on_one_out_file_cannot_run_at_once(tmp_path):
    from measure_fakes import FakeEnsemble

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Double {q}", "answer": str(2 * q)}) + "\n" for q in (1, 2)))
    items = load_items(str(data))
    out = tmp_path / "res.jsonl"
    kw = dict(out_path=out, dataset="data", progress=False, batch=1)
    with open(tmp_path / "res.jsonl.lock", "a") as held:  # what a running eval holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SpecEMError, match=re.escape(f"another eval is writing {str(out)!r}")):
            run_eval(FakeEnsemble(), items, **kw)
        assert not out.exists()  # nothing written
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    run_eval(FakeEnsemble(), items, **kw)
    run_eval(FakeEnsemble(), items, **kw)  # the lock was given back
    recs = out.read_text().splitlines()
    assert len(recs) == 1 + 2 * (1 + len(FakeEnsemble().model_names))  # no duplicates
    with pytest.raises(SpecEMError, match="does not exist"):
        run_eval(FakeEnsemble(), items, **dict(kw, out_path=tmp_path / "missing" / "res.jsonl"))
