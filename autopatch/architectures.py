"""Where each architecture keeps its decoder blocks, final norm and unembedding.

Example:
    >>> from autopatch.architectures import decoder_layers, final_norm, unembedding
    >>> layers = decoder_layers(model)          # nn.ModuleList of blocks
    >>> h_final = final_norm(model)(h)          # the norm applied before the LM head
    >>> logits = unembedding(model)(h_final)

One declarative table (:data:`ARCHITECTURES`) maps an HF ``model_type`` to the
dotted attribute paths of those three modules. Nothing else in autopatch branches
on ``model_type``. Unknown types fall back to probing the common paths in
:data:`FALLBACK_CANDIDATES`; if none fits, the error lists every path tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from torch import nn

from autopatch.errors import UnsupportedArchitectureError

Paths = str | tuple[str, ...]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Dotted attribute paths, relative to the ``*ForCausalLM`` model.

    A field may list alternatives (a tuple) where transformers versions differ;
    the first path that exists wins.
    """

    layers: Paths
    final_norm: Paths
    unembedding: Paths

    def describe(self) -> str:
        """One line naming every path, for error messages."""
        return f"layers={self.layers}, norm={self.final_norm}, unembedding={self.unembedding}"


_LLAMA_LIKE = ArchitectureSpec("model.layers", "model.norm", "lm_head")
_GPT2_LIKE = ArchitectureSpec("transformer.h", "transformer.ln_f", "lm_head")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": ArchitectureSpec("model.language_model.layers", "model.language_model.norm", "lm_head"),
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "phi": ArchitectureSpec("model.layers", "model.final_layernorm", "lm_head"),
    "gpt2": _GPT2_LIKE,
    "gptj": _GPT2_LIKE,
    "gpt_neo": _GPT2_LIKE,
    "bloom": ArchitectureSpec("transformer.h", "transformer.ln_f", "lm_head"),
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", ("embed_out", "lm_head")),
    "opt": ArchitectureSpec("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head"),
    "falcon": ArchitectureSpec("transformer.h", "transformer.ln_f", "lm_head"),
}

FALLBACK_CANDIDATES: tuple[ArchitectureSpec, ...] = (
    _LLAMA_LIKE,
    _GPT2_LIKE,
    ARCHITECTURES["gpt_neox"],
    ARCHITECTURES["opt"],
    ARCHITECTURES["gemma3"],
    ArchitectureSpec("model.language_model.model.layers", "model.language_model.model.norm", "lm_head"),
)


def get_module(model: nn.Module, paths: Paths) -> nn.Module | None:
    """Follow the first dotted attribute path that exists; ``None`` when none does."""
    for path in (paths,) if isinstance(paths, str) else paths:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            return obj
    return None


def _fits(model: nn.Module, spec: ArchitectureSpec) -> bool:
    layers = get_module(model, spec.layers)
    return (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and get_module(model, spec.final_norm) is not None
        and get_module(model, spec.unembedding) is not None
    )


def architecture_spec(model: nn.Module) -> ArchitectureSpec:
    """Return the spec for ``model``: the table entry for its type, else the first fallback that fits."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type) if model_type else None
    if spec is not None and _fits(model, spec):
        return spec
    tried = ([spec] if spec is not None else []) + list(FALLBACK_CANDIDATES)
    for candidate in FALLBACK_CANDIDATES:
        if _fits(model, candidate):
            return candidate
    paths = "; ".join(s.describe() for s in tried)
    raise UnsupportedArchitectureError(
        f"Cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}). "
        f"Tried: {paths}. Add an entry for this model_type to "
        "autopatch.architectures.ARCHITECTURES with the right attribute paths."
    )


def _resolve(model: nn.Module, part: str) -> nn.Module:
    """The module at ``part`` ("layers", "final_norm" or "unembedding") of the model's spec."""
    spec = architecture_spec(model)
    module = get_module(model, getattr(spec, part))
    if module is None or (part == "layers" and not isinstance(module, nn.ModuleList)):
        # architecture_spec only returns a spec whose paths fit, so this means the model changed in between
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no {part} module at {getattr(spec, part)!r} ({spec.describe()}); "
            "fix its entry in autopatch.architectures.ARCHITECTURES."
        )
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    return cast(nn.ModuleList, _resolve(model, "layers"))  # _resolve checked that it is one


def num_layers(model: nn.Module) -> int:
    """How many decoder blocks the model has."""
    return len(decoder_layers(model))


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the unembedding."""
    return _resolve(model, "final_norm")


def unembedding(model: nn.Module) -> nn.Module:
    """The LM head that maps normed hidden states to logits."""
    return _resolve(model, "unembedding")
