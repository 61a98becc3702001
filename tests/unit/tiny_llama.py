"""A tiny Llama with the default model's tokenizer and chat template, registered as a base model, so every training
method runs real TRL steps in seconds (and vLLM can load what they produce)."""

from __future__ import annotations

from pathlib import Path

from zephyr.registry import ModelManifest, Registry, RegistryEntry, copy_tokenizer_files

TINY = "tiny-llama"


def make_tiny_llama(registry: Registry, default_model: RegistryEntry, name: str = TINY) -> RegistryEntry:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = registry.models_dir / f".{name}-build"
    source.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(default_model.path, source)
    base = LlamaConfig.from_pretrained(default_model.path)
    # head_dim 64, as vLLM's CPU attention kernels need; two layers keep a training step well under a second.
    config = LlamaConfig(vocab_size=base.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
                         tie_word_embeddings=True, dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(source)
    return registry.add(source, ModelManifest(name=name, method="imported", source="tests: random tiny Llama"),
                        move=True)


def linked_home(home: Path, default_model: RegistryEntry) -> Path:
    """A throwaway ZEPHYR_HOME holding a tiny Llama (and the default model's folder linked, for its tokenizer)."""
    registry = Registry(home / "models")
    make_tiny_llama(registry, default_model)
    return home
