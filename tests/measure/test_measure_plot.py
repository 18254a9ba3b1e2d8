import argparse
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from measure_fakes import FakeEnsemble  # noqa: E402

from specem_fast.cli import plot as cli_plot
from specem_fast.errors import SpecEMError
from specem_fast.measure.bench import BenchPlan, run_bench
from specem_fast.measure.trace import read_trace, write_trace

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(argv):
    parser = argparse.ArgumentParser()
    cli_plot.register(parser.add_subparsers())
    args = parser.parse_args(["plot", *argv])
    return args.func(args)


def test_write_trace_api(tmp_path):
    ens = FakeEnsemble()
    results = ens.generate(["p1", "p2"])
    n = write_trace(tmp_path / "t.jsonl", results)
    assert n == 6
    recs = read_trace(tmp_path / "t.jsonl")
    assert [r["request"] for r in recs] == ["0"] * 3 + ["1"] * 3
    assert recs[0]["weights"].keys() == {"m-alpha", "m-beta", "m-gamma"}
    assert recs[0]["candidates"][0]["model"] == "m-alpha"
    write_trace(tmp_path / "t.jsonl", results[0].to_dict(), labels=["x"], append=True)
    assert len(read_trace(tmp_path / "t.jsonl")) == 9
    with pytest.raises(SpecEMError):
        write_trace(tmp_path / "missing" / "t.jsonl", results)


def test_read_trace_reads_a_gzip_compressed_trace_and_names_a_damaged_one(tmp_path):
    write_trace(tmp_path / "t.jsonl", FakeEnsemble().generate(["p1", "p2"]))
    plain = read_trace(tmp_path / "t.jsonl")
    packed = gzip.compress((tmp_path / "t.jsonl").read_bytes())
    (tmp_path / "t.jsonl.gz").write_bytes(packed)
    assert read_trace(tmp_path / "t.jsonl.gz") == plain and len(plain) == 6
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(SpecEMError, match="damaged or incomplete gzip"):
        read_trace(tmp_path / "cut.jsonl.gz")
    # appending plain lines would corrupt a compressed trace: refused, file untouched
    with pytest.raises(SpecEMError, match="gzip-compressed; decompress it first"):
        write_trace(tmp_path / "t.jsonl.gz", FakeEnsemble().generate(["p3"]), append=True)
    assert (tmp_path / "t.jsonl.gz").read_bytes() == packed


def test_plot_trace_and_bench_pngs(tmp_path, capsys):
    ens = FakeEnsemble()
    trace = tmp_path / "run.jsonl"
    write_trace(trace, ens.generate(["a", "b", "c"]), labels=["a", "b", "c"])
    with open(trace, "ab") as fh:  # a torn last line from a killed run is ignored
        fh.write(b'{"type": "round", "req')
    report = run_bench(ens, BenchPlan(lengths=["short"], windows=[3, 5], reps=1, warmup=0), progress=False)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(report))
    out_dir = tmp_path / "figs"
    assert _cli([str(trace), str(bench), "--out-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["bench_bench_tokens_per_s.png", "run_weights.png", "run_wins.png"]
    for name in names:
        data = (out_dir / name).read_bytes()
        assert data[:8] == PNG
        assert len(data) > 10_000  # a real figure, not an empty canvas


def test_plot_errors(tmp_path):
    with pytest.raises(SpecEMError, match="does not exist"):
        _cli([str(tmp_path / "nope.jsonl")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SpecEMError, match="no rounds"):
        _cli([str(empty), "--out-dir", str(tmp_path)])
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(SpecEMError, match="neither a trace nor a bench report"):
        _cli([str(other), "--out-dir", str(tmp_path)])


def test_plotting_leaves_the_host_backend_alone(tmp_path):
    """Library code never selects a matplotlib backend (before: matplotlib.use("Agg", force=True))."""
    import subprocess

    write_trace(tmp_path / "t.jsonl", FakeEnsemble().generate(["p1"]))
    code = (
        "import sys, matplotlib\n"
        "from specem_fast.measure.plot import plot_trace\n"
        f"paths = plot_trace({str(tmp_path / 't.jsonl')!r}, {str(tmp_path / 'out')!r})\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, len(paths))\n"
    )
    env = {**__import__("os").environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["svg", "False", "2"]
    assert all(p.read_bytes().startswith(PNG) for p in (tmp_path / "out").iterdir())
