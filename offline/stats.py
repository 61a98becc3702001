"""Small statistics shared by evaluation and training."""

from __future__ import annotations


def wilson(successes: float, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval of a share; None for n = 0. Successes may be fractional (a win rate's ties
    count half)."""
    if n == 0:
        return None
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=0.05, method="wilson")
    return float(low), float(high)
