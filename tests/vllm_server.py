"""A real vLLM server on loopback for tests and benchmarks (the CPU build in .venv-vllm,
made by scripts/setup_vllm.sh; .ci/run makes it before the tests).

``VLLMServer(folder, served)`` starts ``python -m vllm.entrypoints.openai.api_server``
on 127.0.0.1 and a free port, waits for ``/health`` and stops the whole process group
on ``stop()`` (vLLM runs its engine in child processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
START_TIMEOUT_S = float(os.environ.get("SPECEM_VLLM_START_TIMEOUT", "900"))


def vllm_available() -> bool:
    return VLLM_PYTHON.exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, folder: Path, served: str, *, max_model_len: int = 2048, dtype: str = "float32",
                 eager: bool = True, kv_cache_gib: int = 1, extra: tuple[str, ...] = ()):
        """``eager``: no torch.compile warm-up (it took about 2 minutes of the 3.5-minute start
        on the 2-core VM; compiled steps are faster, see benchmarks/bench_vllm.py)."""
        self.folder, self.served = Path(folder), served
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.folder),
                     "--served-model-name", served, "--host", "127.0.0.1", "--port", str(self.port),
                     "--max-model-len", str(max_model_len), "--dtype", dtype, "--disable-uvicorn-access-log",
                     *(["--enforce-eager"] if eager else []), *extra]
        self.env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                        VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
        self.env.pop("VIRTUAL_ENV", None)
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.start_s: float | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "VLLMServer":
        t0 = time.perf_counter()
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=tempfile.gettempdir(), start_new_session=True)
        log.close()
        deadline = t0 + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # start one by hand: python tests/vllm_server.py FOLDER SERVED_NAME
    srv = VLLMServer(Path(sys.argv[1]), sys.argv[2]).start()
    print(f"{srv.url} up in {srv.start_s:.1f} s (log: {srv.log_path}); Ctrl-C stops it", flush=True)
    try:
        signal.pause()
    finally:
        srv.stop()
