"""Issue 28: a short soak of `specem-fast serve` (benchmarks/soak.py) on the tiny models.

About two minutes of mixed load on a server started as a child process on
loopback: streams and plain answers, chat and completions, clients hanging up,
bad requests, oversized bodies, bursts past the queue, and fixed greedy prompts
checked against their answers alone. bfloat16 with --deterministic, so a greedy
answer may not depend on its batch. No timing is asserted: no mismatch, no 5xx,
every refusal the right status, and running/waiting back to 0 afterwards.
"""

import importlib.util
from pathlib import Path

path = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
spec = importlib.util.spec_from_file_location("soak", path)
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


def test_short_soak_holds(tiny_dirs):
    models = ",".join(str(tiny_dirs[a]) for a in ("llama", "qwen2"))
    args = soak.parse_args(["--minutes", "2", "--clients", "3", "--burst", "20", "--max-batch", "3",
                            "--max-waiting", "2", "--max-body-mb", "0.25", "--cache-tokens", "512",
                            "--max-tokens", "16", "--models", models, "--dtype", "bfloat16", "--deterministic",
                            "--threads", "1"])
    report = soak.run_soak(args, log=lambda s: None)
    rows = "\n".join(soak.format_row(r) for r in report["minutes"])
    assert "batch-independent (--deterministic)" in report["startup"]
    assert report["greedy_checked"] > 0, rows
    assert report["mismatches"] == 0, rows
    assert report["server_errors"] == 0 and report["exceptions"] == 0, report["outcomes"]
    assert not report["broken"] and not report["wrong_status"], (report["broken"], report["wrong_status"])
    assert report["after"]["running"] == 0 and report["after"]["waiting"] == 0, report["after"]
    assert report["exit_code"] == 0 and not report["server_log_tail"], report["server_log_tail"]
    by = report["by_action"]
    assert by.get("bad", {}).get("400") and by.get("hang_up"), by  # the mix did happen
    assert report["ok"]
