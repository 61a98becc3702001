"""Which precision the engine computes in, and whether its scores then depend on how a batch is made up."""

from __future__ import annotations

import json
from pathlib import Path


def served_dtype(model_path: Path, dtype: str = "auto") -> str:
    """The dtype vLLM runs a checkpoint in: `auto` takes the one its config.json names."""
    if dtype != "auto":
        return dtype
    return config_dtype(json.loads((Path(model_path) / "config.json").read_text()))


def config_dtype(config: dict) -> str:
    """The dtype a checkpoint's parsed config.json names (bf16 where it names none)."""
    config = config.get("text_config", config)
    return str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")


def scores_depend_on_batch(model_path: Path, dtype: str = "auto") -> bool:
    """True on a CPU with AMX tiles below fp32: there vLLM's bf16 matrix products round by how many tokens a batch
    holds, so the same option scored from the prefix cache or within one long prefill differs in the last bits
    (measured up to 0.63 nats over a 12-token option; docs/evaluation.md, "Cloze through the prefix cache"). In
    fp32, and in bf16 without AMX, the two are bit-identical."""
    import torch

    return served_dtype(model_path, dtype) not in ("float32", "fp32") and torch.cpu._is_amx_tile_supported()
