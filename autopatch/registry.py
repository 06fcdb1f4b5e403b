"""One declaration per patch strategy and per control; everything else derives from these tables.

Example:
    >>> from autopatch.registry import STRATEGIES, CONTROLS, strategy
    >>> tuple(STRATEGIES)                      # profile validation, CLI choices, server schema, eval methods
    ('reroute', 'backpatch', 'verbalize')
    >>> strategy("backpatch").target_before_source
    True

This module imports neither torch nor transformers, so argument parsers and
request schemas can use it. A strategy's implementation is named by a dotted
path (``"module:function"``) and imported only when a patch is planned; it is
called as ``build(model, tokenizer, profile, jobs, vectors) -> list[Target]``.
Adding a strategy is one :func:`register_strategy` call (plus its tests).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autopatch.errors import ConfigError


@dataclass(frozen=True)
class StrategySpec:
    """A way to use the captured bridge state."""

    name: str
    description: str
    builder: str  # "module:function" building the targets of a batch of jobs
    target_before_source: bool = False  # the target layer must precede the source layer (back-patching)

    def build(self) -> Callable[..., Any]:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class ControlSpec:
    """A control: everything as the strategy does it, except the vector that is patched in."""

    name: str
    description: str


STRATEGIES: dict[str, StrategySpec] = {}
CONTROLS: dict[str, ControlSpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    if spec.name in STRATEGIES:
        raise ConfigError(f"Strategy {spec.name!r} is already registered.")
    STRATEGIES[spec.name] = spec
    return spec


def register_control(spec: ControlSpec) -> ControlSpec:
    if spec.name in CONTROLS:
        raise ConfigError(f"Control {spec.name!r} is already registered.")
    CONTROLS[spec.name] = spec
    return spec


def strategy(name: str) -> StrategySpec:
    """The registered strategy ``name``; an unknown name lists the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.") from None


def control(name: str) -> ControlSpec:
    """The registered control ``name``; an unknown name lists the known ones."""
    try:
        return CONTROLS[name]
    except KeyError:
        raise ConfigError(f"Unknown control {name!r}; choose one of {', '.join(CONTROLS)}.") from None


register_strategy(StrategySpec(
    "reroute", "Patchscopes §5: the state overwrites the placeholder of a fresh prompt asking only the second hop",
    "autopatch.strategies:build_reroute"))
register_strategy(StrategySpec(
    "backpatch", "Auto-Patch / Hopping Too Late: the same prompt, from the source layer into an earlier layer",
    "autopatch.strategies:build_backpatch", target_before_source=True))
register_strategy(StrategySpec(
    "verbalize", "a Patchscope decodes the bridge into words, which fill the second-hop slot",
    "autopatch.strategies:build_verbalize"))

register_control(ControlSpec("random", "the profile's patch with a norm-matched random vector"))
register_control(ControlSpec("zero", "the profile's patch with a zero vector"))
register_control(ControlSpec("nopatch", "the profile's target prompt with the placeholder left alone"))
