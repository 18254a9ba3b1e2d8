"""Sampling settings checked as they will be used (issue 28 part 2): the sampler runs in
float32 whatever the model's dtype, so every value the settings accept samples sensibly
from float32, bfloat16 and float16 logits, and every value that would break it is
refused with one line."""

from __future__ import annotations

import math

import pytest
import torch

from specem_fast.config import TOP_P_FLOOR, GenerationSettings
from specem_fast.errors import SpecEMError
from specem_fast.model.sampling import sample_tokens

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SUBNORMAL64 = 5e-324  # the smallest positive double
SUBNORMAL32 = 1e-45  # a float32 subnormal
EXTREMES = [SUBNORMAL64, SUBNORMAL32, 1e-300, 1e-40, 1e-38, 1e-9, 0.5, 1 - 1e-7, 1 - 1e-9, 1 - 1e-300, 1.0,
            1 + 1e-9, 1e38, 3.4e38, 3.5e38, 1e300, 10**400, math.nan, math.inf, -math.inf, 0.0, -0.0, -SUBNORMAL64]


def _settings(**kw) -> GenerationSettings | str:
    try:
        return GenerationSettings(**kw)
    except SpecEMError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg, msg  # one line
        return msg


def _logits(dtype, rows: int = 4, vocab: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 4
    x[:, 0] = -30.0  # token 0 is never likely: drawing it means a broken sampler
    return x.to(dtype)


def _draws(logits, temperature, top_p, seed: int = 1, times: int = 8) -> list[list[int]]:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(logits.shape[0])]
    return [sample_tokens(logits, temperature, top_p, gens).tolist() for _ in range(times)]


@pytest.mark.parametrize("value", EXTREMES, ids=repr)
def test_top_p_is_refused_or_clamped_to_what_samples_alike(value):
    st = _settings(temperature=1.0, top_p=value)
    valid = isinstance(value, float) and 0 < value <= 1
    if not valid:
        assert isinstance(st, str) and "top_p" in st
        return
    assert isinstance(st, GenerationSettings)
    if value < TOP_P_FLOOR:
        assert st.top_p == TOP_P_FLOOR  # it keeps the top token alone, as value would in exact arithmetic
    elif value > 1 - 2**-25:
        assert st.top_p == 1.0  # rounds to 1 in float32: every token stays
    else:
        assert st.top_p == value
    for dtype in DTYPES:
        logits = _logits(dtype)
        draws = _draws(logits, st.temperature, st.top_p)
        for row in draws:
            assert all(0 < t < logits.shape[1] for t in row), (dtype, row)
        if value <= 1e-9:  # far below the top token's probability: the top token every time
            assert all(row == logits.float().argmax(-1).tolist() for row in draws), dtype
        if st.top_p == 1.0:
            assert draws == _draws(logits, 1.0, 1.0), dtype


@pytest.mark.parametrize("value", EXTREMES, ids=repr)
def test_temperature_is_refused_or_samples_without_nan(value):
    st = _settings(temperature=value)
    if isinstance(st, str):
        assert "temperature" in st
        assert not (isinstance(value, float) and 1e-5 <= value < 3.4e38)
        return
    assert value == 0 or 1e-5 <= value <= 3.4028234663852886e38
    for dtype in DTYPES:
        logits = _logits(dtype)
        logits[:, 1] = -math.inf  # a masked token: -inf / T must stay -inf, not NaN
        draws = _draws(logits, st.temperature, st.top_p)
        for row in draws:
            assert all(1 < t < logits.shape[1] for t in row), (dtype, value, row)
        if value == 0:
            assert all(row == logits.float().argmax(-1).tolist() for row in draws)


def test_the_largest_temperature_samples_uniformly():
    st = GenerationSettings(temperature=3.4e38, top_p=0.5)
    logits = _logits(torch.bfloat16, rows=1, vocab=64)
    seen = {t for row in _draws(logits, st.temperature, st.top_p, times=400) for t in row}
    assert len(seen) >= 28  # top_p 0.5 of a flat distribution: about half the tokens, any of them


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_sampler_itself_never_lets_top_p_round_to_nothing(dtype):
    """The sampler clamps too (callers other than GenerationSettings): the issue's 1e-300
    drew token 0 every time, as float32 held it as 0 and dropped every token."""
    logits = _logits(dtype)
    for tiny in (1e-300, SUBNORMAL64, SUBNORMAL32):
        assert all(row == logits.float().argmax(-1).tolist() for row in _draws(logits, 1.0, tiny))
    assert _draws(logits, 0.7, 1 - 1e-9) == _draws(logits, 0.7, 1.0)

