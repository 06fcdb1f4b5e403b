"""How weights are laid out for autopatch's kernels: groups of 32 columns, panels of 4 rows, and the packing.

Example:
    >>> from autopatch.kernels.layout import pack, unpack
    >>> torch.equal(unpack(pack(q), n), q)   # q: int8 [n, k], k a multiple of 32
    True

Pure tensor functions, no native code: :mod:`autopatch.kernels` quantizes into these layouts and multiplies from
them (``w8.c``, ``w4.c``).
"""

from __future__ import annotations

import torch

CHUNK = 16  # columns per chunk of a panel row (CH in w8.c)
GROUP = 32  # columns per scale (GROUP in w8.c): the width of a GGUF Q4_K block
PANEL = 4  # weight rows per panel


def panels(rows: int) -> int:
    """How many panels of 4 weight rows hold ``rows`` rows (the last one padded with zero rows)."""
    return -(-rows // PANEL)


def packable(in_features: int) -> bool:
    """Whether a Linear with this many inputs fits the kernel's layout (a multiple of 32 columns)."""
    return in_features % GROUP == 0


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """float32 ``[n, k/32]`` -> ``[ceil(n/4), k/32, 4]`` (padding rows scale 0), the panels' scales."""
    n, groups = scales.shape
    padded = torch.zeros(panels(n) * PANEL, groups, dtype=torch.float32)
    padded[:n] = scales
    return padded.view(panels(n), PANEL, groups).transpose(1, 2).contiguous()


def unpack_scales(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_scales`."""
    panels, groups, _ = packed.shape
    return packed.transpose(1, 2).reshape(panels * PANEL, groups)[:n].contiguous()


def pack(qweight: torch.Tensor) -> torch.Tensor:
    """int8 ``[n, k]`` -> ``[ceil(n/4), k/16, 4, 16]``: each panel of 4 rows as one contiguous stream."""
    n, k = qweight.shape
    if k % CHUNK:  # the panel layout needs whole chunks; the scales (pack_scales) need whole groups
        raise ValueError(f"pack: {k} columns is not a multiple of {CHUNK}")
    padded = torch.zeros(panels(n) * PANEL, k, dtype=torch.int8)
    padded[:n] = qweight
    return padded.view(panels(n), PANEL, k // CHUNK, CHUNK).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack`: the int8 ``[n, k]`` weight."""
    panels, chunks, _, _ = packed.shape
    return packed.transpose(1, 2).reshape(panels * PANEL, chunks * CHUNK)[:n].contiguous()


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight of :func:`quantize_groups`'s ``(q, scales)``: ``q * scale`` per group of 32."""
    return q.float() * scales.repeat_interleave(GROUP, dim=1)


def dequantize_affine4(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float32 weight of :func:`quantize_affine4`'s ``(q, a, b)``: ``a * q + b`` per group of 32 (one rounding,
    as the kernel's fused multiply-add)."""
    return torch.addcmul(b.repeat_interleave(GROUP, dim=1), q.float(), a.repeat_interleave(GROUP, dim=1))


def pack4(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, k]`` in 0..15 -> ``[ceil(n/4), k/32, 4, 16]``: in each group of 32 columns, byte j of a row
    holds column j (low nibble) and column j + 16 (high nibble)."""
    n, k = q.shape
    if not packable(k):
        raise ValueError(f"pack4: {k} columns is not a multiple of {GROUP}")
    padded = torch.zeros(panels(n) * PANEL, k, dtype=torch.uint8)
    padded[:n] = q
    halves = padded.view(panels(n), PANEL, k // GROUP, 2, GROUP // 2)
    return (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).transpose(1, 2).contiguous()


def unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack4`: the uint8 ``[n, k]`` levels."""
    count, groups, _, half = packed.shape
    rows = packed.transpose(1, 2)
    return torch.stack((rows & 15, rows >> 4), dim=3).reshape(count * PANEL, groups * 2 * half)[:n].contiguous()


def pack4_scales(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 ``a, b [n, k/32]`` -> ``[ceil(n/4), k/32, 2, 4]`` (padding rows 0), the panels' (a, b)."""
    n, groups = a.shape
    padded = torch.zeros(2, panels(n) * PANEL, groups, dtype=torch.float32)
    padded[0, :n], padded[1, :n] = a, b
    return padded.view(2, panels(n), PANEL, groups).permute(1, 3, 0, 2).contiguous()


def unpack4_scales(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack4_scales`: ``(a, b)``."""
    count, groups, _, _ = packed.shape
    both = packed.permute(2, 0, 3, 1).reshape(2, count * PANEL, groups)[:, :n]
    return both[0].contiguous(), both[1].contiguous()
