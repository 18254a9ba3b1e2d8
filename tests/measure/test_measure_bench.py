import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from measure_fakes import MODELS, FakeEnsemble  # noqa: E402

from specem_fast.config import EngineConfig
from specem_fast.errors import SpecEMError
from specem_fast.measure.bench import BenchPlan, build_prompt, format_bench, parse_lengths, run_bench, token_counter
from specem_fast.measure.trace import read_trace


def test_parse_lengths():
    assert parse_lengths("short, 1000,3k") == ["short", 1000, 3000]
    with pytest.raises(SpecEMError):
        parse_lengths("tiny")
    with pytest.raises(SpecEMError):
        parse_lengths("5")


def test_prompts_are_deterministic_and_sized():
    count, source = token_counter(object())
    assert "estimate" in source
    problems = [f"Problem text number {i} about apples." for i in range(500)]
    short = build_prompt("short", count, problems)
    long1 = build_prompt(1000, count, problems)
    assert build_prompt(1000, count, problems) == long1
    assert count(short) < 100
    assert 1000 <= count(long1) < 1000 + 20
    assert long1.count("Problem ") > 50
    with pytest.raises(SpecEMError):
        build_prompt(10**6, count, problems)


def test_bench_measures_all_systems_with_ratios(tmp_path):
    ens = FakeEnsemble()
    plan = BenchPlan(lengths=["short", 300], windows=[2, 4], new_tokens=12, reps=2, warmup=1)
    report = run_bench(ens, plan, progress=False, trace_path=tmp_path / "trace.jsonl", command="specem-fast bench")
    json.dumps(report)  # serialisable
    rows = report["rows"]
    # per (length, window): cached, recompute, 3 singles
    assert len(rows) == 2 * 2 * (2 + len(MODELS))
    cached = [r for r in rows if r["system"] == "ensemble-cached"]
    assert all(len(r["reps"]) == 2 for r in cached)
    assert cached[0]["median"]["tokens_per_s"] == pytest.approx(12 / 1.0)
    assert cached[0]["median"]["draft_s_per_round"] == pytest.approx(0.3 / 3)
    assert cached[0]["median"]["first_segment_s"] == pytest.approx(0.25)
    # warm-up + reps calls: ensemble 2 modes x 3 runs per config; singles measured once per (length, tokens)
    ens_calls = [c for c in ens.calls if c[0] == "ensemble"]
    assert len(ens_calls) == 2 * 2 * 2 * 3
    assert all(c[2]["window"] in (2, 4) and c[2]["max_new_tokens"] == 12 and c[2]["temperature"] == 0.0 for c in ens_calls)
    singles = [c for c in ens.calls if c[0] != "ensemble"]
    assert len(singles) == 2 * len(MODELS) * 3  # the second window reuses the measurement
    # each model alone decodes as many tokens as it held in the ensemble's answer, EOS ignored
    by_model = {c[0]: c[2] for c in singles}
    assert by_model["m-alpha"]["max_new_tokens"] == 10 and by_model["m-gamma"]["max_new_tokens"] == 12
    assert all(c[2]["ignore_eos"] for c in singles)
    for ratio in report["ratios"]:
        assert ratio["recompute_over_cached"] == pytest.approx(3.0)
        assert ratio["cached_over_sum_alone"] == pytest.approx(1.0 / (3 * 0.2))
        assert ratio["same_text_cached_recompute"] is True
    table = format_bench(report)
    assert "recompute/cached 3.00x" in table and "cached/(sum of models alone) 1.67x" in table
    assert "alone m-beta" in table and "ensemble recompute" in table
    # the trace holds the rounds of the last rep of every ensemble configuration
    trace = read_trace(tmp_path / "trace.jsonl")
    assert len(trace) == 2 * 2 * 2 * 3
    assert trace[0]["request"] == "short W2 cached"
    assert report["meta"]["prompt_source"] == "gsm8k"


def test_lengths_beyond_the_engine_are_skipped():
    ens = FakeEnsemble(max_prompt_chars=500)
    report = run_bench(ens, BenchPlan(lengths=["short", 1000], windows=[3], reps=1, warmup=0, singles=False), progress=False)
    assert {r["prompt"] for r in report["rows"]} == {"short"}
    assert report["skipped"][0]["prompt"] == "1000" and "does not fit" in report["skipped"][0]["reason"]
    assert "skipped 1000 W3" in format_bench(report)
    ens.config = EngineConfig(cache_tokens=600)  # the engine tells its budget: skipped before running
    ens.max_prompt_chars = None
    report = run_bench(ens, BenchPlan(lengths=["short", 1000], windows=[3], reps=1, warmup=0, singles=False), progress=False)
    assert "engine holds 600" in report["skipped"][0]["reason"]


def test_plan_validation():
    with pytest.raises(SpecEMError):
        BenchPlan(reps=0).validate()
    with pytest.raises(SpecEMError):
        BenchPlan(modes=["fast"]).validate()
    with pytest.raises(SpecEMError):
        BenchPlan(settings={"window": 3}).validate()
    with pytest.raises(SpecEMError):
        BenchPlan(settings={"temperature": -1}).validate()


def test_bench_cli_with_fake(tmp_path, monkeypatch, capsys):
    import argparse

    from specem_fast.cli import bench as cli_bench

    monkeypatch.setattr(cli_bench, "load_ensemble", lambda args: FakeEnsemble())
    parser = argparse.ArgumentParser()
    cli_bench.register(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "--lengths", "short", "--windows", "3", "--reps", "1", "--warmup", "0", "--new-tokens", "8", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "specem-fast-bench/1" and len(report["rows"]) == 2 + len(MODELS)
    assert "recompute/cached" in capsys.readouterr().out
    args = parser.parse_args(["bench", "--out", str(tmp_path / "no" / "x.json")])
    with pytest.raises(SpecEMError, match="does not exist"):
        args.func(args)
