import gzip
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from measure_fakes import MODELS, FakeEnsemble, Killed  # noqa: E402

from specem_fast.errors import SpecEMError
from specem_fast.measure.datasets import load_items
from specem_fast.measure.evaluate import ENSEMBLE, format_summary, run_eval, summary_path_for
from specem_fast.measure.trace import read_trace

N_ITEMS = 6
SYSTEMS = [ENSEMBLE] + MODELS


def right_for(system, prompt, seed):
    """ensemble always right; m-alpha right on even questions; others never."""
    q = int(prompt.split()[1])
    truth = q * 2
    if system == ENSEMBLE or (system == "m-alpha" and q % 2 == 0):
        return f"Let me think. {q} times 2 is {truth:,}.\nAnswer: {truth:,}"
    return f"I guess {truth + 1}."


@pytest.fixture()
def items(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Double {q} please", "answer": str(q * 2 if q < 1000 else f'{q * 2:,}')}) + "\n" for q in [1, 2, 3, 4, 500, 1000]))
    return load_items(str(f))


def item_records(path):
    lines = Path(path).read_bytes().split(b"\n")
    assert lines[-1] == b""  # always ends on a line boundary
    recs = [json.loads(x) for x in lines[:-1]]
    assert recs[0]["type"] == "header"
    return recs[1:]


def test_full_run_summary_and_stream(tmp_path, items):
    out = tmp_path / "res.jsonl"
    ens = FakeEnsemble(right_for)
    summary = run_eval(ens, items, out_path=out, dataset="data", seed=3, settings={"max_new_tokens": 32}, progress=False, trace_path=tmp_path / "t.jsonl", batch=1)
    recs = item_records(out)
    assert len(recs) == N_ITEMS * 4
    # item-major fixed order, per-item seeds seed+index
    assert [(r["item_id"], r["system"]) for r in recs[:4]] == [("line-1", s) for s in SYSTEMS]
    assert [r["seed"] for r in recs if r["system"] == ENSEMBLE] == [3, 4, 5, 6, 7, 8]
    assert [c[2]["seed"] for c in ens.calls if c[0] == ENSEMBLE] == [3, 4, 5, 6, 7, 8]
    assert all(c[2]["max_new_tokens"] == 32 for c in ens.calls)
    rows = {r["system"]: r for r in summary["systems"]}
    assert rows[ENSEMBLE]["accuracy"]["correct"] == 6 and rows[ENSEMBLE]["accuracy"]["value"] == 1.0
    assert rows["m-alpha"]["accuracy"]["correct"] == 4  # even q: 2, 4, 500, 1000
    assert rows["m-beta"]["accuracy"]["correct"] == 0
    assert rows[ENSEMBLE]["tokens_per_s"] == pytest.approx(12 / 1.0)
    assert rows["m-beta"]["tokens_per_s"] == pytest.approx(rows["m-beta"]["mean_new_tokens"] / 0.2)
    assert rows[ENSEMBLE]["win_share"] == pytest.approx({"m-alpha": 2 / 3, "m-beta": 1 / 3})
    # summary JSON written next to the results, same content
    on_disk = json.loads(summary_path_for(out).read_text())
    assert on_disk["systems"] == summary["systems"]
    table = format_summary(summary)
    assert "ensemble" in table and "100.0%" in table and "6/6" in table
    # the trace holds 3 rounds per ensemble answer, labelled by item id
    trace = read_trace(tmp_path / "t.jsonl")
    assert len(trace) == 3 * N_ITEMS and trace[0]["request"] == "line-1"


def test_eval_refuses_a_gzip_trace_before_answering(tmp_path, items):
    trace = tmp_path / "t.jsonl.gz"
    trace.write_bytes(gzip.compress(b'{"type": "round"}\n'))
    ens = FakeEnsemble(right_for)
    with pytest.raises(SpecEMError, match="gzip-compressed; decompress it first"):
        run_eval(ens, items, out_path=tmp_path / "res.jsonl", dataset="data", progress=False, trace_path=trace)
    assert ens.calls == [] and not (tmp_path / "res.jsonl").exists()


def test_m_alpha_expected_count(items):
    # q in [1, 2, 3, 4, 500, 1000]: even ones are 2, 4, 500, 1000
    assert sum(int(it.prompt.split()[1]) % 2 == 0 for it in items) == 4


def test_resume_after_kill_and_torn_line(tmp_path, items):
    out = tmp_path / "res.jsonl"
    # the process "dies" on its 11th answer: 10 records are on disk
    with pytest.raises(Killed):
        run_eval(FakeEnsemble(right_for, die_after=11), items, out_path=out, dataset="d", progress=False, batch=1)
    assert len(item_records(out)) == 10
    before = out.read_bytes()
    # ... and the kill tore a half-written line
    with open(out, "ab") as fh:
        fh.write(b'{"type": "item", "system": "m-beta", "item_id": "line-3", "outp')
    ens = FakeEnsemble(right_for)
    summary = run_eval(ens, items, out_path=out, dataset="d", progress=False, batch=1)
    after = out.read_bytes()
    assert after.startswith(before)  # earlier bytes untouched
    recs = item_records(out)
    keys = [(r["system"], r["item_id"]) for r in recs]
    assert len(keys) == len(set(keys)) == N_ITEMS * 4  # nothing lost, nothing twice
    assert len(ens.calls) == N_ITEMS * 4 - 10  # only the missing ones ran
    assert {r["system"]: r["accuracy"]["correct"] for r in summary["systems"]} == {ENSEMBLE: 6, "m-alpha": 4, "m-beta": 0, "m-gamma": 0}
    # a third run does nothing and leaves the file byte-identical
    ens3 = FakeEnsemble(right_for)
    run_eval(ens3, items, out_path=out, dataset="d", progress=False, batch=1)
    assert ens3.calls == [] and out.read_bytes() == after


def test_resume_keeps_complete_record_missing_newline(tmp_path, items):
    out = tmp_path / "res.jsonl"
    with pytest.raises(Killed):
        run_eval(FakeEnsemble(right_for, die_after=3), items, out_path=out, dataset="d", progress=False, batch=1)
    data = out.read_bytes()
    out.write_bytes(data[:-1])  # the record is whole, only its newline is missing
    ens = FakeEnsemble(right_for)
    run_eval(ens, items, out_path=out, dataset="d", progress=False, batch=1)
    assert out.read_bytes().startswith(data)
    assert len(ens.calls) == N_ITEMS * 4 - 2
    assert len(item_records(out)) == N_ITEMS * 4


def test_exception_mid_run_keeps_finished_records(tmp_path, items):
    out = tmp_path / "res.jsonl"

    def flaky(system, prompt, seed):
        if system == "m-beta" and "Double 3 " in prompt:
            raise RuntimeError("boom")
        return right_for(system, prompt, seed)

    with pytest.raises(RuntimeError):
        run_eval(FakeEnsemble(flaky), items, out_path=out, dataset="d", progress=False, batch=1)
    recs = item_records(out)
    assert len(recs) == 2 * 4 + 2  # items 1-2 complete, item 3: ensemble and m-alpha
    run_eval(FakeEnsemble(right_for), items, out_path=out, dataset="d", progress=False, batch=1)
    assert len(item_records(out)) == N_ITEMS * 4


def test_limit_then_extend(tmp_path, items):
    out = tmp_path / "res.jsonl"
    s1 = run_eval(FakeEnsemble(right_for), items[:2], out_path=out, dataset="d", progress=False, batch=1)
    assert s1["n_items"] == 2 and s1["systems"][0]["n_done"] == 2
    ens = FakeEnsemble(right_for)
    s2 = run_eval(ens, items, out_path=out, dataset="d", progress=False, batch=1)
    assert len(ens.calls) == 4 * 4 and s2["systems"][0]["n_done"] == 6
    # a smaller limit summarises only its items, from the file
    s3 = run_eval(FakeEnsemble(right_for), items[:3], out_path=out, dataset="d", progress=False, batch=1)
    assert s3["systems"][0]["accuracy"]["n"] == 3


def test_a_file_from_before_a_setting_existed_resumes(tmp_path, items):
    out = tmp_path / "res.jsonl"
    run_eval(FakeEnsemble(right_for), items[:2], out_path=out, dataset="d", progress=False, batch=1)
    lines = out.read_text().splitlines()
    head = json.loads(lines[0])
    del head["settings"]["prefer_finished"]  # as written before the option was added
    out.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    ens = FakeEnsemble(right_for)
    run_eval(ens, items[:3], out_path=out, dataset="d", progress=False, batch=1)
    assert len(ens.calls) == 4  # only the new item, for each of the 4 systems
    # ... but the option on is a different run
    with pytest.raises(SpecEMError, match="different run.*prefer_finished"):
        run_eval(FakeEnsemble(right_for), items[:3], out_path=out, dataset="d", settings={"prefer_finished": True},
                 progress=False, batch=1)


def test_systems_subset_and_errors(tmp_path, items):
    out = tmp_path / "res.jsonl"
    s = run_eval(FakeEnsemble(right_for), items, out_path=out, dataset="d", systems=[ENSEMBLE], progress=False, batch=1)
    assert [r["system"] for r in s["systems"]] == [ENSEMBLE]
    with pytest.raises(SpecEMError, match="unknown system"):
        run_eval(FakeEnsemble(right_for), items, out_path=out, dataset="d", systems=["gpt-9"], progress=False, batch=1)
    # different settings must not be mixed into the same file
    with pytest.raises(SpecEMError, match="different run.*temperature"):
        run_eval(FakeEnsemble(right_for), items, out_path=out, dataset="d", settings={"temperature": 0.7}, progress=False, batch=1)
    with pytest.raises(SpecEMError, match="different run.*seed"):
        run_eval(FakeEnsemble(right_for), items, out_path=out, dataset="d", seed=1, progress=False, batch=1)


def test_corrupt_file_is_refused_not_rewritten(tmp_path, items):
    out = tmp_path / "res.jsonl"
    run_eval(FakeEnsemble(right_for), items[:1], out_path=out, dataset="d", progress=False, batch=1)
    lines = out.read_bytes().split(b"\n")
    lines[2] = b"garbage"
    out.write_bytes(b"\n".join(lines))
    before = out.read_bytes()
    with pytest.raises(SpecEMError, match=r"res\.jsonl:3: not valid JSON"):
        run_eval(FakeEnsemble(right_for), items, out_path=out, dataset="d", progress=False, batch=1)
    assert out.read_bytes() == before
    other = tmp_path / "other.jsonl"
    other.write_text('{"some": "thing"}\n')
    with pytest.raises(SpecEMError, match="not a results file"):
        run_eval(FakeEnsemble(right_for), items, out_path=other, dataset="d", progress=False, batch=1)


def test_changed_prompt_is_detected(tmp_path, items):
    out = tmp_path / "res.jsonl"
    run_eval(FakeEnsemble(right_for), items[:2], out_path=out, dataset="d", progress=False, batch=1)
    changed = [type(items[0])(**{**items[0].__dict__, "prompt": "Double 9 please"})] + list(items[1:])
    with pytest.raises(SpecEMError, match="different prompt"):
        run_eval(FakeEnsemble(right_for), changed, out_path=out, dataset="d", progress=False, batch=1)


def test_cache_full_is_recorded_not_graded(tmp_path, items):
    out = tmp_path / "res.jsonl"
    ens = FakeEnsemble(right_for, max_prompt_chars=17)  # "Double 1000 please" is too long
    s = run_eval(ens, items, out_path=out, dataset="d", progress=False, batch=1)
    row = s["systems"][0]
    assert row["n_errors"] == 1 and row["accuracy"]["n"] == 5
    assert "refused by the engine" in format_summary(s)


def test_ifbench_items_graded_with_checks(tmp_path):
    f = tmp_path / "if.jsonl"
    f.write_text(
        json.dumps({"prompt": "answer in lowercase", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}) + "\n"
        + json.dumps({"prompt": "start with a verb", "instruction_id_list": ["words:start_verb", "punctuation:no_comma"], "kwargs": [{}, {}]}) + "\n"
    )
    its = load_items(str(f))
    s = run_eval(FakeEnsemble(lambda sy, p, se: "all lower, with comma"), its, out_path=tmp_path / "r.jsonl", dataset="if", progress=False, batch=1)
    row = s["systems"][0]
    assert row["accuracy"]["n"] == 1 and row["accuracy"]["correct"] == 1  # prompt 2 has a skipped check
    assert row["instructions_checked"] == 2 and row["instructions_skipped"] == 1
    assert row["instruction_accuracy"]["correct"] == 1
    assert "skipped" in format_summary(s)


def test_eval_cli_with_fake(tmp_path, items, monkeypatch, capsys):
    import argparse

    from specem_fast.cli import eval as cli_eval

    monkeypatch.setattr(cli_eval, "load_ensemble", lambda args, max_batch=1: FakeEnsemble(right_for))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli_eval.register(sub)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Double 5 please", "answer": "10"}\n{"prompt": "Double 6 please", "answer": 12}\n')
    out = tmp_path / "o.jsonl"
    args = parser.parse_args(["eval", str(data), "--out", str(out), "--limit", "1", "--temperature", "0", "--hedge-lr", "off", "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "ensemble" in printed and "1/1" in printed
    header = json.loads(out.read_text().splitlines()[0])
    assert header["settings"]["hedge_lr"] is None and header["settings"]["temperature"] == 0.0
    with pytest.raises(SpecEMError, match="limit"):
        args = parser.parse_args(["eval", str(data), "--limit", "0"])
        args.func(args)
    with pytest.raises(SpecEMError, match="hedge-lr"):
        args = parser.parse_args(["eval", str(data), "--hedge-lr", "fast"])
        args.func(args)


_CHILD = r"""
import sys, time, json
sys.path[:0] = [{tests!r}, {here!r}, {root!r}]
from measure_fakes import FakeEnsemble
from test_measure_eval import right_for
from specem_fast.measure.datasets import load_items
from specem_fast.measure.evaluate import run_eval

class Slow(FakeEnsemble):
    def _tick(self, *a):
        time.sleep(0.03)
        super()._tick(*a)

run_eval(Slow(right_for), load_items({data!r}), out_path={out!r}, dataset="d", progress=False, batch=1)
"""


def test_real_sigkill_then_resume(tmp_path):
    import signal
    import subprocess
    import time

    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Double {q} please", "answer": str(2 * q)}) + "\n" for q in range(1, 41)))
    out = tmp_path / "res.jsonl"
    code = _CHILD.format(tests=str(Path(__file__).parents[1]), here=str(Path(__file__).parent), root=str(Path(__file__).parents[2]), data=str(data), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 12:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = out.read_bytes()
    done_before = before.count(b"\n") - 1
    assert 11 <= done_before < 160
    ens = FakeEnsemble(right_for)
    items = load_items(str(data))
    summary = run_eval(ens, items, out_path=out, dataset="d", progress=False, batch=1)
    assert out.read_bytes()[: before.rfind(b"\n") + 1] == before[: before.rfind(b"\n") + 1]
    keys = [(r["system"], r["item_id"]) for r in item_records(out)]
    assert len(keys) == len(set(keys)) == 160
    assert len(ens.calls) == 160 - done_before
    assert summary["systems"][0]["accuracy"]["correct"] == 40


def test_batched_run_equals_one_at_a_time(tmp_path, items):
    one = run_eval(FakeEnsemble(right_for), items, out_path=tmp_path / "a.jsonl", dataset="d", seed=5,
                   progress=False, batch=1)
    ens = FakeEnsemble(right_for)
    four = run_eval(ens, items, out_path=tmp_path / "b.jsonl", dataset="d", seed=5, progress=False, batch=4)
    keep = ("system", "item_id", "seed", "output", "correct", "new_tokens")
    a = sorted(tuple(r[k] for k in keep) for r in item_records(tmp_path / "a.jsonl"))
    b = [tuple(r[k] for k in keep) for r in item_records(tmp_path / "b.jsonl")]
    assert sorted(b) == a  # the same answers, each with its own seed
    # batch-major order: items 1-4 for every system, then items 5-6
    assert [(r[1], r[0]) for r in b[:8]] == [(f"line-{i}", ENSEMBLE) for i in range(1, 5)] + [
        (f"line-{i}", "m-alpha") for i in range(1, 5)]
    assert [c[2]["seed"] for c in ens.calls if c[0] == ENSEMBLE] == [5, 6, 7, 8, 9, 10]
    assert [r["accuracy"] for r in one["systems"]] == [r["accuracy"] for r in four["systems"]]


def test_a_refused_item_in_a_batch_is_recorded_and_the_rest_run(tmp_path, items):
    ens = FakeEnsemble(right_for, max_prompt_chars=17)  # "Double 1000 please" is refused
    s = run_eval(ens, items, out_path=tmp_path / "r.jsonl", dataset="d", progress=False, batch=8)
    recs = item_records(tmp_path / "r.jsonl")
    bad = [r for r in recs if r["item_id"] == "line-6"]
    assert len(bad) == 4 and all(r["stop_reason"] == "error" and r["correct"] is None for r in bad)
    assert {r["system"]: r["n_done"] for r in s["systems"]} == {sys_: 6 for sys_ in SYSTEMS}
    assert s["systems"][0]["accuracy"]["n"] == 5


def test_bad_batch_is_refused(tmp_path, items):
    with pytest.raises(SpecEMError, match="batch must be"):
        run_eval(FakeEnsemble(right_for), items, out_path=tmp_path / "x.jsonl", dataset="d", progress=False, batch=0)
