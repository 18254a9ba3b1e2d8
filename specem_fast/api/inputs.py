"""Prompts and conversations as callers give them, checked once where they enter."""

from __future__ import annotations

from specem_fast.config import check_text
from specem_fast.errors import SpecEMError
from specem_fast.model.text import CHAT_ROLES, plain_chat


def prompt_list(prompts: object) -> list[str]:
    """The prompts as a list of valid strings; anything else is a SpecEMError."""
    if isinstance(prompts, str):
        plist = [prompts]
    elif isinstance(prompts, (list, tuple)):
        plist = list(prompts)
    else:
        kind = type(prompts).__name__
        hint = "decode it to str first" if isinstance(prompts, (bytes, bytearray)) else \
            "give one prompt string or a list of prompt strings"
        raise SpecEMError(f"the prompt must be a string or a list of strings, not {kind}; {hint}")
    for i, p in enumerate(plist):
        what = "the prompt" if isinstance(prompts, str) else f"prompt {i}"
        if not isinstance(p, str):
            raise SpecEMError(f"{what} is {type(p).__name__}, not a string; give text")
        check_text(p, what)
        if not p.strip():
            raise SpecEMError(f"{'the prompt' if isinstance(prompts, str) else what} is empty; give some text to answer")
    return plist


class Chat(tuple):
    """One conversation: ``(role, content)`` pairs, checked."""

    @property
    def text(self) -> str:
        return plain_chat(self)


def parse_chat(messages: object, what: str) -> Chat:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SpecEMError(f"{what} must be a non-empty list of {{'role', 'content'}} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise SpecEMError(f"{what}[{i}] must be a dict with 'role' and 'content' (got {m!r:.80})")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise SpecEMError(f"{what}[{i}] has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise SpecEMError(f"{what}[{i}]'s content is {type(content).__name__}, not a string; give text")
        check_text(content, f"{what}[{i}]'s content")
        out.append((role, content))
    if not any(c.strip() for r, c in out if r == "user"):
        raise SpecEMError(f"{what} has no user message with text; give at least one")
    return Chat(out)


def parse_inputs(prompts: object, messages: object) -> tuple[list, bool]:
    """(prompt strings or Chats, whether one was given rather than a list)."""
    if messages is None:
        if prompts is None:
            raise SpecEMError("the prompt must be a string or a list of strings, not NoneType; give a prompt "
                              "or messages=[{'role': ..., 'content': ...}, ...]")
        return prompt_list(prompts), isinstance(prompts, str)
    if prompts is not None:
        raise SpecEMError("give either a prompt or messages, not both")
    if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, (list, tuple)) for m in messages):
        return [parse_chat(m, f"messages[{i}]") for i, m in enumerate(messages)], False
    return [parse_chat(messages, "messages")], True
