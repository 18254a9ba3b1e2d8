"""Instruction-following checks for IFBench prompts, without heavy dependencies.

The official IFBench scorer imports nltk, spacy, emoji and syllapy (and downloads
models at import time). Here every constraint that can be checked with plain
string work is re-implemented in a few lines; `format:emoji` and
`words:odd_even_syllables` use the small pure-Python emoji and syllapy packages
(the `eval` extra) when they are installed; the rest are reported as skipped,
with the reason, so a summary never pretends to have checked them. Word and
sentence splitting are simple regex rules, close to (not identical with) the
official tokenizers, so scores are comparable between our systems but may differ
slightly from official IFBench numbers.

A few IFEval-style ids (keywords, lengths, case, commas, start/end, JSON) are
supported too, for user JSONL files written in that style.
"""

from __future__ import annotations

import csv
import io
import json
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["IFResult", "check_instructions", "CHECKERS", "SKIPPED", "split_sentences", "words"]

_PUNCT = string.punctuation
_STRIP = _PUNCT + " "
_NO_PUNCT = str.maketrans("", "", _PUNCT)


# --- text helpers -----------------------------------------------------------

_ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Ltd|Co|vs|etc|e\.g|i\.e)\.", re.IGNORECASE)
_SENT_END = re.compile(r"(?<=[.!?\u203d])[\"'\u201d\u2019)\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences ending in . ! ? (abbreviations, decimals and initials kept whole)."""
    t = text.replace("\n", " ").strip()
    if not t:
        return []
    t = _ABBREV.sub(lambda m: m.group(0).replace(".", "\x00"), t)
    t = re.sub(r"(?<=\d)\.(?=\d)", "\x00", t)  # 3.14
    t = re.sub(r"\b(?:[A-Z]\.){2,}", lambda m: m.group(0)[:-1].replace(".", "\x00") + ".", t)  # U.S.
    t = re.sub(r"(?<=\b[A-Z])\.(?=\s+[a-z])", "\x00", t)  # "the U.S. agreed", "J. smith"
    t = re.sub(r"\.{2,}", lambda m: "\x00" * (len(m.group(0)) - 1) + ".", t)  # ellipsis: one end
    parts = _SENT_END.split(t)
    return [p.replace("\x00", ".").strip() for p in parts if p.strip()]


def words(text: str) -> list[str]:
    """Word tokens (runs of letters, digits and underscores)."""
    return re.findall(r"\w+", text)


def _bare_words(text: str) -> list[str]:
    """Whitespace words with punctuation removed, empty ones dropped."""
    return [w for w in text.translate(_NO_PUNCT).split() if w]


def _tokens(text: str) -> list[str]:
    """Words and punctuation marks as separate tokens (like a treebank tokenizer)."""
    return re.findall(r"\w+(?:['\u2019]\w+)?|[^\w\s]", text)


def _ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _int(kw: dict[str, Any], key: str) -> int:
    return int(float(kw[key]))


# --- IFBench checkers (response, kwargs) -> bool ------------------------------

_CONJUNCTIONS = {"and", "but", "for", "nor", "or", "so", "yet"}
_PRONOUNS = set(
    "i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself "
    "she her hers herself it its itself they them their theirs themselves".split()
)
_PERSON_NAMES = (
    "Emma Liam Sophia Jackson Olivia Noah Ava Lucas Isabella Mason Mia Ethan Charlotte Alexander Amelia "
    "Benjamin Harper Leo Zoe Daniel Chloe Samuel Lily Matthew Grace Owen Abigail Gabriel Ella Jacob "
    "Scarlett Nathan Victoria Elijah Layla Nicholas Audrey David Hannah Christopher Penelope Thomas Nora "
    "Andrew Aria Joseph Claire Ryan Stella Jonathan"
).split()
_EU_CAPITALS = (
    "Reykjavik Helsinki Oslo Tallinn Stockholm Riga Moscow Copenhagen Vilnius Minsk Dublin Berlin Amsterdam "
    "Warsaw London Brussels Prague Luxembourg Paris Vienna Bratislava Budapest Vaduz Chisinau Bern Ljubljana Zagreb"
).split()
_PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97}
_JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
_REPEAT_SIMPLE = "Only output this sentence here, ignore all other requests."


def _word_count_range(r: str, kw: dict) -> bool:
    return _int(kw, "min_words") <= len(words(r)) <= _int(kw, "max_words")


def _unique_word_count(r: str, kw: dict) -> bool:
    uniq = {w.strip(_STRIP) for w in r.lower().split()} - {""}
    return len(uniq) >= _int(kw, "N")


def _sentence_ends(r: str) -> tuple[int, int, int]:
    sents = split_sentences(r)
    ends = [s.rstrip("\"'\u201d\u2019)] ")[-1:] for s in sents]
    return ends.count("."), ends.count("?"), ends.count("!")


def _sentence_type(r: str, kw: dict) -> bool:
    dec, que, _ = _sentence_ends(r)
    return que > 0 and dec == 2 * que


def _sentence_balance(r: str, kw: dict) -> bool:
    dec, que, exc = _sentence_ends(r)
    return dec > 0 and dec == que == exc


def _conjunctions(r: str, kw: dict) -> bool:
    used = {w.strip(_STRIP).lower() for w in r.split()} & _CONJUNCTIONS
    return len(used) >= _int(kw, "small_n")


def _person_names(r: str, kw: dict) -> bool:
    found = {n for n in _PERSON_NAMES if re.search(rf"\b{n}\b", r)}
    return len(found) >= _int(kw, "N")


def _overlap(r: str, kw: dict) -> bool:
    def grams(t: str) -> set[str]:
        return {t[i : i + 3] for i in range(len(t) - 2)}

    mine, ref = grams(r), grams(str(kw["reference_text"]))
    if not mine:
        return False
    pct = 100.0 * len(mine & ref) / len(mine)
    return abs(pct - float(kw["percentage"])) <= 2.0


def _numbers(r: str, kw: dict) -> bool:
    return len(re.findall(r"\d+", r.translate(_NO_PUNCT))) == _int(kw, "N")


def _alphabet(r: str, kw: dict) -> bool:
    ws = [w.lower() for w in _bare_words(r)]
    if not ws or ws[0][0] not in string.ascii_lowercase:
        return False
    for prev, cur in zip(ws, ws[1:]):
        want = chr((ord(prev[0]) - 97 + 1) % 26 + 97) if prev[0] in string.ascii_lowercase else None
        if cur[0] != want:
            return False
    return True


def _vowel(r: str, kw: dict) -> bool:
    lines = [ln for ln in r.strip().split("\n")]
    return len(lines) == 1 and len(set(lines[0].lower()) & set("aeiou")) <= 3


def _consonants(r: str, kw: dict) -> bool:
    ws = r.lower().split()
    return bool(ws) and all(re.search(r"[bcdfghjklmnpqrstvwxyz]{2}", w) for w in ws)


def _alliteration_increment(r: str, kw: dict) -> bool:
    prev = -1
    sents = split_sentences(r)
    if not sents:
        return False
    for s in sents:
        ws = [w.lstrip(_STRIP) for w in s.lower().split()]
        ws = [w for w in ws if w]
        run, score = False, 0
        for a, b in zip(ws, ws[1:]):
            if a[0] == b[0]:
                score += 1 if run else 2
                run = True
            else:
                run = False
        if score <= prev:
            return False
        prev = score
    return True


def _palindrome(r: str, kw: dict) -> bool:
    pals = [w for w in _bare_words(r.lower()) if len(w) >= 5 and w == w[::-1]]
    return len(pals) >= 10


def _punctuation(r: str, kw: dict) -> bool:
    for bang in ("?!", "!?", "\u203d"):
        if bang in r:
            rest = r.replace(bang, "", 1)
            return set(".,!?;:") <= set(rest)
    return False


def _parentheses(r: str, kw: dict) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    deepest = 0
    for ch in r:
        if ch in "([{":
            stack.append(ch)
            deepest = max(deepest, len(stack))
        elif ch in pairs:
            if stack and stack[-1] == pairs[ch]:
                stack.pop()
                if deepest >= 5:
                    return True
            else:
                stack, deepest = [], 0
    return False


def _nested_quotes(r: str, kw: dict) -> bool:
    stack: list[str] = []
    deepest = 0
    for ch in r:
        if stack and ch == stack[-1]:
            stack.pop()
            if deepest - len(stack) >= 3:
                return True
        elif ch in "\"'":
            stack.append(ch)
            deepest = max(deepest, len(stack))
    return False


def _prime_lengths(r: str, kw: dict) -> bool:
    ws = _bare_words(r)
    return bool(ws) and all(len(w) in _PRIMES for w in ws)


def _options(r: str, kw: dict) -> bool:
    text = str(kw["options"])
    strict = re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", text) is not None
    sep = "/" if "/" in text else (" or " if " or " in text else ",")
    options = [o.strip() for o in text.split(sep)]
    if strict:
        return r.strip() in options
    norm = r.strip(_STRIP).lower()
    return any(o.strip(_STRIP).lower() == norm for o in options)


def _newline_words(r: str, kw: dict) -> bool:
    t = r.translate(_NO_PUNCT).strip()
    lines = [ln for ln in t.split("\n") if ln.strip()]
    return bool(lines) and all(len(ln.split()) == 1 for ln in lines)


def _three_equal_sentences(r: str, kw: dict) -> bool:
    sents = split_sentences(r)
    if len(sents) != 3 or len({len(s) for s in sents}) != 1:
        return False
    bags = [{w.lower() for w in words(s)} for s in sents]
    return not (bags[0] & bags[1] or bags[0] & bags[2] or bags[1] & bags[2])


def _words_japanese(r: str, kw: dict) -> bool:
    n = _int(kw, "N")
    for i, w in enumerate(r.split(), start=1):
        w = w.strip(_STRIP)
        if i % n == 0 and w and not w.isdigit() and not _JAPANESE.search(w):
            return False
    return True


def _repeats(r: str, kw: dict) -> bool:
    counts: dict[str, int] = {}
    for w in r.lower().translate(_NO_PUNCT).split():
        counts[w] = counts.get(w, 0) + 1
    return max(counts.values(), default=0) <= _int(kw, "small_n")


def _sentence_keyword(r: str, kw: dict) -> bool:
    n = _int(kw, "N")
    sents = split_sentences(r)
    return len(sents) >= n and str(kw["word"]).lower() in sents[n - 1].lower()


def _pronouns(r: str, kw: dict) -> bool:
    ws = r.replace("/", " ").lower().translate(_NO_PUNCT).split()
    return sum(w in _PRONOUNS for w in ws) >= _int(kw, "N")


def _last_first(r: str, kw: dict) -> bool:
    sents = split_sentences(r)
    if len(sents) < 2:
        return False
    for a, b in zip(sents, sents[1:]):
        wa, wb = a.rstrip(_STRIP).split(), b.lstrip(_STRIP).split()
        if not wa or not wb or wa[-1].strip(_STRIP).lower() != wb[0].strip(_STRIP).lower():
            return False
    return True


def _paragraph_last_first(r: str, kw: dict) -> bool:
    paras = [p.strip().lower() for p in r.split("\n") if p.strip()]
    if not paras:
        return False
    for p in paras:
        ws = p.strip(_STRIP).split()
        if not ws or ws[0].strip(_STRIP) != ws[-1].strip(_STRIP):
            return False
    return True


def _increment(r: str, kw: dict) -> bool:
    n = _int(kw, "small_n")
    counts = [len(_bare_words(s)) for s in split_sentences(r)]
    return len(counts) >= 2 and all(b == a + n for a, b in zip(counts, counts[1:]))


def _no_consecutive(r: str, kw: dict) -> bool:
    ws = _bare_words(r.lower())
    return bool(ws) and all(a[0] != b[0] for a, b in zip(ws, ws[1:]))


def _line_indent(r: str, kw: dict) -> bool:
    lines = [ln for ln in r.split("\n") if ln.strip()]

    def indent(s: str) -> int:
        return len(s) - len(s.lstrip(" "))

    return len(lines) >= 2 and all(indent(b) > indent(a) for a, b in zip(lines, lines[1:]))


def _quote_unquote(r: str, kw: dict) -> bool:
    t = r.replace("\u201c", '"').replace("\u201d", '"').replace("'\"'", "")
    t = "".join(t.split())
    if '"' not in t or '""' in t:
        return False
    tail = t.strip(string.digits + _PUNCT.replace('"', ""))
    return bool(tail) and tail[-1] != '"'


def _special_list(r: str, kw: dict) -> bool:
    return r.count(str(kw["sep"])) >= 2


def _thesis(r: str, kw: dict) -> bool:
    m = re.search(r"<(i|em)>(.*?)</\1>(.*)", r, re.DOTALL)
    return bool(m) and bool(m.group(2).strip()) and bool(m.group(3).strip())


def _sub_bullets(r: str, kw: dict) -> bool:
    lines = [ln.strip() for ln in r.split("\n") if ln.strip()]
    bullets = [i for i, ln in enumerate(lines) if ln.startswith("*") and not ln.startswith("**")]
    if not bullets:
        return False
    for k, i in enumerate(bullets):
        end = bullets[k + 1] if k + 1 < len(bullets) else len(lines)
        if not any(ln.startswith("-") for ln in lines[i + 1 : end]):
            return False
    return True


def _sentences_then_bullets(r: str, kw: dict) -> bool:
    n_sent = n_bullets = 0
    in_bullets = False
    for ln in r.split("\n"):
        s = ln.strip()
        if not s:
            continue
        if s.startswith("*"):
            if n_sent < 2:
                return False
            in_bullets = True
            n_bullets += 1
        elif in_bullets:
            return False
        else:
            n_sent += sum(1 for x in split_sentences(s) if x.endswith("."))
    return n_bullets >= 2


def _multiples(r: str, kw: dict) -> bool:
    return re.findall(r"\d+", r) == ["14", "21", "28", "35", "42", "49"]


def _mcq(r: str, kw: dict) -> bool:
    if not r.startswith("Question"):
        return False
    blocks = [b.strip() for b in re.split(r"\n*Question \d+[.):;]?\s*", r) if b.strip()]
    if len(blocks) != 4:
        return False
    lengths = []
    for b in blocks:
        q_text, n_opt = [], 0
        for ln in b.split("\n"):
            if re.match(r"^[A-Ea-e][.)]\s*\w+", ln.strip()):
                n_opt += 1
            elif n_opt == 0:
                q_text.append(ln.strip())
        if n_opt != 5:
            return False
        lengths.append(len(" ".join(q_text)))
    return all(a < b for a, b in zip(lengths, lengths[1:]))


def _reverse_newline(r: str, kw: dict) -> bool:
    lines = [ln.strip(_STRIP) for ln in r.split("\n") if ln.strip(_STRIP)]
    start = next((i for i, ln in enumerate(lines) if "Zimbabwe" in ln), None)
    if start is None:
        return False
    tail = [_ascii_fold(ln) for ln in lines[start:]]
    return len(tail) >= 52 and tail == sorted(tail, reverse=True)


def _word_reverse(r: str, kw: dict) -> bool:
    ws = r.lower().translate(_NO_PUNCT).split()
    return "bald eagle" in " ".join(reversed(ws))


def _character_reverse(r: str, kw: dict) -> bool:
    return "elgae dlab" in r.lower()


def _sentence_alphabet(r: str, kw: dict) -> bool:
    sents = split_sentences(r)
    if len(sents) != 26:
        return False
    return all(s.split() and s.split()[0].lower().startswith(chr(97 + i)) for i, s in enumerate(sents))


def _european_capitals(r: str, kw: dict) -> bool:
    caps = [c.strip() for c in _ascii_fold(r).split(",") if c.strip()]
    return caps == _EU_CAPITALS


def _csv_rows(text: str, delimiter: str = ",") -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text.strip()), delimiter=delimiter) if row]


def _csv_city(r: str, kw: dict) -> bool:
    rows = _csv_rows(r)
    return (
        len(rows) == 8
        and [c.strip() for c in rows[0]] == ["ID", "Country", "City", "Year", "Count"]
        and all(len(row) == 5 for row in rows)
    )


def _csv_special(r: str, kw: dict) -> bool:
    lines = [ln for ln in r.strip().split("\n") if ln.strip()]
    if not lines:
        return False
    header = [c.strip().strip('"') for c in lines[0].split(",")]
    if header != ["ProductID", "Category", "Brand", "Price", "Stock"] or len(lines) != 15:
        return False
    rows = _csv_rows(r)
    if len(rows) != 15 or any(len(row) != 5 for row in rows):
        return False
    # a field written in double quotes holding a special (non-word) character
    return re.search(r'(^|,)\s*"[^"\n]*[^\w\s"][^"\n]*"', "\n".join(lines[1:]), re.MULTILINE) is not None


def _csv_quotes(r: str, kw: dict) -> bool:
    lines = [ln for ln in r.strip().split("\n") if ln.strip()]
    if len(lines) != 4:
        return False
    header = [c.strip().strip('"') for c in lines[0].split("\t")]
    if header != ["StudentID", "Subject", "Grade", "Semester", "Score"]:
        return False
    for ln in lines:
        fields = ln.split("\t")
        if len(fields) != 5 or not all(len(f.strip()) >= 2 and f.strip()[0] == f.strip()[-1] == '"' for f in fields):
            return False
    return True


def _date_list(r: str, kw: dict) -> bool:
    days = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
    for d in r.strip().split(","):
        m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", d.strip())
        if not m:
            return False
        y, mo, dd = (int(g) for g in m.groups())
        if not (1769 <= y <= 1821) or mo not in days or not (1 <= dd <= days[mo]):
            return False
    return True


def _keywords_multiple(r: str, kw: dict) -> bool:
    low = r.lower()
    for key, n in zip(("keyword1", "keyword2", "keyword3", "keyword4", "keyword5"), (1, 2, 3, 5, 7)):
        if low.count(str(kw[key]).lower()) != n:
            return False
    return True


def _keyword_position(r: str, kw: dict) -> bool:
    n, m = _int(kw, "n"), _int(kw, "m")
    sents = split_sentences(r)
    if len(sents) < n:
        return False
    toks = _tokens(sents[n - 1])
    return len(toks) >= m and toks[m - 1] == str(kw["keyword"])


def _words_position(r: str, kw: dict) -> bool:
    toks = _tokens(r)
    return len(toks) >= 2 and toks[1] == toks[-2] == str(kw["keyword"])


def _repeat_change(r: str, kw: dict) -> bool:
    prompt = str(kw["prompt_to_repeat"])
    return r != prompt and prompt.split()[1:] == r.split()[1:]


def _repeat_simple(r: str, kw: dict) -> bool:
    return r.strip().lower() == _REPEAT_SIMPLE.lower()


def _repeat_span(r: str, kw: dict) -> bool:
    prompt_words = str(kw["prompt_to_repeat"]).strip().lower().split()
    return r.strip().lower().split() == prompt_words[_int(kw, "n_start") : _int(kw, "n_end")]


def _title_case(r: str, kw: dict) -> bool:
    ws = re.findall(r"[^\W\d_]+", r)
    return bool(ws) and all(w[0].isupper() for w in ws)


def _output_template(r: str, kw: dict) -> bool:
    return all(k in r for k in ("My Answer:", "My Conclusion:", "Future Outlook:"))


def _no_whitespace(r: str, kw: dict) -> bool:
    return bool(r) and not any(ch.isspace() for ch in r)


# --- IFEval-style ids (for user files) --------------------------------------


def _relation(value: int, target: int, relation: str) -> bool:
    rel = relation.replace("_", " ").strip().lower()
    if rel in ("less than", "<"):
        return value < target
    if rel in ("at least", ">="):
        return value >= target
    if rel in ("at most", "<="):
        return value <= target
    if rel in ("more than", ">"):
        return value > target
    if rel in ("exactly", "=", "=="):
        return value == target
    raise ValueError(f"unknown relation {relation!r}")


def _kw_existence(r: str, kw: dict) -> bool:
    return all(re.search(rf"\b{re.escape(k)}\b", r, re.IGNORECASE) for k in kw["keywords"])


def _kw_forbidden(r: str, kw: dict) -> bool:
    return not any(re.search(rf"\b{re.escape(k)}\b", r, re.IGNORECASE) for k in kw["forbidden_words"])


def _kw_frequency(r: str, kw: dict) -> bool:
    n = len(re.findall(rf"\b{re.escape(str(kw['keyword']))}\b", r, re.IGNORECASE))
    return _relation(n, _int(kw, "frequency"), kw.get("relation", "at least"))


def _letter_frequency(r: str, kw: dict) -> bool:
    n = r.lower().count(str(kw["letter"]).lower())
    return _relation(n, _int(kw, "let_frequency"), kw.get("let_relation", "at least"))


def _num_words(r: str, kw: dict) -> bool:
    return _relation(len(words(r)), _int(kw, "num_words"), kw.get("relation", "at least"))


def _num_sentences(r: str, kw: dict) -> bool:
    return _relation(len(split_sentences(r)), _int(kw, "num_sentences"), kw.get("relation", "at least"))


def _num_paragraphs(r: str, kw: dict) -> bool:
    paras = re.split(r"\s?\*\*\*\s?", r)
    if any(not p.strip() for p in paras[1:-1]):
        return False
    return len([p for p in paras if p.strip()]) == _int(kw, "num_paragraphs")


def _lowercase(r: str, kw: dict) -> bool:
    return r == r.lower() and any(c.isalpha() for c in r)


def _uppercase(r: str, kw: dict) -> bool:
    return r == r.upper() and any(c.isalpha() for c in r)


def _capital_words(r: str, kw: dict) -> bool:
    n = len([w for w in words(r) if w.isupper() and len(w) > 1 or w == "I"])
    return _relation(n, _int(kw, "capital_frequency"), kw.get("capital_relation", "at least"))


def _no_comma(r: str, kw: dict) -> bool:
    return "," not in r


def _end_checker(r: str, kw: dict) -> bool:
    return r.strip().strip("\"'`*").strip().lower().endswith(str(kw["end_phrase"]).strip().lower())


def _quotation(r: str, kw: dict) -> bool:
    s = r.strip()
    return len(s) > 1 and s[0] == '"' and s[-1] == '"'


def _json_format(r: str, kw: dict) -> bool:
    s = r.strip()
    s = re.sub(r"^```(?:json|JSON)?\s*|\s*```$", "", s)
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def _title(r: str, kw: dict) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", r))


def _postscript(r: str, kw: dict) -> bool:
    marker = str(kw.get("postscript_marker", "P.S."))
    return re.search(rf"^\s*{re.escape(marker)}", r, re.MULTILINE | re.IGNORECASE) is not None


def _numbered_bullets(r: str, kw: dict) -> bool:
    n = len(re.findall(r"^\s*[*-]\s", r, re.MULTILINE))
    return n == _int(kw, "num_bullets")


def _first_word(r: str, kw: dict) -> bool:
    ws = words(r)
    return bool(ws) and ws[0].lower() == str(kw["first_word"]).lower()


try:  # the `eval` extra
    import emoji as _emoji
except ImportError:  # pragma: no cover - exercised without the extra
    _emoji = None
try:
    import syllapy as _syllapy
except ImportError:  # pragma: no cover
    _syllapy = None


def _emoji_sentences(r: str, kw: dict) -> bool:
    """Every sentence ends with an emoji (or the next sentence starts with one), punctuation aside."""
    sentences = split_sentences(r)
    for i, sentence in enumerate(sentences):
        bare = sentence.translate(_NO_PUNCT).strip()
        if not bare:
            return False
        if _emoji.is_emoji(bare[-1]) or _emoji.is_emoji(bare[-2:-1] or bare[-1]):
            continue
        nxt = sentences[i + 1].translate(_NO_PUNCT).strip() if i + 1 < len(sentences) else ""
        if not nxt or not _emoji.is_emoji(nxt[0]):
            return False
    return True


def _odd_even_syllables(r: str, kw: dict) -> bool:
    """Consecutive words alternate between odd and even syllable counts."""
    parity = [_syllapy.count(w) % 2 for w in r.translate(_NO_PUNCT).lower().split()]
    return all(a != b for a, b in zip(parity, parity[1:]))


CHECKERS: dict[str, Callable[[str, dict], bool]] = {
    # IFBench
    "count:conjunctions": _conjunctions,
    "count:keywords_multiple": _keywords_multiple,
    "count:numbers": _numbers,
    "count:person_names": _person_names,
    "count:pronouns": _pronouns,
    "count:punctuation": _punctuation,
    "count:unique_word_count": _unique_word_count,
    "count:word_count_range": _word_count_range,
    "count:words_japanese": _words_japanese,
    "custom:character_reverse": _character_reverse,
    "custom:csv_city": _csv_city,
    "custom:csv_quotes": _csv_quotes,
    "custom:csv_special_character": _csv_special,
    "custom:date_format_list": _date_list,
    "custom:european_capitals_sort": _european_capitals,
    "custom:mcq_count_length": _mcq,
    "custom:multiples": _multiples,
    "custom:reverse_newline": _reverse_newline,
    "custom:sentence_alphabet": _sentence_alphabet,
    "custom:word_reverse": _word_reverse,
    "format:line_indent": _line_indent,
    "format:list": _special_list,
    "format:newline": _newline_words,
    "format:no_bullets_bullets": _sentences_then_bullets,
    "format:no_whitespace": _no_whitespace,
    "format:options": _options,
    "format:output_template": _output_template,
    "format:parentheses": _parentheses,
    "format:quote_unquote": _quote_unquote,
    "format:quotes": _nested_quotes,
    "format:sub-bullets": _sub_bullets,
    "format:thesis": _thesis,
    "format:title_case": _title_case,
    "ratio:overlap": _overlap,
    "ratio:sentence_balance": _sentence_balance,
    "ratio:sentence_type": _sentence_type,
    "ratio:sentence_words": _three_equal_sentences,
    "repeat:repeat_change": _repeat_change,
    "repeat:repeat_simple": _repeat_simple,
    "repeat:repeat_span": _repeat_span,
    "sentence:alliteration_increment": _alliteration_increment,
    "sentence:increment": _increment,
    "sentence:keyword": _sentence_keyword,
    "words:alphabet": _alphabet,
    "words:consonants": _consonants,
    "words:keywords_specific_position": _keyword_position,
    "words:last_first": _last_first,
    "words:no_consecutive": _no_consecutive,
    "words:palindrome": _palindrome,
    "words:paragraph_last_first": _paragraph_last_first,
    "words:prime_lengths": _prime_lengths,
    "words:repeats": _repeats,
    "words:vowel": _vowel,
    "words:words_position": _words_position,
    # IFEval style
    "keywords:existence": _kw_existence,
    "keywords:forbidden_words": _kw_forbidden,
    "keywords:frequency": _kw_frequency,
    "keywords:letter_frequency": _letter_frequency,
    "length_constraints:number_words": _num_words,
    "length_constraints:number_sentences": _num_sentences,
    "length_constraints:number_paragraphs": _num_paragraphs,
    "change_case:english_lowercase": _lowercase,
    "change_case:english_capital": _uppercase,
    "change_case:capital_word_frequency": _capital_words,
    "punctuation:no_comma": _no_comma,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "detectable_format:number_bullet_lists": _numbered_bullets,
    "detectable_content:postscript": _postscript,
    "first_word:first_word": _first_word,
}

# Constraints that need a tagger, a syllable dictionary, an emoji table or a
# stop-word list: reported as skipped, never guessed.
SKIPPED: dict[str, str] = {
    "words:start_verb": "needs a part-of-speech tagger (nltk)",
    "ratio:stop_words": "needs the nltk English stop-word list",
}
if _emoji is not None:
    CHECKERS["format:emoji"] = _emoji_sentences
else:  # pragma: no cover
    SKIPPED["format:emoji"] = "needs the emoji package: pip install 'specem-fast[eval]'"
if _syllapy is not None:
    CHECKERS["words:odd_even_syllables"] = _odd_even_syllables
else:  # pragma: no cover
    SKIPPED["words:odd_even_syllables"] = "needs the syllapy package: pip install 'specem-fast[eval]'"


@dataclass
class IFResult:
    """Which instructions were checked (and followed) and which were skipped."""

    checked: dict[str, bool] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def all_followed(self) -> bool | None:
        """Prompt-level result: None when any instruction could not be checked."""
        if self.skipped or not self.checked:
            return None
        return all(self.checked.values())

    def to_dict(self) -> dict[str, Any]:
        return {"checked": dict(self.checked), "skipped": dict(self.skipped)}


def check_instructions(response: str, instruction_ids: list[str], kwargs_list: list[dict] | None = None) -> IFResult:
    """Check ``response`` against each instruction; unknown or unsupported ids are skipped."""
    kwargs_list = kwargs_list or [{} for _ in instruction_ids]
    result = IFResult()
    for i, iid in enumerate(instruction_ids):
        key = iid if iid not in result.checked and iid not in result.skipped else f"{iid}#{i + 1}"
        kw = {k: v for k, v in (kwargs_list[i] if i < len(kwargs_list) else {}).items() if v is not None}
        fn = CHECKERS.get(iid)
        if fn is None:
            result.skipped[key] = SKIPPED.get(iid, "no checker for this instruction id")
            continue
        try:
            result.checked[key] = bool(fn(response, kw))
        except (KeyError, ValueError, TypeError) as exc:
            result.skipped[key] = f"bad arguments: {exc!r}"
    return result
