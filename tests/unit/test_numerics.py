"""Which dtype the engine runs in, and the server's start-up warning where bf16 scores depend on the batch."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from loadtest.harness import linked_variant
from zephyr import mcq, memory
from zephyr.numerics import scores_depend_on_batch, served_dtype
from zephyr.settings import DEFAULT_MODEL, Settings


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


def test_a_gpu_build_on_an_amx_host_does_not_depend_on_the_batch(monkeypatch, default_model):
    """An H100 node's CPU has AMX tiles, but the GPU computes: the server warned of batching it did not do."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: False)
    assert not scores_depend_on_batch(default_model.path, "bfloat16")


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


@pytest.mark.parametrize(("fitted_in", "served_in", "warned"), [
    ("bfloat16", "float32", True), ("float32", "float32", False), (None, "float32", False)])
async def test_the_server_warns_at_start_when_the_calibration_was_fitted_in_another_dtype(
        tmp_path, caplog, app_factory, default_model, fitted_in, served_in, warned):
    record = mcq.MCQCalibration(method="cloze", weights={"cloze": 0.5}, dtype=fitted_in)
    linked_variant(tmp_path / "home", default_model, DEFAULT_MODEL, mcq_calibration=record)  # the app's registry
    with caplog.at_level(logging.WARNING, logger="zephyr.service"):
        async with app_factory(dtype=served_in) as running:
            assert running.app.state.registry_entry.manifest.mcq_calibration.dtype == fitted_in
    messages = [record.getMessage() for record in caplog.records if record.name == "zephyr.service"]
    assert any(f"computed in {fitted_in}, and the engine computes in {served_in}" in message
               for message in messages) is warned


def test_a_configs_dtype_is_read_as_vllm_reads_it():
    """The top level first, then text_config: a multimodal config naming float16 at its top was read as bf16."""
    from zephyr.numerics import config_dtype

    assert config_dtype({"torch_dtype": "float16", "text_config": {"hidden_size": 8}}) == "float16"
    assert config_dtype({"text_config": {"dtype": "float32"}}) == "float32"
    assert config_dtype({"dtype": "bfloat16", "text_config": {"dtype": "float16"}}) == "bfloat16"
    assert config_dtype({}) == "bfloat16"
