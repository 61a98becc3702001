"""Shared fixtures: the default model, made once into the real registry by `make setup` (throwaway homes
link to it: loadtest.harness.linked_home)."""

from __future__ import annotations

import pytest

from zephyr.bundled import ensure_default_model
from zephyr.registry import Registry, RegistryEntry
from zephyr.settings import Settings


@pytest.fixture(scope="session")
def default_model() -> RegistryEntry:
    return ensure_default_model(Registry(Settings().models_dir))


@pytest.fixture(scope="session")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model.path)
