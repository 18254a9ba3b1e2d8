import pytest

from specem_fast.measure.answers import (
    answer_kind,
    extract_choice,
    extract_last_number,
    grade,
    gsm8k_reference,
    numbers_equal,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = $18 every day.", "18"),
        ("The total is $1,234.50.", "1234.5"),
        ("So the answer is 1,000,000", "1000000"),
        ("Answer: 18.00", "18"),
        ("It drops to -5 degrees.", "-5"),
        ("x = \u221212", "-12"),  # Unicode minus sign
        ("The loss is $-7 today", "-7"),
        ("It costs -$3.25.", "-3.25"),
        ("It takes 3-5 days", "5"),  # a range, not minus five
        ("Add .5 cups", "0.5"),
        ("Step 1: 2 + 3 = 5. Step 2: 5 * 2 = 10.", "10"),
        ("the list 1,2,3", "3"),  # not a thousands separator
        ("#### 72", "72"),
        ("The answer is 7.\n\nI hope this helps!", "7"),
        ("Roughly 0.75 of them", "0.75"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_gsm8k_reference_and_equality():
    assert gsm8k_reference("He pays 5*2=<<5*2=10>>10 dollars.\n#### 1,080") == "1080"
    assert gsm8k_reference("#### -3") == "-3"
    with pytest.raises(ValueError):
        gsm8k_reference("no marker 5")
    assert numbers_equal("18", "18.0")
    assert numbers_equal("1080", "1,080")
    assert not numbers_equal("18", "81")
    assert not numbers_equal(None, "1")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: (B)", "B"),
        ("Answer: B", "B"),
        ("After thinking, the answer is C.", "C"),
        ("The correct answer is **D**", "D"),
        ("**D**", "D"),
        ("Final Answer: **A**", "A"),
        ("answer is: c)", "C"),
        ("The correct answer is option (a).", "A"),
        ("\\boxed{B}", "B"),
        ("Option C is the only one consistent with the data.", "C"),
        ("I think (A) is wrong.\nAnswer: D", "D"),  # explicit statement beats a mention
        ("Answer: B ... wait, no. Answer: C", "C"),  # last explicit statement wins
        ("The answer is a bit unclear, but (C) fits best.", "C"),  # 'a' the article is not A
        ("A) 10^-9 eV\nB) 10^-11 eV\nAnswer: B) 10^-11 eV", "B"),
        ("C", "C"),
        ("I cannot decide.", None),
        ("A good question about energy.", None),
    ],
)
def test_choice(text, expected):
    assert extract_choice(text) == expected


def test_grade_and_kinds():
    assert answer_kind("42") == "number"
    assert answer_kind("-3.5") == "number"
    assert answer_kind("$1,000") == "number"
    assert answer_kind("B") == "choice"
    assert answer_kind("(c)") == "choice"
    assert answer_kind("Paris") == "text"
    assert grade("number", "so 1,000 apples", "1000") == ("1000", True)
    assert grade("choice", "Answer: (C)", "(c)") == ("C", True)
    assert grade("text", "I believe it is Paris.", "paris") == ("i believe it is paris", True)
    assert grade("text", "London", "Paris")[1] is False
    assert grade("number", "nothing", None) == (None, None)
