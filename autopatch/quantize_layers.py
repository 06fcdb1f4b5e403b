"""The quantized Linear layers :mod:`autopatch.quantize` swaps in: their weight layouts and their kernels.

Example:
    >>> from autopatch.quantize_layers import WeightOnlyInt4Linear
    >>> layer = WeightOnlyInt4Linear.from_linear(nn.Linear(64, 32))
    >>> layer(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 32])

Each layer keeps everything in buffers (a ``state_dict`` round-trips through safetensors without pickling) and
owns one kernel: the packed ones (:class:`PackedLinear`) autopatch's C kernels in :mod:`autopatch.kernels`, with
float32 activations; :class:`DynamicInt8Linear` ``torch._int_mm``, with int8 activations per token. Why these
and not torch's: :mod:`autopatch.quantize`'s docstring and docs/quantization.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autopatch import kernels


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8; each subclass owns its weight layout and its kernel.

    Example:
        >>> q = WeightOnlyInt8Linear.from_linear(nn.Linear(64, 32))
        >>> q(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])

    Everything lives in buffers, so a layer round-trips through ``state_dict`` and safetensors without pickling.
    """

    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """``linear``'s weight rounded to int8 (and its bias copied)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer._store(linear.weight.detach().float())
        if linear.bias is not None and layer.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    @classmethod
    def accepts(cls, linear: nn.Linear) -> bool:
        """Whether this layout can hold ``linear`` at all (the packed kernels need whole groups of 32 inputs)."""
        return True

    @classmethod
    def holds(cls, weight: torch.Tensor) -> bool:
        """Whether this layer keeps ``weight`` faithfully enough to be chosen for it (see :class:`QuantMode`)."""
        return True

    def _store(self, weight: torch.Tensor) -> None:
        """Quantize the float32 ``[out, in]`` weight into this layer's buffers."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer multiplies by."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedLinear(Int8Linear):
    """A weight-only layer on one of autopatch's kernels: float32 activations, the weight in packed panels
    (``qweight``, ``gscale``), multiplied by :attr:`matmul`. Public for code that finds these layers in a model
    (:func:`autopatch.invariance.set_batch_invariant` sets their ``invariant``).

    Example:
        >>> layer = WeightOnlyInt4Linear.from_linear(nn.Linear(64, 32))
        >>> isinstance(layer, PackedLinear), layer.prefill
        (True, torch.float32)
    """

    qweight: torch.Tensor
    gscale: torch.Tensor
    matmul: Callable[..., torch.Tensor]  # kernels.w8_matmul or kernels.w4_matmul
    prefill: torch.dtype = torch.float32  # what a prefill's GEMM multiplies in (set by the mode: apply_mode)
    invariant: bool = False  # a bfloat16 prefill that does not depend on the batch (autopatch.invariance)

    @classmethod
    def accepts(cls, linear: nn.Linear) -> bool:
        return kernels.packable(linear.in_features)

    bits: int  # the kernel's: 8 or 4
    _bound: kernels.Bound | None = None  # the kernel's call with this layer's weight, checked once (kernels.bind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        # Batch-invariant under a bfloat16 prefill: every call of more than one position per sequence (a prefill,
        # however few its rows) multiplies in the bfloat16 GEMM's fixed blocks, so a prompt's tokens get the same
        # arithmetic alone and in any batch; a decode step (one position) stays in the float32 kernel.
        invariant = self.invariant and self.prefill == torch.bfloat16 and x.dim() >= 3 and x.shape[-2] > 1
        q8 = self.prefill == kernels.Q8  # the int8-activation kernel at every row count
        if (rows.shape[0] <= kernels.GEMM_ROWS or q8) and not invariant and rows.is_cpu:  # as matmul would
            bound = self._bound
            if bound is None or not bound.binds(self.qweight, self.gscale, self.bias, q8):
                bound = self._bound = kernels.bind(self.bits, self.qweight, self.gscale, self.bias,
                                                   n=self.out_features, k=self.in_features, q8=q8)
            out = bound(rows)
        else:
            out = type(self).matmul(rows, self.qweight, self.gscale, self.bias, n=self.out_features,
                                    prefill=self.prefill, gemm=True if invariant else None, blocks=invariant)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def __getstate__(self) -> dict:
        """A copy or a pickle leaves the bound kernel call behind (a native handle; the copy binds its own)."""
        state = self.__dict__.copy()
        state.pop("_bound", None)
        return state


class WeightOnlyInt8Linear(PackedLinear):
    """int8 weights with one float32 scale per 32 weights of a row, float32 activations:
    :func:`autopatch.kernels.w8_matmul` on the kernel's packed panels (``qweight``, ``gscale``)."""

    matmul = staticmethod(kernels.w8_matmul)
    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        panels = kernels.panels(out_features)
        self.register_buffer("qweight", torch.zeros(panels, in_features // kernels.CHUNK, kernels.PANEL, kernels.CHUNK,
                                                    dtype=torch.int8))
        self.register_buffer("gscale", torch.zeros(panels, in_features // kernels.GROUP, kernels.PANEL))

    def _store(self, weight: torch.Tensor) -> None:
        q, scales = kernels.quantize_groups(weight)
        self.qweight.copy_(kernels.pack(q))
        self.gscale.copy_(kernels.pack_scales(scales))

    def dequantized_weight(self) -> torch.Tensor:
        return kernels.dequantize_groups(kernels.unpack(self.qweight, self.out_features),
                                         kernels.unpack_scales(self.gscale, self.out_features))


class WeightOnlyInt4Linear(PackedLinear):
    """4-bit weights ``a * q + b`` (q in 0..15, float32 ``a, b`` per 32 weights of a row), float32 activations:
    :func:`autopatch.kernels.w4_matmul` on packed panels (``qweight``, ``gscale``).

    It holds (:meth:`holds`) a weight that is already on a 4-bit grid, such as one dequantized from a GGUF
    Q4_K block, exactly (to float32 rounding); any other weight it would round, so
    :meth:`holds` accepts it only where its error is no larger than the int8 layer's on the same weight.
    """

    matmul = staticmethod(kernels.w4_matmul)
    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        panels, groups = kernels.panels(out_features), in_features // kernels.GROUP
        self.register_buffer("qweight", torch.zeros(panels, groups, kernels.PANEL, kernels.GROUP // 2,
                                                    dtype=torch.uint8))
        self.register_buffer("gscale", torch.zeros(panels, groups, 2, kernels.PANEL))

    @classmethod
    def holds(cls, weight: torch.Tensor) -> bool:
        rows = weight[:: max(1, weight.shape[0] // HOLDS_SAMPLE)]  # a GGUF tensor has one type throughout
        return _int4_error(rows) <= _int8_error(rows)

    def _store(self, weight: torch.Tensor) -> None:
        q, a, b = kernels.quantize_affine4(weight)
        self.qweight.copy_(kernels.pack4(q))
        self.gscale.copy_(kernels.pack4_scales(a, b))

    def dequantized_weight(self) -> torch.Tensor:
        return kernels.dequantize_affine4(kernels.unpack4(self.qweight, self.out_features),
                                          *kernels.unpack4_scales(self.gscale, self.out_features))


HOLDS_SAMPLE = 512  # rows of a weight that decide whether it is held at 4 bits


def _squared_error(weight: torch.Tensor, rebuilt: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """sum((rebuilt(rows) - rows)^2) over ``weight``, in slices of rows (no full-size float temporaries)."""
    total = 0.0
    for start in range(0, weight.shape[0], 4096):
        rows = weight[start : start + 4096].detach().float()
        total += float((rebuilt(rows) - rows).pow_(2).sum())
    return total


def _int8_error(weight: torch.Tensor) -> float:
    return _squared_error(weight, lambda rows: kernels.dequantize_groups(*kernels.quantize_groups(rows)))


def _int4_error(weight: torch.Tensor) -> float:
    return _squared_error(weight, lambda rows: kernels.dequantize_affine4(*kernels.quantize_affine4(rows)))


class DynamicInt8Linear(Int8Linear):
    """int8 weights per output channel and int8 activations, one scale per token: ``torch._int_mm`` (int32
    accumulation). Buffers: ``qweight`` int8 ``[out, in]``, ``wscale`` float32 ``[out]``."""

    qweight: torch.Tensor
    wscale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.ones(out_features, dtype=torch.float32))

    def _store(self, weight: torch.Tensor) -> None:
        q, scale = quantize_per_channel(weight)
        self.qweight.copy_(q)
        self.wscale.copy_(scale)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.wscale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        xq, xscale = quantize_per_token(rows)
        out = _int8_matmul(xq, self.qweight).float().mul_(xscale).mul_(self.wscale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [out, in], float32 scale [out])`` with ``weight ≈ q * scale[:, None]``."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.float()


def quantize_per_token(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [m, k], float32 scale [m, 1])``: one symmetric scale per row, so rows never share a scale."""
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    return torch.round(rows / scale).clamp_(-127, 127).to(torch.int8), scale


def _int8_matmul(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """int8 ``[m, k]`` @ int8 ``[n, k]``^T -> int32 ``[m, n]``, exact (int32 accumulation)."""
    return torch._int_mm(xq, qweight.t())
