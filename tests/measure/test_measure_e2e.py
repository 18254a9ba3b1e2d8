"""End to end on the real engine with tiny random models (real tokenizers)."""

import json
from pathlib import Path

import pytest

from specem_fast.cli import main
from specem_fast.measure.bench import BenchPlan, format_bench, run_bench
from specem_fast.measure.datasets import load_items
from specem_fast.measure.evaluate import ENSEMBLE, format_summary, run_eval
from specem_fast.measure.plot import plot_file
from specem_fast.measure.trace import read_trace

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_dirs):
    """Three tokenizers (SmolLM2, Qwen2.5, Gemma 3), as with the default models."""
    from specem_fast import Ensemble

    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    return Ensemble.from_pretrained(names, cache_tokens=1024, max_batch=1)


@pytest.fixture(scope="module")
def small_vocab_ensemble(tiny_dirs):
    """Two tiny models with the 49k SmolLM2 vocabulary: the cheapest real engine run."""
    from specem_fast import Ensemble

    return Ensemble.from_pretrained([str(tiny_dirs["llama"]), str(tiny_dirs["mistral"])], cache_tokens=1024, max_batch=1)


class Counting:
    """Counts engine calls (to prove a resumed run does no work twice)."""

    def __init__(self, ens):
        self.ens, self.calls = ens, 0
        self.model_names = ens.model_names

    def generate(self, *a, **k):
        self.calls += 1
        return self.ens.generate(*a, **k)

    def generate_single(self, *a, **k):
        self.calls += 1
        return self.ens.generate_single(*a, **k)


def test_eval_on_tiny_models_resumes(tiny_ensemble, tmp_path):
    items = load_items("gsm8k", limit=2)
    out, trace = tmp_path / "gsm8k.jsonl", tmp_path / "trace.jsonl"
    settings = {"max_new_tokens": 8, "window": 4}
    ens = Counting(tiny_ensemble)
    summary = run_eval(ens, items, out_path=out, dataset="gsm8k", settings=settings, trace_path=trace, progress=False)
    assert ens.calls == 4  # one batched call per system
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 2 * 4
    recs = [json.loads(x) for x in lines[1:]]
    assert {r["system"] for r in recs} == {ENSEMBLE, *tiny_ensemble.model_names}
    for r in recs:
        if r["system"] == ENSEMBLE:
            # the last accepted segment may cross the limit; it is counted in the first model's tokens,
            # and a segment drafted by another tokenizer can be longer there than the window
            assert 1 <= r["new_tokens"] <= 8 + 3 * 4
        else:
            assert 1 <= r["new_tokens"] <= 8
        assert r["seconds"] > 0 and r["tokens_per_s"] > 0
        assert r["gold"] in ("18", "3") and isinstance(r["correct"], bool)
    rows = {r["system"]: r for r in summary["systems"]}
    assert rows[ENSEMBLE]["accuracy"]["n"] == 2 and rows[ENSEMBLE]["mean_rounds"] >= 1
    assert sum(rows[ENSEMBLE]["win_share"].values()) == pytest.approx(1.0)
    rounds = read_trace(trace)
    assert len(rounds) == sum(r["rounds"] for r in recs if r["system"] == ENSEMBLE)
    assert {r["request"] for r in rounds} == {"gsm8k-0", "gsm8k-1"}
    # a rerun resumes: no engine call, file unchanged
    before = out.read_bytes()
    ens2 = Counting(tiny_ensemble)
    again = run_eval(ens2, items, out_path=out, dataset="gsm8k", settings=settings, trace_path=trace, progress=False)
    assert ens2.calls == 0 and out.read_bytes() == before
    assert again["systems"] == summary["systems"]
    assert "gsm8k: 2 items" in format_summary(summary)
    # one item at a time gives the same greedy float32 answers as the batch
    single = tmp_path / "one.jsonl"
    run_eval(tiny_ensemble, items, out_path=single, dataset="gsm8k", settings=settings, progress=False, batch=1)
    one = {(r["system"], r["item_id"]): r["output"] for r in map(json.loads, single.read_text().splitlines()[1:])}
    assert one == {(r["system"], r["item_id"]): r["output"] for r in recs}


def test_bench_on_tiny_models_and_plot(small_vocab_ensemble, tmp_path):
    plan = BenchPlan(lengths=["short", 120], windows=[3], new_tokens=4, reps=1, warmup=0)
    report = run_bench(small_vocab_ensemble, plan, progress=False, trace_path=tmp_path / "bench-trace.jsonl")
    assert report["meta"]["prompt_tokens_counted_by"] == "ensemble.count_tokens"
    assert report["meta"]["device"] == "cpu"
    assert not report["skipped"]
    rows = report["rows"]
    assert len(rows) == 2 * (2 + 2)
    long_rows = [r for r in rows if r["prompt"] == "120"]
    assert 120 <= long_rows[0]["prompt_tokens"] < 220
    for r in rows:
        assert r["median"]["tokens_per_s"] > 0 and r["median"]["total_s"] > 0
        if r["kind"] == "single":
            assert r["median"]["new_tokens"] == r["target_new_tokens"]  # EOS ignored: exactly the target
        else:
            assert r["median"]["rounds"] >= 1 and r["median"]["first_segment_s"] > 0
    for ratio in report["ratios"]:
        assert ratio["same_text_cached_recompute"] is True  # greedy: both modes write the same text
        assert ratio["recompute_over_cached"] > 0 and ratio["cached_over_sum_alone"] > 0
    table = format_bench(report)
    assert "recompute/cached" in table and "cached/(sum of models alone)" in table
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    pngs = plot_file(path, tmp_path / "figs") + plot_file(tmp_path / "bench-trace.jsonl", tmp_path / "figs")
    assert len(pngs) == 3
    for p in pngs:
        data = Path(p).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000


def test_cli_eval_bench_plot_on_tiny_models(tiny_dirs, tmp_path, capsys):
    models = ",".join(str(tiny_dirs[a]) for a in ("llama", "mistral"))
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "What is 2+2?", "answer": 4}\n{"prompt": "Pick A, B, C or D.", "answer": "B"}\n')
    out = tmp_path / "mine-results.jsonl"
    code = main(["eval", str(data), "--models", models, "--out", str(out), "--max-new-tokens", "6", "--window", "3",
                 "--cache-tokens", "512", "--no-progress", "--trace", str(tmp_path / "t.jsonl")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "accuracy [95% CI]" in printed.out and "2/2" in printed.out
    assert len(out.read_text().splitlines()) == 1 + 2 * 3
    assert json.loads((tmp_path / "mine-results.summary.json").read_text())["n_items"] == 2
    code = main(["bench", "--models", models, "--lengths", "short", "--windows", "3", "--new-tokens", "6",
                 "--reps", "1", "--warmup", "0", "--cache-tokens", "512", "--no-progress", "--out", str(tmp_path / "b.json")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert json.loads((tmp_path / "b.json").read_text())["meta"]["command"]
    code = main(["plot", str(tmp_path / "b.json"), str(tmp_path / "t.jsonl"), "--out-dir", str(tmp_path / "p")])
    assert code == 0
    assert len(list((tmp_path / "p").glob("*.png"))) == 3
    # user errors: one line, exit 2
    code = main(["eval", str(tmp_path / "missing.jsonl"), "--models", models])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["bench", "--models", models, "--lengths", "tiny"])
    assert code == 2 and "neither 'short' nor a token count" in capsys.readouterr().err
