"""Gate features: hidden states at the located positions plus cheap signals of the vanilla prefill.

Example:
    >>> from classifiers.features import FeatureSpec, extract_features
    >>> spec = FeatureSpec(layers=(6, 9), positions=("span_end", "last"))
    >>> ids, X, located = extract_features(model, tok, records, spec)   # training features
    >>> x = spec.vector(gate_input)                                      # the same features at inference

Everything here is computed from the one vanilla prefill that
``AutoPatcher.generate`` runs anyway, so the gate adds no forward pass:

* ``states``: block outputs at ``layers`` x ``positions`` (concatenated; the
  gate's pipeline scales and reduces them with PCA fitted on training data);
* ``scalars``: the vanilla first token's probability, the entropy of the
  first-token distribution, and the top-1/top-2 probability margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from autopatch.errors import ConfigError
from autopatch.gating import POSITION_KINDS, GateInput
from autopatch.plan import Planner
from autopatch.prefill import capture_prefill
from autopatch.prefix_cache import register_prefix
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.resolve import model_profile

SCALARS = ("first_token_prob", "first_token_entropy", "first_token_margin")


@dataclass(frozen=True)
class FeatureSpec:
    """Which features the gate reads; saved with the gate so inference matches training."""

    layers: tuple[int, ...] = (6, 9)
    positions: tuple[str, ...] = ("span_end", "last")
    use_states: bool = True
    use_scalars: bool = True

    def __post_init__(self) -> None:
        unknown = [p for p in self.positions if p not in POSITION_KINDS]
        if unknown:
            raise ConfigError(f"Unknown gate feature positions {unknown}; choose from {list(POSITION_KINDS)}.")
        if not (self.use_states or self.use_scalars):
            raise ConfigError("A gate needs features: set use_states or use_scalars.")
        if self.use_states and not (self.layers and self.positions):
            raise ConfigError("Gate state features need at least one layer and one position "
                              f"(got layers={list(self.layers)}, positions={list(self.positions)}).")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"], data["positions"] = list(self.layers), list(self.positions)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        return cls(tuple(data["layers"]), tuple(data["positions"]), bool(data["use_states"]), bool(data["use_scalars"]))

    def width(self, hidden_size: int) -> int:
        """The length of the feature vector on a model with ``hidden_size``."""
        states = len(self.layers) * len(self.positions) * hidden_size if self.use_states else 0
        return states + (len(SCALARS) if self.use_scalars else 0)

    def vector(self, gate_input: GateInput) -> np.ndarray:
        """The feature vector of one row at inference time."""
        states = {layer: gate_input.states[layer] for layer in self.layers}
        return self._vector(states, gate_input.first_token_logits)

    def _vector(self, states: dict[int, torch.Tensor], logits: torch.Tensor) -> np.ndarray:
        parts: list[np.ndarray] = []
        if self.use_states:
            for layer in self.layers:
                for kind in self.positions:
                    parts.append(states[layer][POSITION_KINDS.index(kind)].float().cpu().numpy())
        if self.use_scalars:
            parts.append(scalar_signals(logits))
        return np.concatenate(parts).astype(np.float64)


def scalar_signals(logits: torch.Tensor) -> np.ndarray:
    """First-token probability, entropy and top-1/top-2 margin of the vanilla answer."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, 2).values
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return np.array([float(top[0]), float(entropy), float(top[0] - top[1])])


@torch.no_grad()
def extract_features(model, tok, records, spec: FeatureSpec, *, profile: PatchProfile | None = None,
                     batch_size: int = 16) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Features of each record's vanilla prefill, exactly as AutoPatcher computes them at inference.

    Returns ``(ids, X, located)``; rows of unlocated questions are zeros with ``located`` False.
    """
    fmt = _format(model, tok, profile)
    questions = [r.question for r in records]
    texts = [fmt.render(q, tok) for q in questions]
    return ([r.id for r in records], *_prefill_features(model, tok, fmt, texts, questions, spec, batch_size))


@torch.no_grad()
def extract_prompt_features(model, tok, prompts: Sequence[str], questions: Sequence[str], spec: FeatureSpec, *,
                            profile: PatchProfile | None = None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_features` for prompts already rendered (a chat request, say), with the question each holds."""
    return _prefill_features(model, tok, _format(model, tok, profile), prompts, questions, spec, batch_size)


def _format(model, tok, profile: PatchProfile | None) -> PromptFormat:
    """The prompt format of ``profile`` (else the model's shipped profile), its fixed start registered for reuse
    as an AutoPatcher would register it."""
    fmt = (profile or model_profile(model, tok)).prompt_format
    register_prefix(model, fmt.fixed_prefix(tok))
    return fmt


def _prefill_features(model, tok, fmt: PromptFormat, texts: Sequence[str], questions: Sequence[str],
                      spec: FeatureSpec, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and located flags, batch by batch, from the one prefill path (plan, then capture)."""
    rows: list[np.ndarray] = []
    located: list[bool] = []
    planner, device = Planner(tok, fmt), next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        enc = fmt.encode(tok, texts[start : start + batch_size]).to(device)
        batch = list(questions[start : start + batch_size])
        ids, plans, positions = planner.batch(enc.input_ids, enc.attention_mask, batch)
        with capture_prefill(model, tok.pad_token_id, ids, plans, positions, list(spec.layers), enc.attention_mask,
                             reuse_prefix=True) as pre:
            logits = pre.forward(model, enc.input_ids, enc.attention_mask, logits_to_keep=1).logits[:, -1]
        for i, plan in enumerate(pre.plans):
            located.append(bool(plan.positions))
            rows.append(spec._vector({l: pre.states[l][i] for l in spec.layers}, logits[i]))
    return np.stack(rows), np.array(located)
