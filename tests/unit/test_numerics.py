"""Which dtype the engine runs in, and the server's start-up warning where bf16 scores depend on the batch."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from zephyr import memory
from zephyr.numerics import scores_depend_on_batch, served_dtype
from zephyr.settings import Settings


def checkpoint(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture
def amx(monkeypatch):
    """A CPU with AMX tiles under vLLM's CPU build, whatever this machine has."""
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)


def test_auto_takes_the_checkpoints_own_dtype_and_an_explicit_one_wins(tmp_path, default_model, amx):
    assert served_dtype(default_model.path) == "bfloat16"
    assert served_dtype(checkpoint(tmp_path, torch_dtype="float32")) == "float32"
    assert served_dtype(checkpoint(tmp_path, text_config={"dtype": "float16"})) == "float16"
    assert served_dtype(default_model.path, "float32") == "float32"


def test_bf16_runs_in_fp32_on_a_cpu_without_amx_unless_asked_or_quantized(tmp_path, default_model, monkeypatch):
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert served_dtype(default_model.path) == "float32"
    assert Settings().vllm_engine_kwargs(default_model.path)["dtype"] == "float32"
    assert served_dtype(default_model.path, "bfloat16") == "bfloat16"
    assert Settings(dtype="bfloat16").vllm_engine_kwargs(default_model.path)["dtype"] == "bfloat16"
    quantized = checkpoint(tmp_path, torch_dtype="bfloat16", quantization_config={"quant_method": "compressed-tensors"})
    assert served_dtype(quantized) == "bfloat16"
    assert served_dtype(checkpoint(tmp_path, torch_dtype="float16")) == "float16"
    # An accelerator's build computes bf16 natively.
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: False)
    assert served_dtype(default_model.path) == "bfloat16"


@pytest.mark.parametrize(("amx", "dtype", "expected"), [
    (True, "auto", True), (True, "bfloat16", True), (True, "float32", False), (False, "auto", False),
])
def test_only_reduced_precision_on_amx_depends_on_the_batch(monkeypatch, default_model, amx, dtype, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert scores_depend_on_batch(default_model.path, dtype) is expected


def test_a_fp32_checkpoint_served_as_auto_does_not_depend_on_the_batch(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert not scores_depend_on_batch(checkpoint(tmp_path, torch_dtype="float32"))


@pytest.mark.parametrize(("dtype", "warned"), [("auto", True), ("float32", False)])
async def test_the_server_warns_at_start_where_bf16_scores_depend_on_the_batch(
        monkeypatch, caplog, app_factory, dtype, warned):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with caplog.at_level(logging.WARNING, logger="zephyr.service"):
        async with app_factory(dtype=dtype):
            pass
    messages = [record.getMessage() for record in caplog.records if record.name == "zephyr.service"]
    assert any("ZEPHYR_DTYPE=float32" in message for message in messages) is warned
