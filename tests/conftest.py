"""Shared fixtures: the default model (made once into the real registry by `make setup`), and throwaway
registries that link to it instead of converting it again."""

from __future__ import annotations

from pathlib import Path

import pytest

from zephyr.bundled import ensure_default_model
from zephyr.registry import Registry, RegistryEntry
from zephyr.settings import DEFAULT_MODEL, Settings


@pytest.fixture(scope="session")
def default_model() -> RegistryEntry:
    return ensure_default_model(Registry(Settings().models_dir))


@pytest.fixture(scope="session")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model.path)


def linked_home(home: Path, default_model: RegistryEntry) -> Path:
    """A fresh ZEPHYR_HOME whose registry holds the default model as a link."""
    (home / "models").mkdir(parents=True, exist_ok=True)
    link = home / "models" / DEFAULT_MODEL
    if not link.exists():
        link.symlink_to(default_model.path, target_is_directory=True)
    return home
