"""Engines are sized by what their settings can use and refused when they would not fit (issue 26, item 5): two
engines on one box each took 35% of the host's RAM, and the second died with only EngineDeadError to show."""

from __future__ import annotations

import pytest
import torch

from zephyr import memory
from zephyr.settings import Settings


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    """vLLM's CPU build, whatever this machine has: the GPU case is its own test."""
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: True)


def test_kv_cache_is_what_the_settings_can_use_not_a_share_of_the_host(default_model, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # bf16 is served as bf16
    per_token = memory.kv_bytes_per_token(default_model.path)
    assert per_token == 2 * 30 * 3 * 64 * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64, bf16
    settings = Settings(max_model_len=1024, max_num_seqs=4)
    assert memory.kv_cache_bytes(default_model.path, settings) == per_token * 1024 * 4
    assert settings.vllm_engine_kwargs(default_model.path)["kv_cache_memory_bytes"] == per_token * 1024 * 4
    # The share still caps it, and an explicit size wins.
    huge = Settings(max_model_len=2048, max_num_seqs=100_000, memory_share=0.01)
    assert memory.kv_cache_bytes(default_model.path, huge) == int(0.01 * memory.total_bytes())
    assert memory.kv_cache_bytes(default_model.path, Settings(kv_cache_gib=1.5)) == int(1.5 * memory.GIB)


def test_the_engine_is_sized_in_the_dtype_it_computes_in(default_model, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # bf16 runs as fp32
    assert memory.kv_bytes_per_token(default_model.path) == 2 * 30 * 3 * 64 * 4
    assert memory.kv_bytes_per_token(default_model.path, "bfloat16") == 2 * 30 * 3 * 64 * 2
    # and the weights are counted at their width in memory, twice their bytes on disk
    on_disk = memory.weights_bytes(default_model.path)
    assert memory.plan(default_model.path, Settings()).weights_bytes == 2 * on_disk
    assert memory.plan(default_model.path, Settings(dtype="bfloat16")).weights_bytes == on_disk


def test_an_engine_that_would_not_fit_is_refused_in_one_line(default_model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 * memory.GIB)
    problem = memory.plan(default_model.path, Settings()).problem
    assert problem is not None and "\n" not in problem
    assert "ZEPHYR_KV_CACHE_GIB" in problem and "1.0 GiB is available" in problem
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * memory.GIB)
    assert memory.plan(default_model.path, Settings()).problem is None


def test_the_offline_engine_refuses_before_vllm_loads(default_model, monkeypatch):
    from offline.engine import OfflineEngine

    monkeypatch.setattr(memory, "available_bytes", lambda: 256 * 2**20)
    with pytest.raises(memory.NotEnoughMemory, match="is available"):
        OfflineEngine(default_model.path, Settings())


def test_a_kv_block_size_the_cpu_backend_refuses_is_refused_before_the_model_loads(default_model, monkeypatch):
    """vLLM's CPU attention takes blocks of a multiple of 32 tokens and raised only after the model had loaded."""
    from offline.engine import OfflineEngine
    from service.engine import VLLMEngine

    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: True)
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * memory.GIB)
    with pytest.raises(memory.EngineWontStart, match="ZEPHYR_BLOCK_SIZE=48: .* a multiple of 32"):
        OfflineEngine(default_model.path, Settings(block_size=48))
    assert "ZEPHYR_BLOCK_SIZE=16" in VLLMEngine.refusal(Settings(block_size=16), default_model.path, "m")
    assert memory.block_size_problem(64) is None
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: False)  # a GPU takes 16
    assert memory.block_size_problem(16) is None


def test_a_kv_cache_size_must_be_a_finite_number():
    """inf passed `gt=0` and crashed the engine's sizing with OverflowError, a traceback at `zephyr serve`."""
    from pydantic import ValidationError

    for bad in ("inf", "nan", "1e300"):
        with pytest.raises(ValidationError, match="kv_cache_gib"):
            Settings(kv_cache_gib=bad)


def test_a_sigkilled_engine_is_reported_as_a_likely_oom():
    from service.app import _death_cause

    class Dead:
        def exit_codes(self):
            return [-9]

    assert "out-of-memory" in _death_cause(Dead(), None)
    assert _death_cause(object(), None) == ""


def test_on_a_gpu_the_device_share_sizes_the_cache_and_host_ram_is_not_asked_for_it(default_model, monkeypatch):
    # An 80 GB GPU in a pod with 24 GiB of RAM: the weights and cache are on the device, whose share vLLM applies.
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: False)
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * memory.GIB)
    big = Settings(max_model_len=32_768, max_num_seqs=128, memory_share=0.85)
    assert big.vllm_engine_kwargs(default_model.path)["kv_cache_memory_bytes"] is None
    assert big.vllm_engine_kwargs(default_model.path)["gpu_memory_utilization"] == 0.85
    assert memory.plan(default_model.path, big).problem is None
    # An explicit size is still passed (vLLM then ignores the share), and only the runtime needs host RAM.
    sized = Settings(kv_cache_gib=20)
    assert sized.vllm_engine_kwargs(default_model.path)["kv_cache_memory_bytes"] == 20 * memory.GIB
    assert memory.plan(default_model.path, sized).needed_bytes == memory.ENGINE_OVERHEAD_BYTES


def test_a_config_without_the_sizes_names_what_is_missing_and_the_setting_to_use(tmp_path):
    (tmp_path / "config.json").write_text('{"n_layer": 12, "n_head": 12, "n_embd": 768}')  # GPT-2's names
    with pytest.raises(ValueError, match="no num_hidden_layers, num_attention_heads, hidden_size.*ZEPHYR_KV_CACHE_GIB"):
        memory.kv_bytes_per_token(tmp_path)


def test_a_builders_sampling_engine_that_would_not_start_is_one_line_not_a_traceback(default_model, monkeypatch):
    import typer

    from cli.train import _sampling_engine
    from zephyr.registry import Registry

    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: True)
    monkeypatch.setattr("cli.train.unwind_on_sigterm", lambda: None)  # leaves the test process's SIGTERM alone
    entry = Registry(default_model.path.parent).get(default_model.name)
    with pytest.raises(typer.Exit), _sampling_engine(entry, Settings(block_size=48), seed=0):
        pass


def _cgroup(folder, limit: str, usage: int, stat: str = "", v1: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else ("memory.max", "memory.current")
    (folder / names[0]).write_text(limit + "\n")
    (folder / names[1]).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(stat)


def test_a_containers_headroom_is_its_own_cgroups_less_the_reclaimable_file_cache(tmp_path, monkeypatch):
    """The check read only the root's limit (none under systemd's MemoryMax, a batch job, a container without its
    own cgroup namespace: the engine was then OOM-killed), and counted the page cache as used (a container that had
    read 10 GB of files was refused an engine the kernel had room for)."""
    GIB = memory.GIB
    monkeypatch.setattr(memory, "total_bytes", lambda: 64 * GIB)
    job = tmp_path / "system.slice" / "job.scope"
    _cgroup(job, str(8 * GIB), 7 * GIB, f"anon {3 * GIB}\ninactive_file {4 * GIB}\nactive_file 0\n")
    assert memory._cgroup_free(tmp_path, "0::/system.slice/job.scope\n") == 5 * GIB  # 8 - (7 - 4)
    _cgroup(tmp_path / "system.slice", str(6 * GIB), 5 * GIB + GIB // 2)  # a tighter limit above it
    assert memory._cgroup_free(tmp_path, "0::/system.slice/job.scope\n") == GIB // 2
    assert memory._cgroup_free(tmp_path, "0::/elsewhere\n") is None  # no limit on the way up
    _cgroup(tmp_path / "memory" / "docker" / "abc", str(2 * GIB), GIB, f"total_inactive_file {GIB // 2}\n", v1=True)
    assert memory._cgroup_free(tmp_path, "4:memory:/docker/abc\n0::/\n") == GIB + GIB // 2  # cgroup v1
    _cgroup(job, "max", 7 * GIB)
    (tmp_path / "system.slice" / "memory.max").write_text("max\n")
    assert memory._cgroup_free(tmp_path, "0::/system.slice/job.scope\n") is None
