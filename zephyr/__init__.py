"""Zephyr's shared core: settings, model registry, MCQ format and data schemas."""

__version__ = "0.1.0"
