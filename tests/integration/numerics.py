"""When two ways of scoring the same tokens are bit-identical on this machine, and how far apart they may be if not."""

from __future__ import annotations

import torch

from zephyr.settings import Settings

# vLLM's CPU bf16 matrix products run on AMX tiles where the CPU has them, and their rounding depends on how many
# tokens a batch holds: the same option scored after its context read from the prefix cache, or within one long
# prefill, differs in bf16's last bits, measured up to 0.63 nats over a 12-token option (test_evals's prefix-cache
# check, 2026-12-02, on a 2-core Xeon with AMX). In fp32, and in bf16 without AMX, the two are bit-identical.
AMX_BF16_TOLERANCE = 1.0  # nats per option, for options of up to ~12 tokens


def bf16_rounds_by_batch_shape() -> bool:
    return torch.cpu._is_amx_tile_supported() and Settings().dtype != "float32"


def loglikelihood_tolerance(exact: float, amx: float = AMX_BF16_TOLERANCE) -> float:
    """`exact` where the scores are bit-identical here, else `amx` (pick it under the smallest error the test must
    catch: a dropped or misplaced option token costs a nat or more)."""
    return amx if bf16_rounds_by_batch_shape() else exact
