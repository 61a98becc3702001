"""Bootstrap intervals: right place, right width, deterministic, paired over common ids only."""

from __future__ import annotations

import numpy as np
import pytest

from evals import stats
from evals.stats import bootstrap_ci, paired_bootstrap


def test_ci_of_binary_data_contains_the_mean_and_has_the_textbook_width():
    values = [1.0] * 200 + [0.0] * 200  # p = 0.5, n = 400: normal approximation half width 1.96 * 0.025 = 0.049
    low, high = bootstrap_ci(values)
    assert low < 0.5 < high
    assert 0.044 <= (high - low) / 2 <= 0.054


def test_ci_narrows_with_more_data_and_widens_with_the_level():
    small = bootstrap_ci([1.0, 0.0] * 25)
    large = bootstrap_ci([1.0, 0.0] * 2500)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5  # 100x the data: about 10x narrower
    narrow, wide = bootstrap_ci([1.0, 0.0] * 50, level=0.8), bootstrap_ci([1.0, 0.0] * 50, level=0.99)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def test_ci_is_deterministic_for_a_seed():
    values = np.random.default_rng(3).normal(size=300)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_ci_of_continuous_data_matches_the_standard_error():
    values = np.random.default_rng(0).normal(loc=2.0, size=1000)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert 0.055 <= (high - low) / 2 <= 0.070  # 1.96 / sqrt(1000) = 0.062


def test_chunked_resampling_gives_the_same_interval_whatever_the_chunk(monkeypatch):
    values = np.random.default_rng(1).normal(size=500)
    whole = bootstrap_ci(values, iters=2000)
    monkeypatch.setattr(stats, "_CHUNK_DRAWS", 500 * 7)  # 7 resamples per chunk, a ragged last chunk
    chunked = bootstrap_ci(values, iters=2000)
    assert chunked == pytest.approx(whole, abs=0.02)
    assert chunked[0] < values.mean() < chunked[1]


def test_constant_data_has_a_zero_width_interval():
    assert bootstrap_ci([0.7] * 10) == (0.7, 0.7)


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([1.0, float("nan")], {}, "NaN"),
        ([1.0], {"level": 1.0}, "level"),
        ([1.0], {"iters": 0}, "iters"),
    ],
)
def test_ci_rejects_bad_input(values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values, **kwargs)


def test_paired_delta_of_identical_results_is_exactly_zero():
    a = {f"q{i}": float(i % 3 == 0) for i in range(100)}
    result = paired_bootstrap(a, dict(a))
    assert (result.n, result.delta, result.low, result.high) == (100, 0.0, 0.0, 0.0)


def test_paired_delta_uses_only_common_ids():
    a = {f"q{i}": 1.0 for i in range(50)}
    b = {f"q{i}": 0.0 for i in range(50)} | {f"x{i}": 1.0 for i in range(1000)}  # b's extra ids must not count
    result = paired_bootstrap(a, b)
    assert result.n == 50
    assert result.delta == 1.0 and result.low == 1.0 and result.high == 1.0


def test_paired_delta_sign_and_interval():
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(400)]
    b = {k: float(rng.random() < 0.5) for k in ids}
    a = {k: 1.0 if rng.random() < 0.3 else v for k, v in b.items()}  # a fixes ~30% of b's misses
    result = paired_bootstrap(a, b)
    expected = np.mean([a[k] - b[k] for k in ids])
    assert result.delta == pytest.approx(expected)
    assert 0 < result.low < result.delta < result.high
    # Pairing removes the between-item variance: narrower than the unpaired interval of a alone.
    unpaired = bootstrap_ci(list(a.values()))
    assert result.high - result.low < unpaired[1] - unpaired[0]
    assert paired_bootstrap(b, a).delta == pytest.approx(-expected)


def test_paired_delta_does_not_depend_on_dict_order():
    rng = np.random.default_rng(2)
    a = {f"q{i}": float(rng.normal()) for i in range(200)}
    b = {f"q{i}": float(rng.normal()) for i in range(200)}
    shuffled = dict(reversed(list(a.items())))
    assert paired_bootstrap(a, b) == paired_bootstrap(shuffled, b)


def test_paired_without_common_ids_says_so():
    with pytest.raises(ValueError, match="no common item ids"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})
