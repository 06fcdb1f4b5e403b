"""Quantized CPU inference that keeps autopatch's hooks: int8 Linear layers swapped in place.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model("qwen2.5-coder-1.5b-instruct", quantize="int8")
    >>> from autopatch.quantize import QUANT_MODES, quantize_model
    >>> sorted(QUANT_MODES)
    ['int8', 'int8-dynamic', 'none']
    >>> quantize_model(float_model, "int8")      # in place; returns how many Linear layers it swapped

Why this design (measured in docs/quantization.md):

* Decoding is bound by memory traffic, so the weights must be int8 *and* the matmul must read them as int8.
  Weight-only int8 and int4 kernels on the CPU (``aten._weight_int8pack_mm``,
  ``aten._weight_int4pack_mm_for_cpu``, torchao's weight-only configs in eager) dequantize on the fly and
  ran 4-12x slower than float32 here, so the int8 modes quantize the activations too (W8A8).
* Activations are quantized **per token** (one scale per row, symmetric int8), weights per output channel.
  torch's ``quantize_dynamic`` takes one scale for the whole activation tensor: one token with a massive
  activation (the attention sink at the first position of Qwen-style models) then sets the scale of every
  other token in the prefill, and a row's answer depends on what else is in its batch. Per-token scales and
  int32 accumulation keep each row independent of the batch it is in.
* Only ``nn.Linear`` layers inside the decoder blocks (and, by mode, the LM head) change; block outputs,
  the residual stream, norms and embeddings stay float32, so :func:`autopatch.engine.capture`,
  :func:`~autopatch.engine.patch`, the Patchscopes and every strategy see the tensors they always saw, and
  the embeddings that :func:`~autopatch.fingerprint.model_fingerprint` hashes are untouched (the shipped
  profile, gate and screen still resolve).

Modes are one declarative table (:data:`QUANT_MODES`); an unknown mode, or one this machine cannot run, is
refused at once with the list of modes that work here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from autopatch.errors import ConfigError

__all__ = ["QUANT_MODES", "Int8Linear", "QuantMode", "available_modes", "check_mode", "quantize_model"]


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 per output channel and ``x`` quantized per token.

    Example:
        >>> q = Int8Linear.from_linear(nn.Linear(64, 32))
        >>> q(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])

    The weight lives in buffers (``qweight`` int8 ``[out, in]``, ``wscale`` float32 ``[out]``), so the module
    round-trips through ``state_dict`` and safetensors without pickling.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.ones(out_features, dtype=torch.float32))
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize ``linear``'s weight symmetrically per output channel (scale = absmax / 127)."""
        weight = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        qweight, wscale = quantize_per_channel(weight)
        q.qweight.copy_(qweight)
        q.wscale.copy_(wscale)
        if linear.bias is not None and q.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        return q

    activations: str = "float"  # "float": weight-only (the C kernel); "int8": per-token int8 (torch._int_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float().contiguous()
        if self.activations == "int8":
            xq, xscale = quantize_per_token(rows)
            out = _int8_matmul(xq, self.qweight).float().mul_(xscale).mul_(self.wscale)
            if self.bias is not None:
                out.add_(self.bias)
        else:
            out = weight_only_matmul(rows, self.qweight, self.wscale, self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer multiplies by (for checks and for the logit lens on a weight)."""
        return self.qweight.float() * self.wscale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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


def weight_only_matmul(rows: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[m, k]`` by the int8 weight ``[n, k]``: the activations are never quantized."""
    from autopatch.kernels import w8_matmul

    return w8_matmul(rows, qweight, wscale, None if bias is None else bias.detach())


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode: which Linear layers become int8, and how their activations are multiplied."""

    name: str
    description: str
    activations: str = "float"  # "float": weight-only int8 (the C kernel); "int8": per-token int8 (torch._int_mm)
    quantize_head: bool = True  # the LM head too (on small models, most of the bytes a decode step reads)

    @property
    def is_float(self) -> bool:
        return self.name == "none"


QUANT_MODES: dict[str, QuantMode] = {
    m.name: m
    for m in (
        QuantMode("none", "float32 weights and activations (the reference)"),
        QuantMode("int8", "int8 weights per output channel, float32 activations (autopatch's C kernel), "
                          "in every decoder block and the LM head"),
        QuantMode("int8-dynamic", "int8 weights per channel and int8 activations per token (torch._int_mm): "
                                  "faster prefill, lower accuracy", activations="int8"),
    )
}


@functools.lru_cache(maxsize=1)
def _int_mm_error() -> str | None:
    """``None`` when ``torch._int_mm`` runs on this CPU and is exact, else why not."""
    try:
        a = torch.tensor([[1, -2, 3, 127]], dtype=torch.int8)
        b = torch.tensor([[2, 2, -1, 1], [-127, 0, 0, 1]], dtype=torch.int8)
        got = _int8_matmul(a, b)
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        return f"torch {torch.__version__} has no int8 matmul on this CPU ({err})"
    if got.tolist() != [[122, 0]]:
        return f"torch {torch.__version__}'s int8 matmul gave {got.tolist()} on a known product"
    return None


@functools.lru_cache(maxsize=1)
def _kernel_error() -> str | None:
    from autopatch.kernels import kernel_error

    return kernel_error()


def _why_not(mode: QuantMode) -> str | None:
    if mode.is_float:
        return None
    return _int_mm_error() if mode.activations == "int8" else _kernel_error()


def available_modes() -> list[str]:
    """The modes this machine can run, in table order."""
    return [name for name, mode in QUANT_MODES.items() if _why_not(mode) is None]


def check_mode(mode: str | None) -> QuantMode:
    """The :class:`QuantMode` called ``mode`` (``None`` is ``"none"``), or a :class:`ConfigError` naming what works."""
    spec = QUANT_MODES.get(mode or "none")
    if spec is None:
        raise ConfigError(f"Unknown quantization mode {mode!r}; modes that work on this machine: "
                          f"{', '.join(available_modes())}.")
    why_not = _why_not(spec)
    if why_not is not None:
        raise ConfigError(f"Quantization mode {spec.name!r} cannot run here: {why_not}. Modes that work on this "
                          f"machine: {', '.join(available_modes())}.")
    return spec


def quantizable_linears(model: nn.Module, mode: QuantMode) -> list[str]:
    """Names of the ``nn.Linear`` modules ``mode`` swaps: those in the decoder blocks, and the head if it says so."""
    from autopatch.architectures import architecture_spec, get_module

    spec = architecture_spec(model)
    layers = get_module(model, spec.layers)
    head = get_module(model, spec.unembedding)
    block_ids = {id(m) for m in layers.modules()} if layers is not None else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module) in block_ids or (mode.quantize_head and module is head):
            names.append(name)
    return names


def quantize_model(model: nn.Module, mode: str | QuantMode) -> int:
    """Swap ``model``'s Linear layers for :class:`Int8Linear` per ``mode``, in place; returns how many.

    The input embeddings are never touched (a tied LM head is untied first, so the embeddings keep float32).
    """
    spec = mode if isinstance(mode, QuantMode) else check_mode(mode)
    if spec.is_float:
        return 0
    names = quantizable_linears(model, spec)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = Int8Linear.from_linear(getattr(parent, child))
        quantized.activations = spec.activations
        setattr(parent, child, quantized)
    if names:
        config = getattr(model, "config", None)
        if config is not None:
            config.autopatch_quantize = spec.name
    return len(names)


def model_quantization(model: nn.Module) -> str:
    """The mode ``model`` was quantized with (``"none"`` for a float model)."""
    return str(getattr(getattr(model, "config", None), "autopatch_quantize", "none"))
