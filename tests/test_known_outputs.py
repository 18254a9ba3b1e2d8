"""The draft step's rework (issue 11: plans from host data, tokens on the device,
stop tokens looked for after the loop) changes no token and no score: every
output of a fixed set of generations on the tiny models equals the snapshot
taken before it (tests/data/known_outputs_tiny.json, written by
``python tests/known_outputs.py tiny ...`` on the old code)."""

import json
from pathlib import Path

import pytest
from known_outputs import snapshot, tiny_ensemble

SNAPSHOT = Path(__file__).parent / "data" / "known_outputs_tiny.json"


@pytest.fixture(scope="module")
def now(tiny_dirs):
    return snapshot(tiny_ensemble(tiny_dirs["llama"].parent))


@pytest.mark.parametrize("case", list(json.loads(SNAPSHOT.read_text())))
def test_outputs_equal_the_snapshot_taken_before_the_rework(now, case):
    assert now[case] == json.loads(SNAPSHOT.read_text())[case]
