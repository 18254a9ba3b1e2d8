"""The round policy as plain functions: checked by hand, no models."""

from specem_fast.rounds import policy


def test_exit_needs_patience_and_keeps_the_heaviest():
    low: dict[str, int] = {}
    w = {"a": 0.7, "b": 0.15, "c": 0.15}
    assert policy.exit_drafters(["a", "b", "c"], w, low, 0.2, 2) == ["a", "b", "c"]  # one round below
    assert low == {"a": 0, "b": 1, "c": 1}
    assert policy.exit_drafters(["a", "b", "c"], w, low, 0.2, 2) == ["a"]
    # everyone below the threshold: the heaviest stays
    low = {}
    w = {"a": 0.1, "b": 0.05}
    assert policy.exit_drafters(["a", "b"], w, low, 0.5, 1) == ["a"]
    # a weight back above the threshold resets the count
    low = {"b": 1}
    assert policy.exit_drafters(["a", "b"], {"a": 0.5, "b": 0.5}, low, 0.2, 2) == ["a", "b"] and low["b"] == 0


def test_exit_off_and_drafters_without_a_weight_never_exit():
    assert policy.exit_drafters(["a", "b"], {"a": 0.9, "b": 0.1}, {}, None, 1) == ["a", "b"]
    # "x" drafts but does not verify: it has no weight and stays
    assert policy.exit_drafters(["a", "x"], {"a": 0.01}, {}, 0.5, 1) == ["a", "x"]


def test_window_follows_the_budget():
    assert policy.window_for(10, 256, 0) == 10
    assert policy.window_for(10, 256, 250) == 6
    assert policy.window_for(10, 256, 256) == 1  # at least one token


def test_fast_winner_cases():
    assert policy.fast_winner(["a", "b"], [False, False], False, False) is None  # verify
    assert policy.fast_winner(["", "b"], [False, False], False, False) == 1  # one candidate
    assert policy.fast_winner(["", ""], [False, False], False, False) is None  # nothing competes
    assert policy.fast_winner(["x", "x"], [False, False], False, True) == 0  # agreement skips verification
    assert policy.fast_winner(["x", "x"], [False, False], False, False) is None  # unless asked
    assert policy.fast_winner(["a", "b", ""], [False, False, True], True, False) == 2  # fast_eos: first stopped
    assert policy.fast_winner(["a", "b"], [False, True], False, False) is None  # fast_eos off


def test_prefer_finished_lets_only_ended_candidates_compete():
    assert policy.competing(["a", "b", "c"], [False, True, True], False) == [0, 1, 2]
    assert policy.competing(["a", "b", "c"], [False, True, True], True) == [1, 2]
    assert policy.competing(["a", "", "c"], [False, True, False], True) == [0, 2]  # an empty draft never competes
    assert policy.competing(["a", "b"], [False, False], True) == [0, 1]  # none ended: all compete
    # one ended candidate: accepted without a verify pass; two: they are verified
    assert policy.fast_winner(["a", "b", "c"], [False, True, False], False, False, True) == 1
    assert policy.fast_winner(["a", "b", "c"], [True, True, False], False, False, True) is None
    assert policy.fast_winner(["a", "b", "c"], [False, True, False], False, False, False) is None


def test_stop_strings_cut_at_the_first_listed():
    assert policy.cut_at_stop_string("one\n\ntwo END", ["END", "\n\n"]) == "one\n\ntwo "
    assert policy.cut_at_stop_string("abc", ["x"]) is None
    assert policy.cut_at_stop_string("abc", []) is None


def test_budget_and_trimming():
    assert policy.budget_excess(110, 100, 20) is None
    assert policy.budget_excess(120, 100, 20) == 0
    assert policy.budget_excess(123, 100, 20) == 3
    assert policy.trimmed_answer("Hello big world", " big world", " big") == "Hello big"
    # a head that is not a prefix of the segment (a split character) leaves the answer
    assert policy.trimmed_answer("Hello big world", " big world", " bog") is None
