"""Quantized CPU inference that keeps autopatch's hooks: int8 Linear layers swapped in place.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model("qwen2.5-coder-1.5b-instruct", quantize="int8")
    >>> from autopatch.quantize import QUANT_MODES, quantize_model
    >>> sorted(QUANT_MODES)
    ['int4', 'int4-all', 'int4-bf16', 'int8', 'int8-bf16', 'int8-dynamic', 'none']
    >>> quantize_model(float_model, "int8")      # in place; returns how many Linear layers it swapped

Why this design (measured in docs/quantization.md):

* Decoding is bound by memory traffic, so the weights must be int8 *and* the matmul must read them as int8.
  torch's weight-only int8 and int4 CPU kernels (``aten._weight_int8pack_mm``,
  ``aten._weight_int4pack_mm_for_cpu``) ran slower than float32 here; its fast int8 kernels quantize the
  activations too, and that is what costs accuracy (``bench/quant_variants.py``: rounding only the weights left
  the 1.5B's answers as they were; rounding only the activations changed one in six).
* So ``int8`` keeps the activations float32 and gives the weights one scale per 32 weights of a row (the width
  of the GGUF Q4_K blocks the embedded weights were dequantized from), multiplied by autopatch's own kernel
  (:mod:`autopatch.kernels`).
* ``int4`` holds a weight at 4 bits (``a * q + b``, float32 ``a, b`` per 32 weights of a row) where that is at
  least as faithful as int8, which is exactly where the weight already was 4-bit (the GGUF Q4_K tensors the
  embedded models ship), and in int8 elsewhere (their Q5/Q6/Q8 tensors); a float model the user trained
  mostly stays int8. It halves the bytes a decode step reads from the Q4_K tensors, losing nothing.
* ``int4-all`` puts the other tensors at 4 bits too (the GGUF Q6_K ones: the LM head, half of the MLP
  down-projections and of the value projections), rounding them: fewer bytes a step than ``int4``, at a cost measured per model.
* ``int4-bf16`` and ``int8-bf16`` keep those weights (and their cache) and multiply a prefill (above
  :data:`autopatch.kernels.GEMM_ROWS` rows, where the matmul is compute-bound) in bfloat16, on the CPU's bfloat16
  units (AMX, AVX512-BF16): several times faster than float32, with the answers of the float32-activation modes
  (docs/quantization.md). A decode step stays float32. Refused on a CPU without those units, where it is slower.
* ``int8-dynamic`` quantizes the activations too, **per token** (one scale per row), weights per output
  channel, through ``torch._int_mm``: a faster prefill at a measured loss of accuracy. (torch's
  ``quantize_dynamic`` takes one scale for the whole activation tensor, so one token with an outlying
  activation sets the scale of every other token, and a row's answer depends on the rest of its batch.)
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
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from autopatch import kernels
from autopatch.errors import ConfigError
from autopatch.quantize_cache import read_cache, source_cache_key, write_cache

logger = logging.getLogger("autopatch")

__all__ = ["QUANT_MODES", "DynamicInt8Linear", "Int8Linear", "PackedLinear", "QuantMode", "WeightOnlyInt4Linear",
           "WeightOnlyInt8Linear", "apply_mode", "available_modes", "check_mode", "default_mode", "model_quantization",
           "quantize_model", "runs_on_cpu_float32", "source_cache_key"]


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
        invariant = self.invariant and self.prefill != torch.float32 and x.dim() >= 3 and x.shape[-2] > 1
        if rows.shape[0] <= kernels.GEMM_ROWS and not invariant and rows.is_cpu:  # the kernel, as matmul would
            bound = self._bound
            if bound is None or not bound.binds(self.qweight, self.gscale, self.bias):
                bound = self._bound = kernels.bind(self.bits, self.qweight, self.gscale, self.bias,
                                                   n=self.out_features, k=self.in_features)
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


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode: which Linear layers become quantized, and into what.

    ``layers`` are tried in order for each Linear: it becomes the first that accepts it and holds its weight
    (:meth:`Int8Linear.holds`); the last one is the fallback and always holds. Empty: nothing is swapped.
    ``rounds``: the first layer that accepts the Linear, whether or not it holds the weight as closely as the
    next would (fewer bytes a step, at a measured cost in accuracy).
    ``prefill``: the dtype a prefill's matmuls multiply in (above :data:`autopatch.kernels.GEMM_ROWS` rows);
    ``torch.bfloat16`` needs :func:`kernels.fast_bfloat16`.
    ``weights``: the mode whose quantized weights this one shares (and whose cache it reads), where only
    ``prefill`` differs.
    """

    name: str
    description: str
    layers: tuple[type[Int8Linear], ...]
    quantize_head: bool = True  # the LM head too (on small models, most of the bytes a decode step reads)
    rounds: bool = False
    prefill: torch.dtype = torch.float32
    weights: str | None = None

    @property
    def is_float(self) -> bool:
        return not self.layers

    @property
    def cache_name(self) -> str:
        """The name its quantized weights are cached under (shared by the modes with the same weights)."""
        return self.weights or self.name

    def with_bf16_prefill(self) -> QuantMode:
        """This mode's weights (and cache), a prefill's matmuls in bfloat16: ``<name>-bf16``."""
        return replace(self, name=f"{self.name}-bf16", prefill=torch.bfloat16, weights=self.name,
                       description=f"{self.name}'s weights; a prefill's matmuls in bfloat16 on the CPU's bfloat16 "
                                   f"units (AMX or AVX512-BF16; refused elsewhere), decode steps as {self.name}")

    def layer_for(self, linear: nn.Linear) -> type[Int8Linear]:
        """The layer class ``linear`` becomes."""
        fitting = [layer for layer in self.layers if layer.accepts(linear)]
        weight = linear.weight.detach()
        return next((layer for layer in fitting[:-1] if self.rounds or layer.holds(weight)), fitting[-1])


_INT8 = QuantMode("int8", "int8 weights with a scale per 32 weights of a row, float32 activations (autopatch's C "
                          "kernel), in every decoder block and the LM head", (WeightOnlyInt8Linear,))
_INT4 = QuantMode("int4", "4-bit weights (a scale and offset per 32) wherever they hold the weight at least as closely "
                          "as int8 would (a GGUF Q4_K tensor: exactly), int8 elsewhere; float32 activations",
                  (WeightOnlyInt4Linear, WeightOnlyInt8Linear))
QUANT_MODES: dict[str, QuantMode] = {
    m.name: m
    for m in (
        QuantMode("none", "float32 weights and activations (the reference)", ()),
        _INT8,
        _INT4,
        QuantMode("int4-all", "4-bit weights (a scale and offset per 32) in every Linear that takes them, rounding "
                              "the ones int8 would hold more closely (a GGUF Q6_K tensor: the LM head, half of the "
                              "MLP down- and value projections); int8 elsewhere; float32 activations",
                  (WeightOnlyInt4Linear, WeightOnlyInt8Linear), rounds=True),
        _INT8.with_bf16_prefill(),
        _INT4.with_bf16_prefill(),
        QuantMode("int8-dynamic", "int8 weights per channel and int8 activations per token (torch._int_mm): "
                                  "faster prefill, lower accuracy", (DynamicInt8Linear,)),
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
    return kernels.kernel_error()


def _why_not(mode: QuantMode) -> str | None:
    if mode.is_float:
        return None
    if DynamicInt8Linear in mode.layers:
        return _int_mm_error()
    if mode.prefill != torch.float32 and not kernels.fast_bfloat16():
        return ("this CPU has no bfloat16 matrix units (AMX or AVX512-BF16), so a bfloat16 prefill would be slower "
                "than float32 here")
    return _kernel_error()


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


def runs_on_cpu_float32(device: object = None, dtype: object = None) -> bool:
    """Whether ``load_model``'s ``device`` and ``dtype`` leave the model where the int8 modes run: the CPU, float32."""
    return (device is None or str(device) == "cpu") and dtype in (None, "float32", torch.float32)


def default_mode(name_or_path: object = None, device: object = None, dtype: object = None) -> str:
    """The mode ``load_model`` uses when ``quantize`` is not given: the first of the embedded model's measured CPU
    defaults (:attr:`autopatch.models.EmbeddedModel.cpu_quantize`) this machine can run, on the CPU in float32,
    else ``"none"``. Any other model stays float32 unless asked: its accuracy under int8 was never measured.
    """
    from autopatch.models import DEFAULT_MODEL, embedded_model

    spec = embedded_model(str(name_or_path) if name_or_path is not None else DEFAULT_MODEL)
    if spec is None or not runs_on_cpu_float32(device, dtype):
        return "none"
    runnable = (name for name in spec.cpu_quantize if name in QUANT_MODES and _why_not(QUANT_MODES[name]) is None)
    return next(runnable, "none")


def quantizable_linears(model: nn.Module, mode: QuantMode) -> list[str]:
    """Names of the ``nn.Linear`` modules ``mode`` swaps: those in the decoder blocks, and the head if it says so."""
    from autopatch.architectures import architecture_spec, get_module

    spec = architecture_spec(model)
    layers = get_module(model, spec.layers)
    head = get_module(model, spec.unembedding)
    block_ids = {id(m) for m in layers.modules()} if layers is not None else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(layer.accepts(module) for layer in mode.layers):
            continue
        if id(module) in block_ids or (mode.quantize_head and module is head):
            names.append(name)
    return names


def quantize_model(model: nn.Module, mode: str | QuantMode, *, cache_key: str | None = None) -> int:
    """Swap ``model``'s Linear layers for int8 layers per ``mode``, in place; returns how many.

    The input embeddings are never touched (a tied LM head is untied: the head becomes int8, the embeddings
    keep float32). With ``cache_key`` (a string naming these exact weights, see :func:`source_cache_key`), the
    int8 weights are read from, or written to, ``$AUTOPATCH_QUANTIZED_CACHE``, else ``cache_dir()/quantized/``,
    as safetensors with a SHA-256 manifest: a later load skips the quantization, and a file that fails its
    checksum is rebuilt, never used.
    """
    spec = mode if isinstance(mode, QuantMode) else check_mode(mode)
    if spec.is_float:
        return 0
    names = quantizable_linears(model, spec)
    started = time.perf_counter()
    cached = read_cache(cache_key, spec.cache_name, [layer.__name__ for layer in spec.layers], names) if cache_key else None
    if cached is not None:
        state, kind = cached
        swapped = empty_layers(model, names, spec, kind)
        for name, layer in swapped.items():
            layer.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
    else:
        swapped = {}
        for name in names:
            linear = cast(nn.Linear, model.get_submodule(name))
            swapped[name] = cast(Int8Linear, _replace(model, name, spec.layer_for(linear).from_linear(linear)))
    if cache_key and cached is None and swapped:
        write_cache(cache_key, spec.cache_name, swapped)
        print(f"autopatch: quantized {len(swapped)} layers to {spec.name} once and cached them "
              f"(+{time.perf_counter() - started:.0f}s; later loads read the cache)", file=sys.stderr, flush=True)
    if swapped:
        apply_mode(model, spec)
        counts = {kind.__name__: sum(type(layer) is kind for layer in swapped.values()) for kind in spec.layers}
        if len(spec.layers) > 1:
            logger.info("autopatch: %s: %s", spec.name, ", ".join(f"{n} {k}" for k, n in counts.items()))
    return len(swapped)


def apply_mode(model: nn.Module, mode: QuantMode) -> None:
    """Mark ``model`` (its quantized layers already in place) as quantized by ``mode``: the config's record
    (:func:`model_quantization`) and the dtype each packed layer's prefill multiplies in."""
    config = getattr(model, "config", None)
    if config is not None:
        config.autopatch_quantize = mode.name
    outputs = getattr(model, "get_output_embeddings", None)
    head = outputs() if callable(outputs) else None
    for module in model.modules():
        if isinstance(module, PackedLinear):
            # the LM head's logits over many positions (scoring, a logit lens) keep float32's precision
            module.prefill = torch.float32 if module is head else mode.prefill


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return module


def empty_layers(model: nn.Module, names: list[str], mode: QuantMode, kinds: dict[str, str]) -> dict[str, Int8Linear]:
    """Replace each Linear in ``names`` by a zeroed layer of its class in ``kinds`` (one of ``mode``'s), to be filled
    from a cached state; returns them by name."""
    classes = {layer.__name__: layer for layer in mode.layers}
    swapped: dict[str, Int8Linear] = {}
    for name in names:
        linear = cast(nn.Linear, model.get_submodule(name))
        layer = classes[kinds[name]](linear.in_features, linear.out_features, bias=linear.bias is not None)
        swapped[name] = cast(Int8Linear, _replace(model, name, layer))
    return swapped


def model_quantization(model: nn.Module) -> str:
    """The mode ``model`` was quantized with (``"none"`` for a float model)."""
    return str(getattr(getattr(model, "config", None), "autopatch_quantize", "none"))
