"""Answer extraction and grading: GSM8K numbers, GPQA letters, free-form answers.

Everything here is plain string work on a model's output, so it is exact and
fast to test. Grading never raises on odd model output: an answer that cannot be
found is ``None`` and counts as wrong.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "extract_last_number",
    "gsm8k_reference",
    "numbers_equal",
    "extract_choice",
    "normalize_text",
    "grade",
    "answer_kind",
]

# A number as people and models write it: optional sign, optional currency,
# digits with optional thousands separators, optional decimals ("1,234.50",
# "-3", "$18", ".5"). A minus counts only when it does not follow a word or digit
# ("3-5" is a range, its last number is 5 and not -5). Commas are thousands
# separators only in groups of three ("1,2,3" is three numbers).
_NUMBER = re.compile(
    r"""
    (?<![\w.])                 # not glued to a word, digit or decimal point
    (?P<sign>[-\u2212])?       # ASCII hyphen-minus or the Unicode minus sign
    \$?\s?                     # optional currency sign ("-$5", "$ 5")
    (?P<num>
        \d{1,3}(?:,\d{3})+(?:\.\d+)?   # 1,234 / 1,234.5
      | \d+(?:\.\d+)?                  # 1234 / 12.5
      | \.\d+                          # .5
    )
    """,
    re.VERBOSE,
)
# "$-5" and "-$5" both mean minus five.
_DOLLAR_MINUS = re.compile(r"\$\s?[-\u2212](?=\d|\.\d)")


def _canonical(num: str, negative: bool) -> str:
    """'1,234.50' -> '1234.5'; '18.00' -> '18'; '.5' -> '0.5'; sign kept."""
    plain = num.replace(",", "")
    try:
        value = Decimal(plain)
    except InvalidOperation:  # pragma: no cover - the regex only admits numbers
        return plain
    if negative:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    text = format(value.normalize(), "f")
    return text


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` in canonical form, or None.

    Commas between digit groups are removed, a leading ``$`` is dropped, a
    trailing sentence period is not part of the number, negative and decimal
    numbers are kept (``"-2.50"`` -> ``"-2.5"``, ``"$1,000."`` -> ``"1000"``).
    """
    if not text:
        return None
    text = _DOLLAR_MINUS.sub("-", text)
    last = None
    for m in _NUMBER.finditer(text):
        last = m
    if last is None:
        return None
    return _canonical(last.group("num"), last.group("sign") is not None)


def gsm8k_reference(answer_field: str) -> str:
    """The reference answer of a GSM8K record: the number after ``####``."""
    _, sep, tail = answer_field.rpartition("####")
    if not sep:
        raise ValueError("GSM8K answer has no '####' marker")
    num = extract_last_number(tail.strip())
    if num is None:
        raise ValueError(f"GSM8K answer has no number after '####': {tail.strip()!r}")
    return num


def numbers_equal(pred: str | None, gold: str | None) -> bool:
    """Numeric equality of two canonical numbers (``'18'`` == ``'18.0'``)."""
    if pred is None or gold is None:
        return False
    try:
        return Decimal(pred.replace(",", "")) == Decimal(gold.replace(",", ""))
    except InvalidOperation:
        return pred.strip() == gold.strip()


# --- multiple choice --------------------------------------------------------

_L = "ABCD"
# Ordered by how explicit the statement is; within a pattern the LAST match wins
# (models often restate the options before concluding).
_CHOICE_PATTERNS = [
    # "Answer: (B)", "Final answer: **C**", "the answer is D", "correct answer is option (A)",
    # "answer is: B)", "Answer - C". The letter must be uppercase or wrapped in
    # brackets, so "the answer is a bit unclear" does not read as A.
    re.compile(
        r"answer\s*(?:is|would\s+be|:|-|=)?\s*(?:is\s*)?[:\-]?\s*(?:option\s*|choice\s*)?"
        r"[*_`]*\s*(?:\(([A-Da-d])\)|\[([A-Da-d])\]|([A-Da-d])\)|(?-i:([A-D]))(?![\w']))",
        re.IGNORECASE,
    ),
    # "**D**", "**(B)**", "\boxed{C}"
    re.compile(r"\*\*\s*\(?([A-D])\)?[.:]?\s*\*\*|\\boxed\{\s*\(?([A-D])\)?\s*\}"),
    # "(B)" on its own, "Option C", "choice D"
    re.compile(r"(?i:option|choice)\s+\(?([A-D])\)?(?![\w'])"),
    re.compile(r"\(([A-D])\)"),
    # a line that is only the letter ("C", "C.", "C)")
    re.compile(r"^\s*([A-D])\s*[.)]?\s*$", re.MULTILINE),
]


def extract_choice(text: str) -> str | None:
    """The chosen letter A-D in a model's output, or None.

    Understands ``"Answer: (B)"``, ``"the answer is C"``, ``"**D**"``,
    ``"\\boxed{A}"``, ``"Option B"``, ``"(C)"`` and a line holding only the
    letter; the most explicit form wins, and among equals the last one.
    """
    if not text:
        return None
    for pattern in _CHOICE_PATTERNS:
        found = None
        for m in pattern.finditer(text):
            letter = next((g for g in m.groups() if g), None)
            if letter:
                found = letter.upper()
        if found is not None:
            return found
    return None


# --- free-form answers (user JSONL) -----------------------------------------

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding punctuation and quotes."""
    return _WS.sub(" ", text).strip().strip(" .,;:!?\"'`*").lower()


def grade(kind: str, output: str, gold: str | None) -> tuple[str | None, bool | None]:
    """(extracted prediction, correct) for one output.

    ``kind``: ``"number"`` (last number, numeric equality), ``"choice"`` (letter
    A-D), ``"text"`` (the normalised reference occurs in the normalised output).
    ``correct`` is None when there is no reference to grade against.
    """
    if kind == "number":
        pred = extract_last_number(output)
        return pred, (None if gold is None else numbers_equal(pred, gold))
    if kind == "choice":
        pred = extract_choice(output)
        return pred, (None if gold is None else pred == gold.strip().strip("()").upper())
    if kind == "text":
        norm = normalize_text(output)
        if gold is None:
            return norm, None
        ref = normalize_text(gold)
        return norm, bool(ref) and ref in norm
    raise ValueError(f"unknown answer kind {kind!r}")


def answer_kind(gold: str) -> str:
    """How to grade a user reference answer: a number, a letter A-D, or text."""
    g = gold.strip()
    if re.fullmatch(r"[A-D]|\(?[A-Da-d]\)", g):
        return "choice"
    if re.fullmatch(r"[-\u2212]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?\.?", g) and any(c.isdigit() for c in g):
        return "number"
    return "text"
