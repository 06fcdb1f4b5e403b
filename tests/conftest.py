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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one torch thread than on two (thread overhead, or a busy second core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
