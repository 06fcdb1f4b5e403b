"""autopatch: inference-time correction of multi-hop reasoning in Hugging Face causal LMs.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model()          # embedded Gemma 3 270M
    >>> from autopatch import capture, patch, PatchEdit
    >>> from autopatch.patchscope import decode_state

    >>> patcher = autopatch.AutoPatcher(model, tok)  # drop-in generate() with the shipped profile and gate

The public API is re-exported here; submodules hold one concern each:
``loading`` (models), ``architectures`` (where the layers are), ``engine``
(capture/patch context managers), ``patchscope`` (token-identity Patchscope), ``explain`` (the per-layer view),
``locate`` (first-hop spans), ``prompts``, ``profile`` (patch profiles),
``strategies`` (reroute/backpatch/verbalize), ``gating`` (the gate protocol),
``patcher`` (``AutoPatcher``), ``errors`` (everything raised on purpose).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use, so that `autopatch --help` and the CLI's argument parsing never load torch.
_EXPORTS: dict[str, str] = {
    "decoder_layers": "autopatch.architectures", "final_norm": "autopatch.architectures",
    "num_layers": "autopatch.architectures", "unembedding": "autopatch.architectures",
    "CaptureResult": "autopatch.engine", "PatchEdit": "autopatch.engine", "capture": "autopatch.engine",
    "patch": "autopatch.engine",
    "AutopatchError": "autopatch.errors", "GateFileError": "autopatch.errors", "ModelNotFoundError": "autopatch.errors",
    "PatchError": "autopatch.errors", "ProfileError": "autopatch.errors",
    "UnsupportedArchitectureError": "autopatch.errors",
    "AlwaysPatch": "autopatch.gating", "Gate": "autopatch.gating", "GateDecision": "autopatch.gating",
    "GateInput": "autopatch.gating", "NeverPatch": "autopatch.gating",
    "cache_dir": "autopatch.cache", "load_model": "autopatch.loading",
    "Location": "autopatch.locate", "UnlocatableQuestion": "autopatch.locate", "locate": "autopatch.locate",
    "AutoPatcher": "autopatch.patcher", "PatchReport": "autopatch.patcher", "Answer": "autopatch.patcher",
    "Resolution": "autopatch.resolve",
    "PatchProfile": "autopatch.profile", "PromptFormat": "autopatch.prompts",
}

if TYPE_CHECKING:
    from autopatch.architectures import decoder_layers, final_norm, num_layers, unembedding
    from autopatch.cache import cache_dir
    from autopatch.engine import CaptureResult, PatchEdit, capture, patch
    from autopatch.errors import (
        AutopatchError,
        GateFileError,
        ModelNotFoundError,
        PatchError,
        ProfileError,
        UnsupportedArchitectureError,
    )
    from autopatch.gating import AlwaysPatch, Gate, GateDecision, GateInput, NeverPatch
    from autopatch.loading import load_model
    from autopatch.locate import Location, UnlocatableQuestion, locate
    from autopatch.patcher import Answer, AutoPatcher, PatchReport
    from autopatch.profile import PatchProfile
    from autopatch.prompts import PromptFormat
    from autopatch.resolve import Resolution


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autopatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)  # not cached: monkeypatched submodules stay visible


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "Answer",
    "Resolution",
    "AlwaysPatch",
    "AutoPatcher",
    "AutopatchError",
    "Gate",
    "GateDecision",
    "GateInput",
    "Location",
    "NeverPatch",
    "PatchProfile",
    "PatchReport",
    "PromptFormat",
    "UnlocatableQuestion",
    "locate",
    "CaptureResult",
    "GateFileError",
    "ModelNotFoundError",
    "PatchEdit",
    "PatchError",
    "ProfileError",
    "UnsupportedArchitectureError",
    "cache_dir",
    "capture",
    "decoder_layers",
    "final_norm",
    "load_model",
    "num_layers",
    "patch",
    "unembedding",
]
