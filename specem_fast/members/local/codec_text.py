"""The text side of a member whose runner holds a :class:`~specem_fast.model.text.TextCodec`
(our runtime and the transformers backend alike), so both hand text off the same way."""

from __future__ import annotations

from typing import Sequence


class CodecText:
    runner: object  # anything with a ``codec``

    def prompt_ids(self, prompt, limit: int | None = None) -> list[int]:
        """A prompt string or a chat (``(role, content)`` pairs); over ``limit`` tokens is a
        CacheFullError, found before the whole prompt is encoded."""
        codec = self.runner.codec
        return codec.prompt_ids(prompt, limit) if isinstance(prompt, str) else codec.chat_ids(prompt, limit)

    def encode(self, text: str) -> list[int]:
        return self.runner.codec.encode_segment(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.runner.codec.decode(list(ids))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share (a draft's ids kept as sampled)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
