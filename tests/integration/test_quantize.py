"""Every quantization method on a tiny Llama, through `zephyr quantize`: GPTQ, AWQ and W8A8 run llm-compressor in
its own virtualenv (made on first use, then reused), EasyQuant and bitsandbytes run here. Each result is a
registry entry with its manifest, and each compressed-tensors result loads and generates in vLLM's CPU engine; the
bitsandbytes one, which vLLM cannot run on CPU, is refused by `zephyr serve` with the way out and scored through
transformers instead."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_training import write_arc
from tests.unit.tiny_llama import TINY, make_tiny_llama
from zephyr.registry import MANIFEST, Registry, vllm_cpu_lacks_int4_kernel
from zephyr.settings import Settings

pytestmark = pytest.mark.integration

GENERATE = """
import sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=256 << 20, seed=0)
    out = llm.chat([{"role": "user", "content": "Why is the sky blue?"}], SamplingParams(max_tokens=8, temperature=0))
    print("GENERATED", len(out[0].outputs[0].token_ids))
"""


def run(*args: str, env: dict[str, str], timeout: int = 900, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory, default_model) -> dict[str, str]:
    root = tmp_path_factory.mktemp("quant")
    make_tiny_llama(Registry(root / "home" / "models"), default_model)
    write_arc(root / "data" / "arc" / "ARC-Easy", "train")
    # The reported split holds other questions: calibration leaves out any question a reported split holds.
    write_arc(root / "data" / "arc" / "ARC-Easy", "test", stem_prefix="On a test: ")
    return {**os.environ, "ZEPHYR_HOME": str(root / "home"), "ZEPHYR_DATA_DIR": str(root / "data"),
            "ZEPHYR_EVAL_RESULTS_DIR": str(root / "results"), "ZEPHYR_ENFORCE_EAGER": "true",
            # One quantization env per machine (it takes a minute to make), not one per test home.
            "ZEPHYR_QUANT_ENV": str(Settings().resolved_quant_env)}


def quantize(env: dict[str, str], method: str, *extra: str) -> subprocess.CompletedProcess:
    return run("-m", "cli", "quantize", "--model", TINY, "--method", method, *extra, env=env)


CALIBRATION = ("--calibration-sources", "arc_easy:train", "--samples", "6", "--seq-len", "128")


@pytest.mark.parametrize(("method", "extra", "bits"), [
    ("gptq", CALIBRATION, 4),
    ("awq", (*CALIBRATION, "--awq-grid", "3"), 4),
    ("w8a8", (*CALIBRATION, "--smoothing", "0.5"), 8),  # down_proj smoothing is on by default
    ("easyquant", ("--steps", "10"), 4),
    ("easyquant", ("--form", "dequantized", "--steps", "10"), None),
])
def test_compressed_tensors_variants_register_and_generate_in_vllm(env, method, extra, bits):
    result = quantize(env, method, *extra)
    registry = Registry(Path(env["ZEPHYR_HOME"]) / "models")
    name = f"{TINY}-{method}" + ("-outliers" if "dequantized" in extra else "")
    assert f"registered {name}" in result.stdout
    entry = registry.get(name)
    manifest = entry.manifest
    assert (manifest.parent, manifest.method) == (TINY, method)
    assert manifest.recipe["scheme"] and manifest.recipe_digest
    assert manifest.stats["seconds_total"] > 0
    # The recorded size is the model's files; the registry adds only the manifest.
    assert manifest.stats["bytes_on_disk"] == entry.size_bytes() - (entry.path / MANIFEST).stat().st_size
    if method in ("gptq", "awq", "w8a8"):
        assert manifest.data_digest and manifest.recipe["calibration"]["sources"] == ["arc_easy:train"]
        assert f"llm-compressor {method} " in result.stderr and "done in" in result.stderr  # the worker's own lines
    runs = Path(env["ZEPHYR_HOME"]) / "quant-runs"
    assert (runs / name / "stats.json").is_file() and not (runs / f".{name}.incoming").exists()
    assert str(runs / name) in manifest.source  # the run's records, where they stay
    if method == "w8a8":  # down_proj's input smoothed through up_proj, in every layer, besides the default mappings
        worker_log = (Path(env["ZEPHYR_HOME"]) / "quant-runs" / name / "worker.log").read_text()
        layers = json.loads((entry.path / "config.json").read_text())["num_hidden_layers"]
        assert len(re.findall(r"Smoothing with model\.layers\.\d+\.mlp\.up_proj", worker_log)) == layers
        assert len(re.findall(r"Smoothing with model\.layers\.\d+\.post_attention_layernorm", worker_log)) == layers
        assert manifest.recipe["smooth_down_proj"] is True
    config = json.loads((entry.path / "config.json").read_text())
    if bits is None:  # the paper's numerics as 16-bit weights: no quantization_config, outliers kept
        assert "quantization_config" not in config and manifest.recipe["outliers_isolated"] is True
    else:
        quant = config["quantization_config"]
        assert quant["quant_method"] == "compressed-tensors"
        assert quant["config_groups"]["group_0"]["weights"]["num_bits"] == bits
        assert manifest.stats["linear_ratio"] < (0.3 if bits == 4 else 0.55)
    if bits == 4 and vllm_cpu_lacks_int4_kernel():
        # vLLM's CPU build has no 4-bit kernel for AVX2 CPUs: the server refuses the model before its engine starts
        served = run("-m", "cli", "serve", "--model", name, env=env, timeout=120, ok=False)
        assert served.returncode == 1 and "has no 4-bit kernel for this CPU" in served.stderr, served.stderr[-2000:]
        return
    generated = run("-c", GENERATE, str(entry.path), env=env)
    assert "GENERATED 8" in generated.stdout


def test_bitsandbytes_is_refused_by_the_server_and_scored_through_transformers(env):
    quantize(env, "bnb")
    name = f"{TINY}-bnb"
    entry = Registry(Path(env["ZEPHYR_HOME"]) / "models").get(name)
    assert json.loads((entry.path / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    served = run("-m", "cli", "serve", "--model", name, env=env, timeout=120, ok=False)
    assert served.returncode == 1
    assert "vLLM serves bitsandbytes only on CUDA GPUs" in served.stderr
    scored = run("-m", "cli", "eval", "run", "--model", name, "--suite", "mcq", "--benchmarks", "arc_easy",
                 env=env)
    assert "arc_easy letter format" in scored.stderr and "arc_easy cloze_acc" in scored.stderr
    refused = run("-m", "cli", "eval", "run", "--model", name, "--suite", "gsm8k", env=env, ok=False)
    assert refused.returncode == 1 and "the gsm8k suite needs vLLM" in refused.stderr
