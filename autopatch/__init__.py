"""autopatch: inference-time correction of multi-hop reasoning in Hugging Face causal LMs.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model()          # embedded Gemma 3 270M
    >>> from autopatch import capture, patch, PatchEdit
    >>> from autopatch.inspect import decode_state

The public API is re-exported here; submodules hold one concern each:
``loading`` (models), ``architectures`` (where the layers are), ``engine``
(capture/patch context managers), ``inspect`` (token-identity Patchscope),
``errors`` (everything raised on purpose).
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
from autopatch.loading import cache_dir, load_model

__version__ = "0.1.0"

__all__ = [
    "AutopatchError",
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
