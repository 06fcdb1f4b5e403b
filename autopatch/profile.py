"""Patch profiles: every choice of how to patch one model, typed and serialisable.

Example:
    >>> from autopatch.profile import PatchProfile
    >>> profile = PatchProfile(strategy="reroute", source_position="span_end", source_layer=8, target_layer=4)
    >>> profile.save("my_model.profile.json")
    >>> PatchProfile.load("my_model.profile.json") == profile
    True
    >>> PatchProfile.shipped_for(model)   # the profile shipped for this very model, or None

Strategies (Patchscopes, Ghandeharioun et al. 2024; Auto-Patch, Jan et al. 2025; back-patching, "Hopping Too Late",
Biran et al. 2024):

* ``reroute`` (Patchscopes §5): the state at (``source_layer``, ``source_position``
  of the query) overwrites (``target_layer``, the placeholder) of a fresh prompt
  that asks only the second hop; the answer is generated from that prompt.
* ``backpatch`` (Auto-Patch, Hopping Too Late): the same query prompt, from
  ``source_layer`` to an earlier ``target_layer`` at the same position.
* ``verbalize``: the state is decoded into words by a Patchscope (patched at
  ``target_layer``), the words fill the second-hop slot, and the model answers
  that explicit question. ``bridge_prompt`` picks the decoding prompt:
  ``identity`` (``cat -> cat; ...; ? ->``) or ``span`` (the first-hop span asked
  as a question with the placeholder where its subject was, "What is the
  country where the x is located?": an attribute-extraction Patchscope).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Literal

from autopatch import registry
from autopatch.errors import ProfileError
from autopatch.prompts import PromptFormat
from autopatch.registry import DECOMPOSERS as DECOMPOSERS  # re-exported beside the profile's field
from autopatch.registry import Decomposer as Decomposer

Strategy = str  # a name registered in autopatch.registry.STRATEGIES


class Position(str, Enum):
    """A token of the located question whose state is read: the first hop's last token, its subject's last token,
    or the prompt's last token. The order is the order of the captured states (``GateInput.states`` rows)."""

    SPAN_END = "span_end"
    SUBJECT_END = "subject_end"
    LAST = "last"

    def __str__(self) -> str:  # its name in JSON, sweep keys and f-strings, on every Python (no StrEnum in 3.10)
        return self.value

    @property
    def inside_first_hop(self) -> bool:
        return self is not Position.LAST


BridgePrompt = Literal["identity", "span"]
BRIDGE_PROMPTS: tuple[str, ...] = ("identity", "span")
PROFILE_VERSION = 1


@dataclass(frozen=True)
class PatchProfile:
    """How autopatch patches one model. ``note`` records where the numbers came from."""

    strategy: Strategy = "reroute"
    source_position: Position = Position.SPAN_END
    source_layer: int = 8
    target_layer: int = 4
    placeholder: str = "x"
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    max_bridge_tokens: int = 6
    bridge_prompt: BridgePrompt = "identity"
    scale: float = 1.0  # the patched vector is scale * h (an amplified patch, as in Superscopes, when > 1)
    decomposer: Decomposer | None = None  # chosen on calib and shipped for the model (None: not set here)
    model_type: str | None = None
    model_fingerprint: str | None = None  # set on swept profiles: they apply to that model only
    note: str = ""

    def __post_init__(self) -> None:
        if self.strategy not in registry.STRATEGIES:
            raise ProfileError(f"Unknown strategy {self.strategy!r}; choose one of {tuple(registry.STRATEGIES)}.")
        if self.source_position not in tuple(Position):
            raise ProfileError(f"Unknown source position {self.source_position!r}; choose one of "
                               f"{tuple(map(str, Position))}.")
        object.__setattr__(self, "source_position", Position(self.source_position))  # a JSON string becomes the type
        if self.source_layer < 0 or self.target_layer < 0:
            raise ProfileError("Layers are 0-indexed decoder blocks and cannot be negative.")
        if registry.STRATEGIES[self.strategy].target_before_source and self.target_layer >= self.source_layer:
            raise ProfileError(f"{self.strategy} needs target_layer < source_layer (it patches a later state into an "
                               "earlier layer).")
        if not self.placeholder.strip():
            raise ProfileError("The placeholder must contain a visible token.")
        if self.bridge_prompt not in BRIDGE_PROMPTS:
            raise ProfileError(f"Unknown bridge prompt {self.bridge_prompt!r}; choose one of {BRIDGE_PROMPTS}.")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale != 0):
            raise ProfileError(f"scale must be a finite, non-zero number, not {self.scale!r}.")
        if self.decomposer is not None and self.decomposer not in DECOMPOSERS:
            raise ProfileError(f"Unknown decomposer {self.decomposer!r}; choose one of {DECOMPOSERS}.")
        if self.max_bridge_tokens < 1:
            raise ProfileError("max_bridge_tokens must be at least 1.")

    def validate_for(self, n_layers: int) -> None:
        """Raise :class:`ProfileError` if a layer does not exist in a model of ``n_layers`` blocks."""
        for name in ("source_layer", "target_layer"):
            value = getattr(self, name)
            if value >= n_layers:
                raise ProfileError(f"{name}={value} but the model has {n_layers} decoder blocks (0..{n_layers - 1}).")

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["scale"] == 1.0:
            del data["scale"]  # written only when set, so profiles and run settings from before it still match
        if data["decomposer"] is None:
            del data["decomposer"]  # likewise
        data["prompt_format"] = self.prompt_format.to_dict()
        data["version"] = PROFILE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PatchProfile:
        data = dict(data)
        version = data.pop("version", PROFILE_VERSION)
        if version != PROFILE_VERSION:
            raise ProfileError(f"Profile version {version} is not supported (expected {PROFILE_VERSION}).")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ProfileError(f"Unknown profile fields {sorted(unknown)}; known fields are {sorted(known)}.")
        if "prompt_format" in data:
            data["prompt_format"] = PromptFormat.from_dict(data["prompt_format"])
        try:
            return cls(**data)
        except TypeError as err:
            raise ProfileError(f"Malformed profile: {err}") from err

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PatchProfile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProfileError(f"Cannot read profile {path}: {err}") from err
        if not isinstance(data, dict):
            raise ProfileError(f"Profile {path} must hold a JSON object.")
        return cls.from_dict(data)

    @classmethod
    def shipped_for(cls, model, variant: str | None = None) -> PatchProfile | None:
        """The profile shipped for this very model (matched by weight fingerprint), or ``None``.

        ``variant`` names a strategy: that strategy's best swept configuration.
        Shipped profiles live in ``autopatch/profiles/<name>/`` (``profile.json``,
        ``<strategy>.json``), so several models of one ``model_type`` ship side by side.
        """
        from autopatch.fingerprint import model_fingerprint

        directory = shipped_profile_dir(model_fingerprint(model))
        if directory is None:
            return None
        path = directory / f"{variant or 'profile'}.json"
        return cls.load(path) if path.is_file() else None

    @classmethod
    def default_for(cls, model) -> PatchProfile:
        """The unswept default for a model: ``reroute`` from ℓ = n/2 at the span end into ℓ* = n/4."""
        n = getattr(model.config, "num_hidden_layers", 12)
        return cls(source_layer=max(1, n // 2), target_layer=max(0, n // 4),
                   model_type=getattr(model.config, "model_type", None), note="default: no sweep was run for this model")


PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def shipped_profile_dir(fingerprint: str, root: Path = PROFILES_DIR) -> Path | None:
    """The shipped profile directory whose ``profile.json`` carries ``fingerprint``, if any."""
    from autopatch.fingerprint import shipped_dir_for

    return shipped_dir_for(root, "profile.json", fingerprint, ProfileError)


def ship_name(model) -> str:
    """The directory name a model's shipped files get: its checkpoint directory's name, else its ``model_type``."""
    raw = Path(str(getattr(model.config, "_name_or_path", "") or "")).name or str(model.config.model_type)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip(".-") or "model"


def strategy_profile(model, strategy: str, base: PatchProfile, *, use_shipped: bool = True) -> tuple[PatchProfile, bool]:
    """The best swept profile of ``strategy`` shipped for this model, else ``base`` switched to it.

    Returns ``(profile, swept)``. The fallback keeps ``base``'s layers (backpatch
    needs an earlier target layer, so it moves one block down when it must).
    """
    if use_shipped:
        shipped = PatchProfile.shipped_for(model, variant=strategy)
        if shipped is not None:
            return shipped, True
    if registry.strategy(strategy).target_before_source and base.target_layer >= base.source_layer:
        return replace(base, strategy=strategy, target_layer=max(0, base.source_layer - 1)), False
    return replace(base, strategy=strategy), False
