"""Which profile and which gate a model gets, and where each came from.

Example:
    >>> from autopatch.resolve import resolve
    >>> r = resolve(model, tok)                       # shipped gate and profile for this very model, if any
    >>> r.profile_source, r.gate_source               # "shipped", "file", "argument" or "default"
    ('shipped', 'shipped')
    >>> resolve(model, tok, profile="my.profile.json", gate="runs/gate").gate_source
    'file'

Rules, in order:

* ``gate``: a :class:`~autopatch.gating.Gate` object is used as given
  (``"argument"``); a path is loaded by the gate provider (``"file"``);
  ``None`` asks the provider for the gate shipped for this model's fingerprint
  (``"shipped"``). With no gate, or a shipped gate that is refused (corrupt,
  another model), every located question is patched (:class:`AlwaysPatch`,
  ``"default"``) and one warning is logged (once per model and reason).
* ``profile``: a :class:`PatchProfile` (``"argument"``) or a path
  (``"file"``); ``None`` takes the gate's own profile when it has one (same
  source as the gate), else the profile shipped for this model's fingerprint
  (``"shipped"``), else a default with ℓ = n/2, ℓ* = n/4 (``"default"``, with
  one warning; a chat model's default uses its chat template).
* ``decomposer`` (who reads each question's first hop, :mod:`autopatch.plan`): as given (``"argument"``); else
  the chosen profile's, when it names one (its source); else the one chosen on calib and shipped in this model's
  profile (``"shipped"``, ``python -m eval.choose_decomposer``); else ``"grammar"`` (``"default"``).

Gate providers are plug-ins: the core never imports ``classifiers`` itself.
They are found through the ``autopatch.gate_providers`` entry point group
(``classifiers`` registers one in ``pyproject.toml``) or registered at run time
with :func:`register_gate_provider`. A provider has ``shipped_gate(model)`` (a
gate or ``None``) and ``load_gate(path, model)``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Literal, Protocol

from autopatch.errors import AutopatchError, ConfigError
from autopatch.gating import AlwaysPatch, Gate
from autopatch.profile import Decomposer, PatchProfile
from autopatch.prompts import PromptFormat

Source = Literal["argument", "file", "shipped", "default"]
ENTRY_POINT_GROUP = "autopatch.gate_providers"
logger = logging.getLogger("autopatch")


class GateProvider(Protocol):
    def shipped_gate(self, model: Any) -> Gate | None: ...

    def load_gate(self, path: str | os.PathLike[str], model: Any) -> Gate: ...


_PROVIDERS: list[GateProvider] = []
_WARNED: set[tuple[int, str]] = set()
_ENTRY_POINTS_LOADED = False


def register_gate_provider(provider: GateProvider) -> None:
    """Make ``provider`` available to :func:`resolve` (tried before entry-point providers)."""
    if provider not in _PROVIDERS:
        _PROVIDERS.insert(0, provider)


def gate_providers() -> list[GateProvider]:
    """Registered providers, then those of the ``autopatch.gate_providers`` entry points (loaded once)."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            provider = entry.load()
            if provider not in _PROVIDERS:
                _PROVIDERS.append(provider)
    return list(_PROVIDERS)


@dataclass(frozen=True)
class Resolution:
    """The profile and gate chosen for a model, where each came from, and why any fallback happened."""

    profile: PatchProfile
    profile_source: Source
    gate: Gate
    gate_source: Source
    notes: tuple[str, ...] = field(default=())
    decomposer: Decomposer = "grammar"
    decomposer_source: Source = "default"

    def to_dict(self) -> dict[str, Any]:
        return {"profile_source": self.profile_source, "gate_source": self.gate_source,
                "gate": type(self.gate).__name__, "decomposer": self.decomposer,
                "decomposer_source": self.decomposer_source, "notes": list(self.notes)}


def _resolve_gate(model: Any, gate: Gate | str | os.PathLike[str] | None) -> tuple[Gate, Source, list[str]]:
    if gate is not None and not isinstance(gate, (str, os.PathLike)):
        return gate, "argument", []
    providers = gate_providers()
    if gate is not None:
        if not providers:
            raise ConfigError(f"Cannot load the gate file {os.fspath(gate)!r}: no gate provider is installed "
                              "(install autopatch with its `classifiers` package).")
        return providers[0].load_gate(gate, model), "file", []
    for provider in providers:
        try:
            found = provider.shipped_gate(model)
        except AutopatchError as err:  # a corrupt or foreign shipped gate must not stop the caller
            return AlwaysPatch(), "default", [f"the shipped gate was refused ({err}); patching every located question"]
        if found is not None:
            return found, "shipped", []
    return AlwaysPatch(), "default", ["no gate is shipped for this model; patching every located question "
                                      "(train one with `autopatch train-gate`)"]


def _resolve_profile(model: Any, tokenizer: Any, profile: PatchProfile | str | os.PathLike[str] | None,
                     gate: Gate, gate_source: Source, shipped_profile: Callable[[], PatchProfile | None],
                     ) -> tuple[PatchProfile, Source, list[str]]:
    if isinstance(profile, PatchProfile):
        return profile, "argument", []
    if profile is not None:
        return PatchProfile.load(profile), "file", []
    own = getattr(gate, "profile", None)
    if isinstance(own, PatchProfile):
        return own, gate_source, []
    shipped = shipped_profile()
    if shipped is not None:
        return shipped, "shipped", []
    default = PatchProfile.default_for(model)
    if getattr(tokenizer, "chat_template", None):
        default = replace(default, prompt_format=PromptFormat(kind="chat"))
    return default, "default", [f"no swept profile is shipped for this model; using the unswept default "
                                f"{default.strategy} ℓ={default.source_layer} ℓ*={default.target_layer} "
                                "(run a sweep, see docs/sweep.md)"]


def _resolve_decomposer(decomposer: Decomposer | None, profile: PatchProfile, profile_source: Source,
                        shipped_profile: Callable[[], PatchProfile | None]) -> tuple[Decomposer, Source]:
    if decomposer is not None:
        return decomposer, "argument"
    if profile.decomposer is not None:
        return profile.decomposer, profile_source
    shipped = shipped_profile()  # the model's own choice, whichever profile patches
    if shipped is not None and shipped.decomposer is not None:
        return shipped.decomposer, "shipped"
    return "grammar", "default"


def resolve(model: Any, tokenizer: Any, *, profile: PatchProfile | str | os.PathLike[str] | None = None,
            gate: Gate | str | os.PathLike[str] | None = None, decomposer: Decomposer | None = None) -> Resolution:
    """Choose the profile, the gate and the decomposer for ``model`` by the rules of the module docstring."""
    shipped_profile = functools.cache(lambda: PatchProfile.shipped_for(model))  # read once, if at all
    chosen_gate, gate_source, notes = _resolve_gate(model, gate)
    chosen_profile, profile_source, profile_notes = _resolve_profile(model, tokenizer, profile, chosen_gate, gate_source,
                                                                     shipped_profile)
    chosen_decomposer, decomposer_source = _resolve_decomposer(decomposer, chosen_profile, profile_source,
                                                               shipped_profile)
    notes += profile_notes
    for note in notes:
        if (id(model), note) not in _WARNED:  # once per model and reason, however many patchers are built
            _WARNED.add((id(model), note))
            logger.warning("autopatch: %s", note)
    return Resolution(chosen_profile, profile_source, chosen_gate, gate_source, tuple(notes), chosen_decomposer,
                      decomposer_source)


def model_profile(model: Any, tokenizer: Any) -> PatchProfile:
    """The profile this model gets with no gate of its own to bring one: the shipped one, else the default.

    ``model_profile(model, tok).source_layer``. What ``AutoPatcher(model, tok, gate=AlwaysPatch()).profile`` gives,
    without building a patcher (or loading a gate) for it.
    """
    return resolve(model, tokenizer, gate=AlwaysPatch()).profile
