"""Shared fixtures: tiny random models for mechanics, the real embedded Gemma loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gemma():
    """``(model, tokenizer)`` of the embedded Gemma 3 270M, loaded (and cached) once per session."""
    import autopatch

    return autopatch.load_model()
