"""Runs inside the quantization virtualenv (llm-compressor), never in the serving environment.

`python llmc_worker.py SPEC.json` reads what `quant.run` wrote (model folder, output folder, method, scheme, group
size, calibration texts) and applies llm-compressor's `oneshot`. The output is a compressed-tensors checkpoint,
which vLLM serves as it is. This file imports only the standard library, torch, transformers, compressed-tensors
and llm-compressor: the zephyr package is not installed here. Progress goes to stdout, which the CLI streams."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _allow_awq_without_accelerator() -> None:
    # llm-compressor 0.14's AWQ pins its cached activations for fast host-to-device copies; on a machine without
    # an accelerator pin_memory() raises "Cannot access accelerator device when none is available". Pinning is
    # only an optimisation, so skip it when there is nothing to copy to.
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def _scheme(spec: dict):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(spec["scheme"], ["Linear"])
    if spec.get("group_size") and scheme.weights is not None and scheme.weights.strategy == "group":
        scheme.weights.group_size = spec["group_size"]
    return scheme


def _smoothing_mappings(spec: dict) -> list | None:
    """None lets llm-compressor infer its mappings (Llama: q/k/v after input_layernorm, gate/up after
    post_attention_layernorm). down_proj's input, act(gate) * up, has the MLP's largest outliers and no norm before
    it; scaling up_proj's output rows by 1/s and down_proj's input columns by s leaves the product unchanged."""
    if not spec.get("smooth_down_proj"):
        return None
    from llmcompressor.modifiers.transform.smoothquant.utils import DEFAULT_SMOOTHQUANT_MAPPINGS, LayerMap

    return [*DEFAULT_SMOOTHQUANT_MAPPINGS, LayerMap(balance_layers=["re:.*down_proj"], smooth_layers="re:.*up_proj")]


def _recipe(spec: dict) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    ignore = [] if spec.get("quantize_lm_head") else ["lm_head"]
    groups = {"group_0": _scheme(spec)}
    method = spec["method"]
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=spec.get("dampening", 0.01))]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        _allow_awq_without_accelerator()
        return [AWQModifier(n_grid=spec.get("awq_grid", 20), duo_scaling=True),
                QuantizationModifier(config_groups=groups, ignore=ignore)]
    if method == "w8a8":
        recipe = []
        if spec.get("smoothing"):
            from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

            recipe.append(SmoothQuantModifier(smoothing_strength=spec["smoothing"], mappings=_smoothing_mappings(spec)))
        if spec.get("w8a8_weights", "gptq") == "gptq":
            recipe.append(GPTQModifier(config_groups=groups, ignore=ignore))
        else:
            recipe.append(QuantizationModifier(config_groups=groups, ignore=ignore))
        return recipe
    raise SystemExit(f"llmc_worker: method {method!r} is not an llm-compressor method")


def read_texts(path: Path) -> list[str]:
    """The rendered samples quant.calibration.write wrote. Split at "\n" only, not splitlines(): JSON leaves U+0085
    and U+2028 unescaped inside strings, and splitlines() would cut a record there (an MMLU validation question
    holds U+0085)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line)["text"] for line in lines if line.strip()]


def main(spec_path: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec.get("seed", 0))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if spec.get("quantize_lm_head") and model.config.tie_word_embeddings:
        # A tied lm_head is the embedding matrix; quantizing it means giving the head its own (quantized) copy.
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
    texts = read_texts(Path(spec["calibration"]))
    # The texts are already rendered with the chat template: no second BOS, no padding, truncated to seq_len.
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=spec["seq_len"])
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    print(f"llm-compressor {spec['method']} {spec['scheme']}: {len(texts)} calibration samples, "
          f"{sum(map(len, encoded['input_ids']))} tokens", flush=True)
    oneshot(model=model, dataset=dataset, recipe=_recipe(spec), max_seq_length=spec["seq_len"],
            num_calibration_samples=len(texts), shuffle_calibration_samples=False)
    model.save_pretrained(spec["out_dir"], save_compressed=True)
    tokenizer.save_pretrained(spec["out_dir"])
    stats = {"seconds": round(time.perf_counter() - started, 1), "calibration_samples": len(texts),
             "calibration_tokens": sum(map(len, encoded["input_ids"])), "torch": torch.__version__,
             "llmcompressor": _version("llmcompressor"), "compressed_tensors": _version("compressed-tensors")}
    Path(spec["stats"]).write_text(json.dumps(stats, indent=1))
    print(f"done in {stats['seconds']} s", flush=True)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main(sys.argv[1])
