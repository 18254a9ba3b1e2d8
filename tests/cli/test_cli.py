import json
import subprocess
import sys

import pytest
import torch

from specem_fast.cli import main
from specem_fast.hub.fetch import model_dir


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_on_tiny_models(tiny_dirs, capsys, tmp_path):
    models = f"{tiny_dirs['llama']},{tiny_dirs['gemma3_text']}"
    code, out, err = run_cli(capsys, "generate", "--models", models, "--prompt", "Say hello.",
                             "--max-new-tokens", "12", "--window", "4", "--json", "--cache-tokens", "512")
    assert code == 0, err
    res = json.loads(out)
    assert res["text"] and res["rounds"] and res["stop_reason"] in ("length", "stop", "empty", "stop_string")
    assert res["settings"]["window"] == 4
    assert set(res["metadata"]["kernels"].values()) == {"torch"}
    assert "".join(r["candidates"][r["winner"]]["text"] for r in res["rounds"]) == res["text"]


def test_generate_streams_text_and_reads_prompt_file(tiny_dirs, capsys, tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text("Count to five.")
    code, out, err = run_cli(capsys, "generate", "--models", str(tiny_dirs["qwen2"]), "--prompt-file", str(p),
                             "--max-new-tokens", "8", "--window", "4", "--cache-tokens", "512")
    assert code == 0, err
    assert out.strip() and "tokens in" in err and "segments won" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "nope-model", "--prompt", "x"], "unknown model 'nope-model'"),
        (["--prompt", "x", "--window", "0"], "window must be an integer >= 1"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p must be in"),
        (["--prompt", "x", "--hedge-lr", "fast"], "--hedge-lr must be a number or 'off'"),
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
        (["--models", "a,a", "--prompt", "x"], "more than once"),
        (["--models", ",", "--prompt", "x"], "empty"),
        (["--prompt", "x", "--temperature", "1e-40"], "temperature 1e-40 is too small"),
        (["--prompt", "x", "--seed", str(10**14)], "seed must be an integer in [0, 2**40)"),
        (["--prompt", "caf\udcc3 au lait"], "--prompt is not valid Unicode text: it has a lone surrogate U+DCC3"),
        (["--prompt", "x", "--stop", "\ud800"], "a stop string is not valid Unicode text"),
        (["--prompt", "x", "--cache-tokens", str(10**9)], "of KV cache on cpu"),
        (["--prompt", "x", "--json", "--trace", "/nonexistent/x"], "folder '/nonexistent' does not exist"),
        (["--prompt", "x", "--models", f"smollm2-135m-instruct,{model_dir('smollm2-135m-instruct')}/"],
         "names one model twice"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(capsys, monkeypatch, args, message):
    from specem_fast import Ensemble

    monkeypatch.setattr(Ensemble, "__init__", lambda *a, **k: pytest.fail("the engine was built"))
    code, out, err = run_cli(capsys, "generate", *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert err.startswith("specem-fast: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cache-tokens", "4096.5"], "generate: argument --cache-tokens: invalid int value: '4096.5'"),
        (["--kernels", "cuda"], "generate: argument --kernels: invalid choice: 'cuda'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),  # found by the top parser
    ],
)
def test_argument_errors_are_one_line_too(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"specem-fast: error: {message}")
    assert err.count("\n") == 1 and "--help)" in err


def test_prompt_file_or_stdin_that_is_not_utf8_exits_2(capsys, tmp_path, monkeypatch):
    import io

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    code, out, err = run_cli(capsys, "generate", "--prompt-file", str(bad))
    assert code == 2 and err == f"specem-fast: error: --prompt-file {bad} is not valid UTF-8 text (byte 0xe9); save it as UTF-8\n"
    surrogate = tmp_path / "cesu.txt"
    surrogate.write_bytes(b"x \xed\xa0\x80 y")  # a UTF-16 surrogate encoded as if it were a character
    code, out, err = run_cli(capsys, "generate", "--prompt-file", str(surrogate))
    assert code == 2 and "is not valid UTF-8 text (byte 0xed)" in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi \xff"), encoding="utf-8"))
    code, out, err = run_cli(capsys, "generate")
    assert code == 2 and "the prompt on stdin is not valid UTF-8 text (byte 0xff)" in err
    # stdin is read as bytes, so a surrogateescape text layer does not hide the bad byte
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi \xff"), encoding="utf-8",
                                                       errors="surrogateescape"))
    code, out, err = run_cli(capsys, "generate")
    assert code == 2 and "the prompt on stdin is not valid UTF-8 text (byte 0xff)" in err
    # a text stream without a byte buffer is checked as text
    monkeypatch.setattr("sys.stdin", io.StringIO("hi \udcff"))
    code, out, err = run_cli(capsys, "generate")
    assert code == 2 and "the prompt on stdin is not valid Unicode text: it has a lone surrogate U+DCFF" in err


def test_a_huge_prompt_file_is_refused_without_reading_it_all(capsys, tmp_path):
    from specem_fast.cli.generate import MAX_PROMPT_BYTES

    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:
        fh.truncate(MAX_PROMPT_BYTES * 50)  # a sparse 200 MiB file of zero bytes
    code, out, err = run_cli(capsys, "generate", "--prompt-file", str(big))
    assert code == 2 and f"--prompt-file {big} is over 4 MiB" in err and out == ""


@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"SPECEM_KERNELS": "trition"}, [], "environment variable SPECEM_KERNELS must be auto, triton or torch (got 'trition')"),
        ({"SPECEM_FLASH_ATTN": "yes"}, [], "environment variable SPECEM_FLASH_ATTN must be auto, on or off (got 'yes')"),
        ({"TRITON_INTERPRET": "0"}, ["--kernels", "triton"], "kernels='triton' cannot run on cpu"),
    ],
)
def test_kernel_environment_problems_exit_2_before_loading(capsys, monkeypatch, tiny_dirs, env, args, message):
    from specem_fast import kernels

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "TRITON_INTERPRET" in env:  # the interpreter is chosen when the kernels are imported
        monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    monkeypatch.setattr("specem_fast.model.runner.load_transformer", lambda *a, **k: pytest.fail("weights loaded"))
    code, _, err = run_cli(capsys, "generate", "--models", str(tiny_dirs["llama"]), "--prompt", "x", *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_folder_without_weights_and_unfetched_model(capsys, tmp_path, monkeypatch, tiny_dirs):
    bad = tmp_path / "noweights"
    bad.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((tiny_dirs["llama"] / f).read_bytes())
    code, _, err = run_cli(capsys, "generate", "--models", str(bad), "--prompt", "x")
    assert code == 2 and "safetensors" in err
    monkeypatch.setenv("SPECEM_FAST_HOME", str(tmp_path / "empty-home"))
    code, _, err = run_cli(capsys, "generate", "--models", "gemma3-270m", "--prompt", "x")
    assert code == 2 and "specem-fast models fetch gemma3-270m" in err


def test_unverifiable_verifier_is_reported(capsys, tiny_dirs, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--models", str(tiny_dirs["llama"]), "--verifiers",
                           str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "missing" in err


def test_console_script_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "specem_fast", "generate", "--prompt", "x", "--window", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "specem-fast: error: window must be an integer >= 1 (got -3); the paper uses 5-15, default 10"


def test_flash_attn_on_without_flash_attn_exits_2(capsys, tiny_dirs, monkeypatch):
    from specem_fast.kernels import cascade

    monkeypatch.setattr(cascade, "_backend", None)
    code, _, err = run_cli(capsys, "generate", "--models", str(tiny_dirs["llama"]), "--prompt", "x",
                           "--kernels", "triton", "--flash-attn", "on")
    assert code == 2 and "flash-attn is not installed" in err and "Traceback" not in err


def test_generate_prints_exactly_the_answer_with_a_stop_string(tiny_dirs, capsys):
    args = ["--models", f"{tiny_dirs['llama']},{tiny_dirs['qwen2']}", "--prompt", "List three colours.",
            "--max-new-tokens", "24", "--window", "4", "--cache-tokens", "512"]
    code, full, _ = run_cli(capsys, "generate", *args)
    assert code == 0 and len(full.strip()) > 6
    full = full[:-1]  # the closing newline
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    code, out, _ = run_cli(capsys, "generate", *args, "--stop", stop, "--json")
    res = json.loads(out)
    assert res["stop_reason"] == "stop_string" and res["text"] == full[: full.find(stop)]
    code, out, err = run_cli(capsys, "generate", *args, "--stop", stop)
    assert code == 0 and out == res["text"] + "\n" and "stop: stop_string" in err


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "unknown device 'gpu'"), ("mps", "device type 'mps' is not supported"),
     ("cuda:99", "does not exist" if torch.cuda.is_available() else "CUDA is not available")],
)
def test_bad_device_exits_2_before_loading(capsys, tiny_dirs, device, message):
    code, _, err = run_cli(capsys, "generate", "--models", str(tiny_dirs["llama"]), "--prompt", "x",
                           "--device", device)
    assert code == 2 and message in err and "Traceback" not in err
