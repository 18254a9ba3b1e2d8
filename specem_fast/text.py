"""Text hand-off between tokenizers.

Models exchange text, never token ids. A model's sequence is its prompt ids
followed by the encoding of each accepted segment, one segment at a time, so
every model can extend its KV cache without re-tokenizing what it already has.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SpecEMError

# End-of-turn markers that chat models emit instead of (or besides) their EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")


class TextCodec:
    """One model's tokenizer, chat template and stop tokens."""

    def __init__(self, folder: Path, generation_eos: list[int] | None = None):
        from transformers import AutoTokenizer

        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise SpecEMError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); save the tokenizer with the model")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many types here
            raise SpecEMError(f"cannot load the tokenizer in {folder}: {exc}") from None
        self.has_template = bool(getattr(self.tok, "chat_template", None))
        stop = set(generation_eos or [])
        if self.tok.eos_token_id is not None:
            stop.add(int(self.tok.eos_token_id))
        vocab = self.tok.get_vocab()
        for marker in _END_OF_TURN:
            if marker in vocab:
                stop.add(int(vocab[marker]))
        self.stop_ids = frozenset(stop)
        self.special_ids = frozenset(self.tok.all_special_ids)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as this model expects it: its chat template, or plain text after BOS."""
        if self.has_template:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.tok.encode(text, add_special_tokens=False)
        return self.tok.encode(prompt, add_special_tokens=True)

    def encode_segment(self, text: str) -> list[int]:
        """A segment's ids: no special tokens, no SentencePiece dummy prefix."""
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # A draft may stop inside a multi-byte character; drop the dangling bytes.
        return text.rstrip("\ufffd")


def trim_to_word_boundary(text: str) -> str:
    """Cut a draft that ends inside a word back to its last space.

    Keeps the next round starting on a word boundary for every tokenizer. A
    draft without a space is kept whole.
    """
    if not text or not text[-1].isalnum():
        return text
    cut = text.rfind(" ")
    return text[:cut] if cut > 0 else text
