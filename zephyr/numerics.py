"""Which precision the engine computes in, and whether its scores then depend on how a batch is made up."""

from __future__ import annotations

import json
from pathlib import Path


def served_dtype(model_path: Path, dtype: str = "auto") -> str:
    """The dtype vLLM runs a checkpoint in (what `ZEPHYR_DTYPE` resolves to); see `resolve_dtype`."""
    if dtype != "auto":  # without reading the checkpoint
        return dtype
    return resolve_dtype(json.loads((Path(model_path) / "config.json").read_text()))


def resolve_dtype(config: dict, dtype: str = "auto") -> str:
    """An explicit dtype wins. `auto` takes the dtype a checkpoint's parsed config.json names, except an unquantized
    bf16 one where this CPU has no bf16 arithmetic faster than fp32: there the engine computes in fp32, which is
    exact and faster (quantized checkpoints keep theirs: vLLM's CPU kernels for them are built around it).
    vLLM's CPU build without AMX tiles runs bf16 through conversions: SmolLM2-135M generated 29 tokens/s in bf16
    and 148 in fp32 on a 2-core AVX2 EPYC, and scored 1.25-1.3x faster in fp32 on AVX-512 BF16 without AMX
    (docs/operations.md, "ZEPHYR_DTYPE")."""
    if dtype != "auto":
        return dtype
    name = config_dtype(config)
    if name == "bfloat16" and not is_quantized(config) and not bf16_is_fast():
        return "float32"
    return name


def bf16_is_fast() -> bool:
    """Any accelerator's build; on vLLM's CPU build, a CPU with AMX tiles."""
    import torch

    from zephyr.memory import kv_cache_on_host  # memory imports this module

    return not kv_cache_on_host() or torch.cpu._is_amx_tile_supported()


def is_quantized(config: dict) -> bool:
    """Whether a checkpoint's parsed config.json names a quantization (at its top or in its text_config)."""
    return "quantization_config" in config or "quantization_config" in config.get("text_config", {})


def config_dtype(config: dict) -> str:
    """The dtype a checkpoint's parsed config.json names (bf16 where it names none): its top level first, then its
    text_config, as vLLM reads it (a multimodal config naming float16 at the top was read as bf16 here)."""
    text = config.get("text_config") or {}
    return str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
               or "bfloat16")


def scores_depend_on_batch(model_path: Path, dtype: str = "auto") -> bool:
    """True on a CPU with AMX tiles below fp32: there vLLM's bf16 matrix products round by how many tokens a batch
    holds, so the same option scored from the prefix cache or within one long prefill differs in the last bits
    (measured up to 0.63 nats over a 12-token option; docs/evaluation.md, "Cloze through the prefix cache"). In
    fp32, and in bf16 without AMX, the two are bit-identical. On a GPU's build the CPU's tiles compute nothing: an
    H100 node's AMX host warned of batching it did not do."""
    import torch

    from zephyr.memory import kv_cache_on_host  # memory imports this module

    return (kv_cache_on_host() and served_dtype(model_path, dtype) != "float32"
            and torch.cpu._is_amx_tile_supported())
