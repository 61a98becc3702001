"""Engine settings the server and evals share: what reaches vLLM."""

from __future__ import annotations

import pytest

from zephyr.settings import Settings


def test_engine_kwargs_carry_a_block_size_small_enough_to_cache_the_system_prompt(monkeypatch, default_model):
    assert Settings().vllm_engine_kwargs(default_model.path)["block_size"] == 32
    monkeypatch.setenv("ZEPHYR_BLOCK_SIZE", "64")
    assert Settings().vllm_engine_kwargs(default_model.path)["block_size"] == 64


def test_bad_block_size_is_refused_with_the_setting_named(monkeypatch):
    monkeypatch.setenv("ZEPHYR_BLOCK_SIZE", "0")
    with pytest.raises(ValueError, match="block_size"):
        Settings()


def test_vllm_gets_every_cpu_core_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    monkeypatch.setenv("ZEPHYR_CPU_RESERVED_CORES", "1")
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    # vLLM's own variable, set explicitly by an operator, wins.
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setenv("ZEPHYR_CPU_RESERVED_CORES", "0")
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    assert Settings().cpu_reserved_cores_in_effect == "1"
