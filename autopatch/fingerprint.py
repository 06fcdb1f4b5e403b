"""A short, stable identity for a model's weights, so profiles and gates are only used on their model.

Example:
    >>> from autopatch.fingerprint import model_fingerprint
    >>> model_fingerprint(model)
    '3f9a0c1d2e4b5a69'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autopatch.errors import AutopatchError, UnsupportedArchitectureError


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the model's type, shape and a fixed slice of its input embeddings (rounded, device-independent)."""
    hf_model: Any = model  # any module: a missing Hugging Face attribute is the AttributeError below
    try:
        config = hf_model.config
        identity = f"{config.model_type}|{config.num_hidden_layers}|{config.hidden_size}"
        embedding = hf_model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError) as err:
        raise UnsupportedArchitectureError(
            f"Cannot fingerprint {type(model).__name__}: {err}. autopatch needs a Hugging Face causal LM whose "
            "config has model_type, num_hidden_layers and hidden_size, and which has input embeddings."
        ) from err
    probe = embedding[: min(64, embedding.shape[0]), : min(64, embedding.shape[1])].detach().float().cpu()
    digest = hashlib.sha256()
    digest.update(f"{identity}|{embedding.shape[0]}".encode())
    digest.update(np.round(probe.numpy(), 4).tobytes())
    return digest.hexdigest()[:16]


def shipped_dir_for(root: Path, header: str, fingerprint: str, error: type[AutopatchError]) -> Path | None:
    """The folder ``root/<name>/`` whose ``header`` JSON names ``fingerprint`` as its ``model_fingerprint``, if any.

    Shipped profiles and gates are found this way, so files of several models of
    one ``model_type`` ship side by side. An unreadable header raises ``error``.
    """
    for candidate in sorted(root.glob(f"*/{header}")):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise error(f"Shipped file {candidate} is unreadable ({err}); reinstall autopatch.") from err
        if isinstance(data, dict) and data.get("model_fingerprint") == fingerprint:
            return candidate.parent
    return None
