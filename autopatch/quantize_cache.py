"""The quantized-weights cache: a later load reads the int8/int4 layers instead of quantizing again.

Example:
    >>> key = source_cache_key("/root/.cache/autopatch/qwen2.5-coder-1.5b-instruct")
    >>> write_cache(key, "int8", {"model.layers.0.mlp.up_proj": layer})
    >>> state, kinds = read_cache(key, "int8", ["WeightOnlyInt8Linear"], ["model.layers.0.mlp.up_proj"])

One folder per (weights, mode, format) under ``$AUTOPATCH_QUANTIZED_CACHE``, else ``cache_dir()/quantized/``:
``weights.safetensors`` (never a pickle) and ``manifest.json`` with its SHA-256 and each layer's class. A file
that fails its check is removed and rebuilt, never used; a cache that cannot be written only costs the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from autopatch.cache import cache_dir

logger = logging.getLogger("autopatch")

__all__ = ["CACHE_FORMAT", "cache_paths", "read_cache", "source_cache_key", "write_cache"]


CACHE_FORMAT = 3  # bump when a layer's buffers, the kernels' layout or the manifest change


def source_cache_key(source: str | Path) -> str | None:
    """A key for the weights in the local directory ``source``: its path and each weight file's size and mtime.

    ``None`` when ``source`` is not a local directory (nothing to key a cache on).
    """
    path = Path(source)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(f"{path.resolve()}|{stamp}".encode()).hexdigest()[:24]


def cache_paths(cache_key: str, mode: str) -> tuple[Path, Path]:
    root = Path(os.environ["AUTOPATCH_QUANTIZED_CACHE"]) if os.environ.get("AUTOPATCH_QUANTIZED_CACHE") else \
        cache_dir() / "quantized"
    folder = root / f"{cache_key}-{mode}-v{CACHE_FORMAT}"
    return folder / "weights.safetensors", folder / "manifest.json"


# Weights files this process wrote, with their checksum: (size, mtime_ns, sha256). Reading one back right after
# writing it (a first load) need not hash it a second time (0.7 s for Gemma's 964 MB here); any other read does.
_written: dict[Path, tuple[int, int, str]] = {}


def _checksum(path: Path) -> str:
    """``path``'s sha256, from :data:`_written` while the file is the one this process wrote."""
    stat = path.stat()
    known = _written.get(path.resolve())
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_older_formats(cache_key: str, mode: str) -> None:
    """Remove this key's caches of ``mode`` in an older :data:`CACHE_FORMAT`: no version of autopatch that writes
    this format reads them again, and an embedded model's take 0.3–1.7 GB each. Newer formats are left alone (a
    newer installation may share the folder)."""
    root = cache_paths(cache_key, mode)[0].parent.parent
    for version in range(1, CACHE_FORMAT):
        old = root / f"{cache_key}-{mode}-v{version}"
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            logger.info("autopatch: removed %s, a quantized cache in an older format", old)


def read_cache(cache_key: str, mode: str, kinds_allowed: list[str], names: list[str], *, floats: bool = False,
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The cached state of ``mode``'s layers ``names`` and each one's class name (one of ``kinds_allowed``), or
    ``None`` (absent, or refused: a damaged file is removed, so the caller quantizes and writes it again).
    ``floats``: the cache must also hold the model's other parameters (written with ``floats=``), in the state."""
    from safetensors.torch import load_file

    weights, manifest = cache_paths(cache_key, mode)
    if not (weights.exists() and manifest.exists()):
        return None
    state: tuple[dict[str, torch.Tensor], dict[str, str]] | None
    try:
        meta = json.loads(manifest.read_text())
        kinds = meta.get("layers") if isinstance(meta, dict) else None
        ok = (isinstance(kinds, dict) and meta.get("format") == CACHE_FORMAT and meta.get("mode") == mode
              and list(kinds) == names and set(kinds.values()) <= set(kinds_allowed)
              and isinstance(meta.get("floats"), list) == floats and meta.get("sha256") == _checksum(weights))
        state = (load_file(str(weights)), {str(k): str(v) for k, v in kinds.items()}) if ok and kinds else None
        why = "failed its check"
    except (OSError, ValueError) as err:
        state, why = None, f"is unreadable ({err})"
    if state is None:
        logger.warning("autopatch: the quantized cache %s %s; quantizing again", weights.parent, why)
        shutil.rmtree(weights.parent, ignore_errors=True)
    return state


def write_cache(cache_key: str, mode: str, swapped: Mapping[str, nn.Module], *,
                floats: Mapping[str, torch.Tensor] | None = None, files: Callable[[Path], None] | None = None) -> None:
    """Write the int8 state atomically (a staging folder renamed into place); a failure only costs the cache.

    ``floats``: the model's other parameters, by name, stored beside the layers (a cache that holds a whole
    model); ``files(folder)`` writes more files into the folder before it is renamed into place (its config)."""
    from safetensors.torch import save_file

    weights, manifest = cache_paths(cache_key, mode)
    state = {f"{name}.{k}": v.contiguous() for name, layer in swapped.items() for k, v in layer.state_dict().items()}
    state.update({name: v.contiguous() for name, v in (floats or {}).items()})
    try:
        weights.parent.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{weights.parent.name}-", dir=weights.parent.parent))
        try:
            save_file(state, str(staging / weights.name))
            if files is not None:
                files(staging)
            checksum = sha256_of(staging / weights.name)
            (staging / manifest.name).write_text(json.dumps({
                "format": CACHE_FORMAT, "mode": mode,
                "layers": {name: type(layer).__name__ for name, layer in swapped.items()},
                **({"floats": sorted(floats)} if floats is not None else {}),
                "sha256": checksum}, indent=1) + "\n")
            os.rename(staging, weights.parent)
            stat = weights.stat()
            _written[weights.resolve()] = (stat.st_size, stat.st_mtime_ns, checksum)
            _remove_older_formats(cache_key, mode)
        except OSError:
            if not weights.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        logger.warning("autopatch: could not cache the quantized weights in %s (%s)", weights.parent, err)
