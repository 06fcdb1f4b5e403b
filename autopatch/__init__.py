"""autopatch: inference-time correction of multi-hop reasoning in Hugging Face causal LMs.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model()          # embedded Gemma 3 270M
    >>> from autopatch import capture, patch, PatchEdit
    >>> from autopatch.inspect import decode_state

    >>> patcher = autopatch.AutoPatcher(model, tok)  # drop-in generate() with the shipped profile and gate

The public API is re-exported here; submodules hold one concern each:
``loading`` (models), ``architectures`` (where the layers are), ``engine``
(capture/patch context managers), ``inspect`` (token-identity Patchscope),
``locate`` (first-hop spans), ``prompts``, ``profile`` (patch profiles),
``strategies`` (reroute/backpatch/verbalize), ``gating`` (the gate protocol),
``patcher`` (``AutoPatcher``), ``errors`` (everything raised on purpose).
"""

from autopatch.architectures import decoder_layers, final_norm, num_layers, unembedding
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
from autopatch.loading import cache_dir, load_model
from autopatch.locate import Location, UnlocatableQuestion, locate
from autopatch.patcher import AutoPatcher, PatchReport
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat

__version__ = "0.1.0"

__all__ = [
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
