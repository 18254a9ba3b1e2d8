"""Text hand-off between tokenizers.

Models exchange text, never token ids. A model's sequence is its prompt ids
followed by the encoding of each accepted segment, one segment at a time, so
every model can extend its KV cache without re-tokenizing what it already has.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Sequence

from specem_fast.errors import CacheFullError, SpecEMError

# End-of-turn markers that chat models emit instead of (or besides) their EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")

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


# -- how many characters one token can stand for ----------------------------------
# Normalizers that never shrink the text, and the most characters canonical
# composition folds into one (U+1F87 is four code points in NFD).
_KEEPS_LENGTH = {"NFD", "NFKD", "Lowercase", "Prepend", "Append", "ByteLevel"}
_COMPOSES = {"NFC": 4, "NFKC": 4}
# Pre-tokenizers that split or map the text but never drop any of it.
_KEEPS_TEXT = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


def _normalizer_factor(node: dict | None) -> int | float | None:
    """How many input characters one normalized character can come from (None: unbounded,
    e.g. a normalizer that strips whitespace or accents, or drops characters)."""
    if node is None:
        return 1
    kind = node.get("type")
    if kind in _KEEPS_LENGTH:
        return 1
    if kind in _COMPOSES:
        return _COMPOSES[kind]
    if kind == "Replace":
        pattern, content = node.get("pattern", {}).get("String"), node.get("content", "")
        if pattern is None or not content:  # a regex, or a deletion
            return None
        return max(1.0, len(pattern) / len(content))
    if kind == "Sequence":
        factor: float = 1
        for sub in node.get("normalizers", []):
            f = _normalizer_factor(sub)
            if f is None:
                return None
            factor *= f
        return factor
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, ...: may drop characters


def _pretokenizer_keeps_text(node: dict | None) -> bool:
    if node is None:
        return True
    kind = node.get("type")
    if kind == "Sequence":
        return all(_pretokenizer_keeps_text(sub) for sub in node.get("pretokenizers", []))
    return kind in _KEEPS_TEXT and node.get("behavior") != "Removed"


def _model_has_bounded_tokens(node: dict) -> bool:
    """False for models where one token can stand for any amount of text: WordPiece and
    WordLevel turn a whole unknown word into one [UNK]; fused unknowns merge runs of them."""
    kind = node.get("type")
    if kind == "BPE":
        return not (node.get("unk_token") and node.get("fuse_unk") and not node.get("byte_fallback"))
    if kind == "Unigram":
        return bool(node.get("byte_fallback"))
    return False


def _rules(backend) -> dict:
    """The parts of a fast tokenizer's tokenizer.json that :func:`chars_per_token_bound`
    reads, taken from the loaded tokenizer (transformers may add a normalizer) without
    serializing its vocabulary."""

    def part(obj):
        return None if obj is None else json.loads(obj.__getstate__())

    model = backend.model
    return {"normalizer": part(backend.normalizer), "pre_tokenizer": part(backend.pre_tokenizer),
            "model": {"type": type(model).__name__,
                      **{k: getattr(model, k, None) for k in ("unk_token", "fuse_unk", "byte_fallback")}}}


def chars_per_token_bound(tokenizer_json: dict, longest_token: int) -> int | None:
    """The most input characters any one token of this tokenizer can stand for, or None
    when no bound holds (the tokenizer can drop text or fold any run of it into one token).

    ``longest_token`` is the length of the longest vocabulary string. A token's string is
    written in the normalized, pre-tokenized alphabet, where every input character is
    at least one character (byte-level BPE spells each byte as one; SentencePiece's
    byte fallback ``<0xE3>`` is longer than the byte), so one token covers at most
    ``longest_token`` normalized characters, each from at most ``factor`` input ones.
    """
    factor = _normalizer_factor(tokenizer_json.get("normalizer"))
    model = tokenizer_json.get("model") or {}
    if factor is None or not _pretokenizer_keeps_text(tokenizer_json.get("pre_tokenizer")) \
            or not _model_has_bounded_tokens(model):
        return None
    return int(math.ceil(longest_token * factor))


# -- chat templates -----------------------------------------------------------------
# Stands in for message i when a template is rendered to find its own text: private-use
# characters at the ends (no template writes them), and inside the characters a template
# that rewrites messages (case, spaces, escaping) would change, so such a template is found.
_MARK = "\ue000specem message {}: Aa 0 <&'\">\n\ue001"
# Whitespace no template writes: put around a message to see whether the template trims it.
_PAD = "\u2029\u3000"
_FRAMES_KEPT = 256  # rendered frames kept per codec (one per sequence of roles)
# Tokens a cut between two separately tokenized chunks may add (a cut at a whitespace
# run splits no pre-token), and that tokenizing a message apart from the template
# text around it may add at each end.
_CUT_SLACK = 8
_EDGE_SLACK = 2


def _trim(content: str, kept: tuple[bool, bool]) -> str:
    """The content as a template that keeps (left, right) whitespace writes it."""
    left, right = kept
    if left and right:
        return content
    if left:
        return content.rstrip()
    return content.lstrip() if right else content.strip()


def _chunks(text: str, first: int, blind_slack: int):
    """``text`` in chunks of about first, 2*first, 4*first ... characters, each cut at the
    start of a whitespace run near its end where there is one. Yields (chunk, slack):
    how many tokens the cut before the chunk may have added to the count."""
    pos, size, slack = 0, first, 0
    while pos < len(text):
        end = min(len(text), pos + size)
        cut_slack = 0
        if end < len(text):
            lo = max(pos + 1, end - 1024)
            cut = max(text.rfind(" ", lo, end), text.rfind("\n", lo, end))
            while cut > lo and text[cut - 1].isspace():
                cut -= 1
            end, cut_slack = (cut, _CUT_SLACK) if cut > pos else (end, blind_slack)
        yield text[pos:end], slack
        pos, size, slack = end, size * 2, cut_slack


class TextCodec:
    """One model's tokenizer, chat template and stop tokens.

    Text that comes from outside the chat template (the user's prompt, segments
    written by other models) is always tokenized as text: a string such as
    ``<|im_end|>`` in it becomes ordinary tokens, never the control token, so
    it cannot close a turn or stop another model. Only the markers the chat
    template writes itself stay special.

    ``prompt_ids`` and ``chat_ids`` take a token ``limit``: a prompt longer than
    that raises :class:`CacheFullError` before (for a long prompt: instead of)
    encoding all of it.
    """

    def __init__(self, folder: Path, eos_ids: list[int] | None = None):
        """``eos_ids``: the model's end-of-sequence ids beyond the tokenizer's (:func:`generation_eos`)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise SpecEMError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); save the tokenizer with the model")
        refuse_remote_code(folder)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises many types here
            raise SpecEMError(f"cannot load the tokenizer in {folder}: {exc}; re-save it there with "
                              "`AutoTokenizer.from_pretrained(...).save_pretrained(folder)`") from None
        self.folder, self.name = folder, folder.name
        # transformers switches special-token splitting with a flag on the shared
        # backend tokenizer, so encodes must not interleave across threads.
        self._lock = threading.Lock()
        self.has_template = bool(getattr(self.tok, "chat_template", None))
        stop = set(eos_ids or [])
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
        self._chars_per_token: int | None | bool = False  # False: not computed yet
        self._frames: dict[tuple[str, ...], tuple[list[str], list[tuple[bool, bool]]]] = {}

    @property
    def max_chars_per_token(self) -> int | None:
        """The most characters of input one token can stand for (computed once, on first
        use), or None when this tokenizer has no such bound (see :func:`chars_per_token_bound`)."""
        if self._chars_per_token is False:
            backend = getattr(self.tok, "backend_tokenizer", None)
            if backend is None:  # a slow (Python) tokenizer: nothing to read the rules from
                self._chars_per_token = None
            else:
                longest = max(map(len, self.tok.get_vocab()), default=1)
                self._chars_per_token = chars_per_token_bound(_rules(backend), longest)
        return self._chars_per_token  # type: ignore[return-value]

    def _encode(self, text: str, *, special: bool, as_text: bool) -> list[int]:
        with self._lock:
            return self.tok.encode(text, add_special_tokens=special, split_special_tokens=as_text)

    # -- prompt length ---------------------------------------------------------------
    def _too_long(self, what: str, size: str, limit: int, why: str = "") -> CacheFullError:
        return CacheFullError(
            f"{what} is {size}, over the {limit} tokens a prompt may take{why} (the KV-cache budget per request, "
            "cache_tokens, less the room one round needs); shorten the prompt or raise cache_tokens (--cache-tokens)")

    def refuse_too_long(self, texts: Sequence[str], limit: int, what: str = "the prompt") -> None:
        """Raise :class:`CacheFullError` when ``texts`` (tokenized as text, one after
        another) cannot fit in ``limit`` tokens; otherwise return. Cheap: a prompt with
        more characters than ``limit`` tokens can stand for is refused without
        tokenizing, a long one is tokenized in chunks only until its count is past the
        limit. A prompt this lets through may still be over the limit by its template
        tokens: the exact check follows its full encoding."""
        if limit < 1:
            raise CacheFullError(
                f"no prompt fits: the room one round needs takes the whole KV-cache budget per request ({limit} "
                "tokens left for a prompt); use a smaller window or raise cache_tokens (--cache-tokens)")
        chars, per = sum(len(t) for t in texts), self.max_chars_per_token
        if per is not None and chars > limit * per:
            raise self._too_long(what, f"{chars} characters", limit, f": {limit} tokens of {self.name} stand for "
                                                                      f"at most {limit * per} characters")
        if chars <= 4 * limit:  # cheaper to encode it all once than to count first
            return
        count, slack, blind = 0, 0, 2 * (per or 128)
        for text in texts:
            slack += 2 * _EDGE_SLACK
            for chunk, cut_slack in _chunks(text, 4 * limit, blind):
                count += len(self._encode(chunk, special=False, as_text=True))
                slack += cut_slack
                if count - slack > limit:
                    raise self._too_long(what, f"at least {count - slack} tokens for {self.name} (counting stopped "
                                               "there)", limit)

    def _check_count(self, ids: list[int], limit: int | None, what: str) -> list[int]:
        if limit is not None and len(ids) > limit:
            raise self._too_long(what, f"{len(ids)} tokens for {self.name}", limit)
        return ids

    # -- prompts and conversations ------------------------------------------------------
    def prompt_ids(self, prompt: str, limit: int | None = None) -> list[int]:
        """The prompt as this model expects it: its chat template, or plain text after BOS.

        The user's text is tokenized as text (special-token strings split); the
        template's own markers are special tokens. A prompt without
        special-token strings gets exactly the ids of ``apply_chat_template`` +
        ``encode``. With a ``limit``, a prompt of more than ``limit`` tokens raises
        :class:`CacheFullError` (see :meth:`refuse_too_long`).
        """
        if not self.has_template:
            if limit is not None:
                self.refuse_too_long([prompt], limit)
            return self._check_count(self._encode(prompt, special=True, as_text=True), limit, "the prompt")
        return self._templated_ids([("user", prompt)], limit, "the prompt")

    def chat_ids(self, messages, limit: int | None = None) -> list[int]:
        """A conversation (``(role, content)`` pairs) as this model expects it: its chat
        template with the assistant cue, or :func:`plain_chat` after BOS.

        As in :meth:`prompt_ids`, every message's content is tokenized as text and
        placed where the template puts a message, as one piece, whatever it looks
        like; only the template's own markers are special tokens. ``limit`` as there.
        """
        what = "the conversation"
        if not self.has_template:
            text = plain_chat(messages)
            if limit is not None:
                self.refuse_too_long([text], limit, what)
            return self._check_count(self._encode(text, special=True, as_text=True), limit, what)
        return self._templated_ids(list(messages), limit, what)

    def _templated_ids(self, messages: list, limit: int | None, what: str) -> list[int]:
        pieces, kept = self._chat_frame(tuple(r for r, _ in messages))
        contents = [_trim(c, k) for (_, c), k in zip(messages, kept)]
        if limit is not None:
            self.refuse_too_long(contents, limit, what)
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
            return self._check_count(list(ids), limit, what)  # no control token comes from a message
        out: list[int] = []
        for p, c in zip(pieces, contents + [""]):
            out += self._encode(p, special=False, as_text=False) if p else []
            out += self._encode(c, special=False, as_text=True) if c else []
        return self._check_count(out, limit, what)

    def _chat_frame(self, roles: tuple[str, ...]) -> tuple[list[str], list[tuple[bool, bool]]]:
        """The template's text around each message of a conversation with these roles
        (pieces[0] m0 pieces[1] ... pieces[n]), and for each message whether the template
        keeps whitespace at its (left, right) end. Rendered with stand-ins for the
        messages, never with their text, so nothing a message says moves the pieces."""
        if roles in self._frames:
            return self._frames[roles]
        marks = [_MARK.format(i) for i in range(len(roles))]
        frame = self._render(roles, marks)
        pieces, rest = [], frame
        for i, m in enumerate(marks):
            if rest.count(m) != 1:
                raise self._template_error(f"message {i + 1} of {len(roles)} ({roles[i]}) appears "
                                           f"{frame.count(m)} times in the rendered text, not once")
            before, rest = rest.split(m)
            pieces.append(before)
        pieces.append(rest)
        padded = self._render(roles, [_PAD + m + _PAD for m in marks])
        kept = []
        for m in marks:
            at = padded.find(m)
            kept.append((padded[max(0, at - len(_PAD)):at] == _PAD, padded[at + len(m):at + len(m) + len(_PAD)] == _PAD))
        if padded != "".join(p + _trim(_PAD + m + _PAD, k) for p, m, k in zip(pieces, marks, kept)) + pieces[-1]:
            raise self._template_error("it changes a message's text beyond trimming whitespace")
        if len(self._frames) >= _FRAMES_KEPT:
            self._frames.clear()
        self._frames[roles] = pieces, kept
        return pieces, kept

    def _render(self, roles: tuple[str, ...], contents: list[str]) -> str:
        try:
            return self.tok.apply_chat_template([{"role": r, "content": c} for r, c in zip(roles, contents)],
                                                tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises for conversations a template refuses
            raise SpecEMError(f"the chat template of {self.name} refuses a conversation with the roles "
                              f"{', '.join(roles)}: {exc}") from None

    def _template_error(self, why: str) -> SpecEMError:
        return SpecEMError(
            f"the chat template of {self.name} ({self.folder}) cannot be split into its own text and the "
            f"messages: {why}. This is a property of that template, not of the messages; use a model folder whose "
            "chat template inserts each message's content once, as it is (tokenizer_config.json or "
            "chat_template.jinja)")

    def encode_segment(self, text: str) -> list[int]:
        """A segment's ids, as text: no special tokens added or recognised, no SentencePiece dummy prefix."""
        return self._encode(text, special=False, as_text=True)

    def decodes_on(self, ids: list[int], new: list[int], text: str) -> bool:
        """Whether ``new`` decodes to ``text`` after the sequence ``ids`` too, so an answer
        kept as a member's exact ids stays the decode of those ids (a character split
        across the boundary, or a decoder that drops a leading space, would not)."""

        def raw(x: list[int]) -> str:
            return self.tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        tail = ids[-8:]
        joined = raw(tail + new)
        return bool(text) and not joined.endswith("\ufffd") and joined == raw(tail) + text

    def draft_segment(self, held: Sequence[int], tokens: Sequence[int], stopped: bool, *, exact: bool = False,
                      alone: bool = False) -> tuple[str, list[int]]:
        """What a draft of ``tokens`` sampled after the sequence ``held`` offers the round: its
        text and that text in this model's tokens.

        ``exact`` (the single-model baseline), or ``alone`` (the only drafter, so no other
        tokenizer has to start on this boundary) when the ids decode onto the sequence
        cleanly: the exact ids sampled, as if the model decoded alone. Otherwise the text
        is cut back to a word boundary (unless the draft stopped) and re-encoded.
        """
        tokens = list(tokens)
        text = self.decode(tokens)
        if exact or (alone and tokens and self.decodes_on(list(held), tokens, text)):
            return text, tokens
        text = text if stopped else trim_to_word_boundary(text)
        return text, self.encode_segment(text) if text else []

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # A draft may stop inside a multi-byte character; drop the dangling bytes.
        return text.rstrip("\ufffd")


def generation_eos(folder: Path, config: dict | None = None) -> list[int]:
    """The model's end-of-sequence ids: ``eos_token_id`` of config.json (``config``, when
    already read) and of generation_config.json; a file missing or unreadable gives none."""
    sources = [config] if config is not None else []
    for f in (["config.json"] if config is None else []) + ["generation_config.json"]:
        try:
            sources.append(json.loads((Path(folder) / f).read_text()))
        except (OSError, ValueError):
            continue
    ids: list[int] = []
    for src in sources:
        eos = src.get("eos_token_id") if isinstance(src, dict) else None
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, list):
            ids += [e for e in eos if isinstance(e, int)]
    return ids


def trim_to_word_boundary(text: str) -> str:
    """Cut a draft that ends inside a word back to its last space.

    Keeps the next round starting on a word boundary for every tokenizer. A
    draft without a space is kept whole.
    """
    if not text or not text[-1].isalnum():
        return text
    cut = text.rfind(" ")
    return text[:cut] if cut > 0 else text


class StopPrefixes:
    """How much of a growing answer to hold back while streaming with stop strings.

    :meth:`hold` gives the length of the longest end of the text that is the start
    of a stop string: only that part can still turn out to be where the answer is
    cut, so everything before it can be released. A stop string longer than a
    segment therefore holds back only the text that matches its beginning, never
    the whole stream. Each stop string runs a KMP automaton over the characters
    fed so far, so a request costs time linear in its answer.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._fail: list[list[int]] = [[0] for _ in self.stops]  # KMP failure function, grown on demand
        self._state = [0] * len(self.stops)
        self._text = ""

    def _failure(self, i: int, k: int) -> int:
        """The KMP failure value of stop ``i``'s first ``k + 1`` characters."""
        s, fail = self.stops[i], self._fail[i]
        while len(fail) <= k:
            j, q = len(fail), fail[-1]
            while q and s[q] != s[j]:
                q = fail[q - 1]
            fail.append(q + 1 if s[q] == s[j] else 0)
        return fail[k]

    def _step(self, i: int, q: int, ch: str) -> int:
        s = self.stops[i]
        while q and (q == len(s) or s[q] != ch):
            q = self._failure(i, q - 1)
        return q + 1 if s[q] == ch else q

    def hold(self, text: str) -> int:
        """Characters at the end of ``text`` (the answer so far) that may start a stop string."""
        if not text.startswith(self._text):  # the answer was rewritten: start over
            self._state, self._text = [0] * len(self.stops), ""
        new = text[len(self._text):]
        for i in range(len(self.stops)):
            q = self._state[i]
            for ch in new:
                q = self._step(i, q, ch)
            self._state[i] = q
        self._text = text
        return max(self._state, default=0)
