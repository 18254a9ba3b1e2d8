"""Text hand-off between tokenizers.

Models exchange text, never token ids. A model's sequence is its prompt ids
followed by the encoding of each accepted segment, one segment at a time, so
every model can extend its KV cache without re-tokenizing what it already has.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from .errors import SpecEMError

# End-of-turn markers that chat models emit instead of (or besides) their EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")

# Stands in for the user's text when the chat template is rendered to find where
# the template's own text ends and the user's begins (private-use characters that
# no template adds or changes).
_USER_SLOT = "\ue000specem-user-text\ue001"

CHAT_ROLES = ("system", "user", "assistant")
_PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat(messages) -> str:
    """The documented rendering of a conversation for a model without a chat template:
    ``"System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nAssistant:"`` (one
    ``Role: content`` block per message, blank lines between, ending with the cue)."""
    return "".join(f"{_PLAIN_ROLE[role]}: {content}\n\n" for role, content in messages) + "Assistant:"


def refuse_remote_code(folder: Path) -> None:
    """Refuse a model folder that asks transformers to run Python code it ships.

    An ``auto_map`` in config.json or tokenizer_config.json names classes defined in
    the folder's own .py files; loading them would execute that code. We only use
    classes transformers itself ships, and we never ask on stdin.
    """
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable files are reported by the loaders with their own message
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            classes = ", ".join(sorted({str(v) for v in _flatten(auto_map)}))[:200]
            raise SpecEMError(
                f"{folder} wants to run its own Python code ({name} has an auto_map: {classes}); "
                "specem_fast never runs code from a model folder. Use a folder whose config and tokenizer "
                "are classes transformers ships (remove auto_map), or convert the model to such a folder"
            )


def _flatten(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value] if value else []


class TextCodec:
    """One model's tokenizer, chat template and stop tokens.

    Text that comes from outside the chat template (the user's prompt, segments
    written by other models) is always tokenized as text: a string such as
    ``<|im_end|>`` in it becomes ordinary tokens, never the control token, so
    it cannot close a turn or stop another model. Only the markers the chat
    template writes itself stay special.
    """

    def __init__(self, folder: Path, generation_eos: list[int] | None = None):
        from transformers import AutoTokenizer

        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise SpecEMError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); save the tokenizer with the model")
        refuse_remote_code(folder)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises many types here
            raise SpecEMError(f"cannot load the tokenizer in {folder}: {exc}") from None
        # transformers switches special-token splitting with a flag on the shared
        # backend tokenizer, so encodes must not interleave across threads.
        self._lock = threading.Lock()
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
        # Every added token the tokenizer would match as a unit when special tokens are not split.
        self._control_ids = frozenset(
            int(i) for i, t in getattr(self.tok, "added_tokens_decoder", {}).items() if getattr(t, "special", True)
        ) | self.special_ids

    def _encode(self, text: str, *, special: bool, as_text: bool) -> list[int]:
        with self._lock:
            return self.tok.encode(text, add_special_tokens=special, split_special_tokens=as_text)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as this model expects it: its chat template, or plain text after BOS.

        The user's text is tokenized as text (special-token strings split); the
        template's own markers are special tokens. A prompt without
        special-token strings gets exactly the ids of ``apply_chat_template`` +
        ``encode``.
        """
        if not self.has_template:
            return self._encode(prompt, special=True, as_text=True)
        before, user, after = self._render(prompt)
        text = before + user + after
        with self._lock:
            enc = self.tok(text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        lo, hi = len(before), len(before) + len(user)
        if not any(i in self._control_ids and s < hi and e > lo for i, (s, e) in zip(ids, spans)):
            return list(ids)  # no control token comes from the user's text
        return (
            self._encode(before, special=False, as_text=False)
            + self._encode(user, special=False, as_text=True)
            + self._encode(after, special=False, as_text=False)
        )

    def chat_ids(self, messages) -> list[int]:
        """A conversation (``(role, content)`` pairs) as this model expects it: its chat
        template with the assistant cue, or :func:`plain_chat` after BOS.

        As in :meth:`prompt_ids`, every message's content is tokenized as text;
        only the template's own markers are special tokens.
        """
        if not self.has_template:
            return self._encode(plain_chat(messages), special=True, as_text=True)
        pieces, contents = self._render_chat(messages)
        text = "".join(p + c for p, c in zip(pieces, contents + [""]))
        with self._lock:
            enc = self.tok(text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        user_spans, pos = [], 0
        for p, c in zip(pieces, contents):
            pos += len(p)
            user_spans.append((pos, pos + len(c)))
            pos += len(c)
        if not any(i in self._control_ids and s < hi and e > lo for i, (s, e) in zip(ids, spans)
                   for lo, hi in user_spans):
            return list(ids)
        out: list[int] = []
        for p, c in zip(pieces, contents + [""]):
            out += self._encode(p, special=False, as_text=False) if p else []
            out += self._encode(c, special=False, as_text=True) if c else []
        return out

    def _render_chat(self, messages) -> tuple[list[str], list[str]]:
        """The rendered conversation as template pieces around each message's content
        (as the template placed it, e.g. trimmed): pieces[0] c[0] pieces[1] ... pieces[n]."""

        def render(contents) -> str:
            return self.tok.apply_chat_template(
                [{"role": r, "content": c} for (r, _), c in zip(messages, contents)],
                tokenize=False, add_generation_prompt=True,
            )

        marks = [f"\ue000specem-message-{i}\ue001" for i in range(len(messages))]
        try:
            frame = render(marks)
            text = render([c for _, c in messages])
        except Exception as exc:  # jinja raises for conversations a template refuses
            raise SpecEMError(f"this model's chat template refuses the conversation: {exc}") from None
        pattern, rest = [], frame
        for m in marks:
            if rest.count(m) != 1:
                break
            before, rest = rest.split(m)
            pattern.append(before)
        else:
            pattern.append(rest)
            rx = "(.*?)".join(re.escape(p) for p in pattern)
            got = re.fullmatch(rx, text, flags=re.DOTALL)
            if got is not None:
                contents = list(got.groups())
                if all(g == c or g == c.strip() for g, (_, c) in zip(contents, messages)):
                    return pattern, contents
        raise SpecEMError(
            "this model's chat template does not place each message as one piece of text, so the messages "
            "cannot be kept apart from the template's control tokens; use a model folder with a plain chat template"
        )

    def _render(self, prompt: str) -> tuple[str, str, str]:
        """The rendered chat split into (template text before, user text, template text after)."""

        def render(content: str) -> str:
            return self.tok.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )

        frame = render(_USER_SLOT)
        text = render(prompt)
        if frame.count(_USER_SLOT) == 1:
            before, after = frame.split(_USER_SLOT)
            if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
                return before, text[len(before) : len(text) - len(after)], after
        raise SpecEMError(
            "this model's chat template does not place the prompt as one piece of text, so the prompt cannot "
            "be kept apart from the template's control tokens; use a model folder with a plain chat template"
        )

    def encode_segment(self, text: str) -> list[int]:
        """A segment's ids, as text: no special tokens added or recognised, no SentencePiece dummy prefix."""
        return self._encode(text, special=False, as_text=True)

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
