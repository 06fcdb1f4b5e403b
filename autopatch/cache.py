"""Where autopatch keeps what it computes once: the unpacked embedded models, their quantized weights, the kernels.

Example:
    >>> from autopatch.cache import cache_dir
    >>> cache_dir() / "quantized"      # $AUTOPATCH_CACHE, else $XDG_CACHE_HOME/autopatch, else ~/.cache/autopatch

Its own module so that loading, quantization and the kernels can all name the place without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Where autopatch keeps its caches (the dequantized embedded model, among others)."""
    if os.environ.get("AUTOPATCH_CACHE"):
        return Path(os.environ["AUTOPATCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autopatch"
