"""When two ways of scoring the same tokens are bit-identical on this machine, and how far apart they may be if not."""

from __future__ import annotations

from zephyr.numerics import scores_depend_on_batch
from zephyr.registry import Registry
from zephyr.settings import Settings

# Where scores depend on the batch (bf16 on AMX: zephyr.numerics), the prefix-cache check measured up to 0.63 nats
# over a 12-token option (2026-12-02, a 2-core Xeon with AMX).
AMX_BF16_TOLERANCE = 1.0  # nats per option, for options of up to ~12 tokens


def bf16_rounds_by_batch_shape() -> bool:
    """For the session's default model, as the tests serve it."""
    settings = Settings()
    return scores_depend_on_batch(Registry(settings.models_dir).get(settings.model).path, settings.dtype)


def loglikelihood_tolerance(exact: float, amx: float = AMX_BF16_TOLERANCE) -> float:
    """`exact` where the scores are bit-identical here, else `amx` (pick it under the smallest error the test must
    catch: a dropped or misplaced option token costs a nat or more)."""
    return amx if bf16_rounds_by_batch_shape() else exact
