"""Quantized CPU inference that keeps autopatch's hooks: int8 Linear layers swapped in place.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model("qwen2.5-coder-1.5b-instruct", quantize="int8")
    >>> from autopatch.quantize import QUANT_MODES, quantize_model
    >>> sorted(QUANT_MODES)
    ['int4', 'int4-all', 'int4-bf16', 'int4-q8', 'int4-q8-floatdown', 'int8', 'int8-bf16', 'int8-dynamic', 'int8-q8', 'none']
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
* ``int4-q8`` and ``int8-q8`` keep those weights (and their cache) and round every matmul's activations to int8
  with one scale per 32 inputs (llama.cpp's Q8_0), summed exactly in int32 with AVX2's byte multiplies
  (``kernels/q8.c``): on a CPU without bfloat16 units, faster than the float32-activation kernels at one row and
  than float32 GEMM at a prefill's, at an accuracy cost measured per model. Each row is rounded on its own, at
  every row count, so a row's product does not depend on its batch. ``int4-q8-floatdown`` keeps the MLP
  down-projections' inputs float32 (:attr:`QuantMode.float_inputs`), which holds the 1.5B's accuracy where
  rounding every input did not.
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
refused at once with the list of modes that work here. The layers they swap in: :mod:`autopatch.quantize_layers`.
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
from autopatch.quantize_layers import (
    DynamicInt8Linear,
    Int8Linear,
    PackedLinear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    _int8_matmul,
    quantize_per_channel,
    quantize_per_token,
)

logger = logging.getLogger("autopatch")

__all__ = ["QUANT_MODES", "DynamicInt8Linear", "Int8Linear", "PackedLinear", "QuantMode", "WeightOnlyInt4Linear",
           "WeightOnlyInt8Linear", "apply_mode", "available_modes", "check_mode", "default_mode", "model_quantization",
           "quantize_model", "quantize_per_channel", "quantize_per_token", "runs_on_cpu_float32", "source_cache_key"]


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode: which Linear layers become quantized, and into what.

    ``layers`` are tried in order for each Linear: it becomes the first that accepts it and holds its weight
    (:meth:`Int8Linear.holds`); the last one is the fallback and always holds. Empty: nothing is swapped.
    ``rounds``: the first layer that accepts the Linear, whether or not it holds the weight as closely as the
    next would (fewer bytes a step, at a measured cost in accuracy).
    ``prefill``: the dtype a prefill's matmuls multiply in (above :data:`autopatch.kernels.GEMM_ROWS` rows);
    ``torch.bfloat16`` needs :func:`kernels.fast_bfloat16`; :data:`autopatch.kernels.Q8` rounds every matmul's
    activations to int8, at any row count.
    ``weights``: the mode whose quantized weights this one shares (and whose cache it reads), where only
    ``prefill`` differs.
    ``default_where``: where a model's default list (:func:`default_mode`) may pick this mode, the machines it was
    measured faster on; ``None``: wherever it runs. An explicit request runs it wherever :func:`check_mode` allows.
    ``float_inputs``: in a rounding mode (``prefill`` :data:`~autopatch.kernels.Q8`), the Linear layers (by their
    last name, such as ``"up_proj"``) whose activations stay float32, multiplied as in the weights' mode.
    """

    name: str
    description: str
    layers: tuple[type[Int8Linear], ...]
    quantize_head: bool = True  # the LM head too (on small models, most of the bytes a decode step reads)
    rounds: bool = False
    prefill: torch.dtype = torch.float32
    weights: str | None = None
    default_where: Callable[[], bool] | None = None
    float_inputs: tuple[str, ...] = ()

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

    def with_q8_activations(self, float_inputs: tuple[str, ...] = (), suffix: str = "") -> QuantMode:
        """This mode's weights (and cache), every product's activations rounded to int8 per 32: ``<name>-q8``;
        with ``float_inputs``, those layers' activations kept float32: ``<name>-q8<suffix>``."""
        kept = f", except the inputs of {' and '.join(float_inputs)} (float32, as {self.name})" if float_inputs else ""
        return replace(self, name=f"{self.name}-q8{suffix}", prefill=kernels.Q8, weights=self.name,
                       default_where=_no_avx512, float_inputs=float_inputs,
                       description=f"{self.name}'s weights; every matmul's activations rounded to int8 with a scale "
                                   f"per 32 inputs (llama.cpp's Q8_0) and summed in int32 (AVX2 or AVX512-VNNI), at "
                                   f"any row count{kept}")

    def prefill_of(self, name: str, head: bool = False) -> torch.dtype:
        """What the packed layer called ``name`` multiplies a prefill in (``head``: the model's LM head)."""
        if self.prefill == torch.bfloat16 and head:
            # the LM head's logits over many positions (scoring, a logit lens) keep float32's precision; int8
            # activations, summed exactly in int32, are far closer to it than bfloat16's rounded products
            return torch.float32
        return torch.float32 if name.rpartition(".")[2] in self.float_inputs else self.prefill

    def layer_for(self, linear: nn.Linear) -> type[Int8Linear]:
        """The layer class ``linear`` becomes."""
        fitting = [layer for layer in self.layers if layer.accepts(linear)]
        weight = linear.weight.detach()
        return next((layer for layer in fitting[:-1] if self.rounds or layer.holds(weight)), fitting[-1])


def _no_avx512() -> bool:
    """Where the ``-q8`` modes decode faster than the modes before them in a default list: a CPU without AVX-512
    (an AMD EPYC Zen 3). On an AVX-512 Zen 4, with q8.c's VNNI path, they decoded slower than the ``-bf16`` modes
    (docs/quantization.md)."""
    return not kernels.avx512()


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
        _INT8.with_q8_activations(),
        _INT4.with_q8_activations(),
        # the MLP down-projection's inputs (after the gate's SiLU: the most peaked) stay float32: of the layers whose
        # inputs were kept float on the 1.5B's dev questions, the one that brought int4-q8 closest to int4
        # (bench/q8_variants.py, docs/quantization.md)
        _INT4.with_q8_activations(("down_proj",), suffix="-floatdown"),
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
    if mode.prefill == torch.bfloat16 and not kernels.fast_bfloat16():
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
    defaults (:attr:`autopatch.models.EmbeddedModel.cpu_quantize`) this machine can run and that mode's
    :attr:`QuantMode.default_where` allows, on the CPU in float32, else ``"none"``. Any other model stays float32
    unless asked: its accuracy under int8 was never measured.
    """
    from autopatch.models import DEFAULT_MODEL, embedded_model

    spec = embedded_model(str(name_or_path) if name_or_path is not None else DEFAULT_MODEL)
    if spec is None or not runs_on_cpu_float32(device, dtype):
        return "none"
    modes = (QUANT_MODES[name] for name in spec.cpu_quantize if name in QUANT_MODES)
    runnable = (mode.name for mode in modes
                if _why_not(mode) is None and (mode.default_where is None or mode.default_where()))
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
    (:func:`model_quantization`) and the dtype each packed layer's prefill multiplies in. Keys and values the
    prefix cache kept under another mode's arithmetic are forgotten."""
    from autopatch.prefix_cache import clear_prefix_cache

    clear_prefix_cache(model, keep_registered=True)
    config = getattr(model, "config", None)
    if config is not None:
        config.autopatch_quantize = mode.name
    outputs = getattr(model, "get_output_embeddings", None)
    head = outputs() if callable(outputs) else None
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            module.prefill = mode.prefill_of(name, head=module is head)


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
