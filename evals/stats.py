"""Bootstrap confidence intervals for a mean and for a paired difference of means (percentile method).

Both are vectorised and deterministic for a fixed seed. When the values take few distinct levels (accuracies are
0/1, paired accuracy differences are -1/0/1) the resampled mean is drawn from the exact multinomial over those
levels instead of resampling indices: the same bootstrap distribution, at a cost independent of the sample size,
so a 14k-question MMLU run costs as little as a 500-question one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

# Up to this many distinct values the multinomial shortcut is used.
_MAX_LEVELS = 64
# Index resampling is done in chunks of about this many draws, to bound memory (iters x n can be 10^8).
_CHUNK_DRAWS = 2_000_000


@dataclass(frozen=True)
class PairedDelta:
    n: int  # number of item ids the two sides have in common
    delta: float  # mean(a) - mean(b) over the common ids
    low: float
    high: float
    level: float = 0.95


def _check(values: np.ndarray, iters: int, level: float) -> None:
    if values.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot bootstrap a sample with NaN or infinite values")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _resampled_means(values: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    n = values.size
    levels, counts = np.unique(values, return_counts=True)
    if levels.size == 1:
        return np.full(iters, levels[0])
    if levels.size <= _MAX_LEVELS:
        draws = rng.multinomial(n, counts / n, size=iters)
        return draws @ levels / n
    rows = max(1, _CHUNK_DRAWS // n)
    means = np.empty(iters)
    for start in range(0, iters, rows):
        stop = min(iters, start + rows)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _interval(values: np.ndarray, iters: int, seed: int, level: float) -> tuple[float, float]:
    means = _resampled_means(values, iters, np.random.default_rng(seed))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    values: Iterable[float], iters: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values`."""
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    _check(array, iters, level)
    return _interval(array, iters, seed, level)


def paired_bootstrap(
    a: Mapping[str, float], b: Mapping[str, float], iters: int = 10_000, seed: int = 0, level: float = 0.95
) -> PairedDelta:
    """mean(a) - mean(b) over the ids both have, with a bootstrap interval that resamples ids (pairs stay paired)."""
    common = sorted(a.keys() & b.keys())  # sorted: the draw must not depend on dict order
    if not common:
        raise ValueError(
            f"no common item ids to compare ({len(a)} ids on one side, {len(b)} on the other): "
            "measure both on the same split and items"
        )
    diffs = np.array([a[k] for k in common], dtype=float) - np.array([b[k] for k in common], dtype=float)
    _check(diffs, iters, level)
    low, high = _interval(diffs, iters, seed, level)
    return PairedDelta(n=len(common), delta=float(diffs.mean()), low=low, high=high, level=level)
