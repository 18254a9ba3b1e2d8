import os

import torch

# Triton kernels run through the interpreter on machines without a GPU; this
# must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from specem_fast.hub.fetch import is_ready, model_dir  # noqa: E402
from specem_fast.hub.registry import DEFAULT_MODELS  # noqa: E402

DEFAULT_NAMES = [m.name for m in DEFAULT_MODELS]


@pytest.fixture(autouse=True, scope="session")
def _float32_by_default():
    """The exactness tests compare float32 runs; a CPU with native bf16 would make
    bfloat16 the default dtype (tested on its own in test_hardening/test_engine)."""
    from specem_fast.model import runner as runtime

    real = runtime.cpu_has_native_bf16
    runtime.cpu_has_native_bf16 = lambda *a, **k: False
    yield
    runtime.cpu_has_native_bf16 = real


def require_default_models(*names: str) -> None:
    """Fail (not skip) when the default models are missing: CI fetches them first."""
    missing = [n for n in (names or DEFAULT_NAMES) if not is_ready(n)]
    if missing:
        pytest.fail(f"default models not fetched: {', '.join(missing)}; run `specem-fast models fetch`")


@pytest.fixture(scope="session")
def default_model_dirs():
    require_default_models()
    return {n: model_dir(n) for n in DEFAULT_NAMES}


@pytest.fixture(scope="session")
def real_ensemble(default_model_dirs):
    from specem_fast import Ensemble

    return Ensemble.from_pretrained(DEFAULT_NAMES, cache_tokens=2048, max_batch=4, preset="reference")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, default_model_dirs):
    """Tiny random models of every architecture, with the real tokenizers."""
    from tiny_models import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny")
    return {
        arch: make_tiny_model_dir(root, arch, tokenizer_from)
        for arch, tokenizer_from in (
            ("llama", "smollm2-135m-instruct"),
            ("qwen2", "qwen2.5-coder-0.5b-instruct"),
            ("gemma3_text", "gemma3-270m"),
            ("mistral", "smollm2-135m-instruct"),
        )
    }
