"""benchmarks/rescore_trace.py against real engine runs: rescoring a whole-response
trace under another rule must pick what the engine picks when it runs that rule."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from specem_fast.measure.datasets import load_items
from specem_fast.measure.evaluate import run_eval
from specem_fast.measure.trace import read_trace

ROOT = Path(__file__).resolve().parents[2]
N, TOKENS = 3, 6
BASE = {"max_new_tokens": TOKENS, "window": TOKENS, "temperature": 0.0}


def _script():
    spec = importlib.util.spec_from_file_location("rescore_trace", ROOT / "benchmarks" / "rescore_trace.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("rescore_trace", mod)  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dirs(tiny_dirs):
    return [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]


def _run(ens, tmp_path, name, **settings):
    items = load_items("gsm8k", limit=N)
    out, trace = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.trace.jsonl"
    run_eval(ens, items, out_path=out, dataset="gsm8k", settings={**BASE, **settings}, systems=["ensemble"],
             trace_path=trace, progress=False, batch=N)
    return out, trace


def _first_winners(trace) -> dict[str, str]:
    return {r["request"]: r["candidates"][r["winner"]]["text"] for r in read_trace(trace) if r["round"] == 1}


def _rescored_n(path: Path, n: int) -> dict[str, str]:
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert recs[0]["type"] == "header" and len(recs) == 1 + n
    return {r["item_id"]: r["output"] for r in recs[1:]}


def _rescored(path: Path) -> dict[str, str]:
    return _rescored_n(path, N)


def test_rescored_variants_match_engine_runs(dirs, tmp_path, monkeypatch, capsys):
    from specem_fast import Ensemble

    full = Ensemble.from_pretrained(dirs, cache_tokens=512, max_batch=N, preset="reference")
    names = full.model_names
    res, trace = _run(full, tmp_path, "whole")
    weights = tmp_path / "prior.json"
    full.set_prior_weights({names[0]: 0.1, names[1]: 0.7, names[2]: 0.2})
    full.save_weights(weights)
    a, b = names[0], names[1]
    variants = {
        "sum": "score=logprob_sum",
        "nsv": "self_votes=0",
        "judge": f"verifiers={b}",
        "pair": f"drafters={a}+{b};verifiers={a}+{b}",
        "prior": f"weights={weights}",
    }
    monkeypatch.setattr(sys, "argv", ["rescore_trace.py", str(res), str(trace), "--out-dir", str(tmp_path / "r"),
                                      *(f"{k}={v}" for k, v in variants.items())])
    _script().main()
    assert f"picks the engine's winner in {N}" in capsys.readouterr().out
    for bad, why in (("x=nope=1", "unknown"), ("x=drafters=zzz", "names 0"), ("x", "expected LABEL"),
                     ("x=score=logit", "unknown")):
        monkeypatch.setattr(sys, "argv", ["rescore_trace.py", str(res), str(trace), "--out-dir", str(tmp_path), bad])
        with pytest.raises(SystemExit, match=why):
            _script().main()

    # the same rules, run by the engine
    expected = {
        "sum": _run(full, tmp_path, "e-sum", score="logprob_sum")[1],
        "nsv": _run(full, tmp_path, "e-nsv", self_votes=False)[1],
        "prior": _run(full, tmp_path, "e-prior", init_weights="prior")[1],
        "judge": _run(Ensemble.from_pretrained(dirs, [dirs[1]], cache_tokens=512, max_batch=N, preset="reference"),
                      tmp_path, "e-judge")[1],
        "pair": _run(Ensemble.from_pretrained(dirs[:2], cache_tokens=512, max_batch=N, preset="reference"),
                     tmp_path, "e-pair")[1],
    }
    picked_differently = 0
    for label, etrace in expected.items():
        got = _rescored(tmp_path / "r" / f"whole-{label}.jsonl")
        assert got == _first_winners(etrace), label
        picked_differently += got != _first_winners(trace)
    assert picked_differently >= 1  # the variants are not all the run's own rule in disguise


def test_rescore_refuses_a_windowed_run(dirs, tmp_path, monkeypatch):
    from specem_fast import Ensemble

    ens = Ensemble.from_pretrained(dirs[:2], cache_tokens=512, max_batch=N, preset="reference")
    items = load_items("gsm8k", limit=1)
    out, trace = tmp_path / "w.jsonl", tmp_path / "w.trace.jsonl"
    run_eval(ens, items, out_path=out, dataset="gsm8k", settings={**BASE, "window": 2}, systems=["ensemble"],
             trace_path=trace, progress=False)
    monkeypatch.setattr(sys, "argv", ["rescore_trace.py", str(out), str(trace), "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="whole-response"):
        _script().main()


def test_prefer_finished_matches_the_rescored_trace(real_ensemble, tmp_path, monkeypatch, capsys):
    """Real members on IFBench prompts whose short answers end within 16 tokens for some
    members and not for others (Gemma-3 never ends them)."""
    items = [it for i, it in enumerate(load_items("ifbench", limit=18)) if i in (1, 15, 17)]
    st = {"max_new_tokens": 16, "window": 16, "temperature": 0.0}

    def run(name, **over):
        out, trace = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.trace.jsonl"
        run_eval(real_ensemble, items, out_path=out, dataset="ifbench", settings={**st, **over},
                 systems=["ensemble"], trace_path=trace, progress=False, batch=3)
        return out, trace

    res, trace = run("whole")
    ended = [[c["ended_with_stop"] for c in r["candidates"]] for r in read_trace(trace) if r["round"] == 1]
    assert any(any(e) and not all(e) for e in ended), ended  # the rule has something to choose
    monkeypatch.setattr(sys, "argv", ["rescore_trace.py", str(res), str(trace), "--out-dir", str(tmp_path / "r"),
                                      "fin=finished=1", "fin-sum=finished=1;score=logprob_sum"])
    _script().main()
    capsys.readouterr()
    for label, over in (("fin", {}), ("fin-sum", {"score": "logprob_sum"})):
        got = _rescored_n(tmp_path / "r" / f"whole-{label}.jsonl", len(items))
        assert got == _first_winners(run(label, prefer_finished=True, **over)[1]), label
    # an unfinished candidate never wins while a finished one competes
    for r, e in zip((r for r in read_trace(run("check", prefer_finished=True)[1]) if r["round"] == 1), ended):
        assert not any(e) or r["candidates"][r["winner"]]["ended_with_stop"]
