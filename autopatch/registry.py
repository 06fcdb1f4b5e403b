"""One declaration per patch strategy and per control; everything else derives from these tables.

Example:
    >>> from autopatch.registry import STRATEGIES, CONTROLS, strategy
    >>> tuple(STRATEGIES)                      # profile validation, eval methods
    ('reroute', 'backpatch', 'verbalize', 'isolate', 'isolate-span', 'decompose', 'second-opinion', 'cross-model')
    >>> standalone_strategies()                # CLI choices, server schema, default eval methods: one model alone
    ('reroute', 'backpatch', 'verbalize', 'isolate', 'isolate-span', 'decompose', 'second-opinion')
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
from typing import Any, Generic, Literal, Protocol, TypeVar, get_args

from autopatch.errors import ConfigError


@dataclass(frozen=True)
class StrategySpec:
    """A way to use the captured bridge state."""

    name: str
    description: str
    builder: str  # "module:function" building the targets of a batch of jobs
    target_before_source: bool = False  # the target layer must precede the source layer (back-patching)
    uses_state: bool = True  # False for text-only baselines (``decompose``): the hidden state is never patched
    source: str | None = None  # "module:function" recomputing each job's state; None: the prefill's capture
    needs_source_model: bool = False  # runs only with a second model attached (``cross-model``)

    def build(self) -> Callable[..., Any]:
        return _resolve(self.builder)

    def states(self) -> Callable[..., Any] | None:
        return None if self.source is None else _resolve(self.source)


def _resolve(path: str) -> Callable[..., Any]:
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class ControlSpec:
    """A control: everything as the strategy does it, except the vector that is patched in.

    ``vector``: ``"module:function"`` of ``f(vector, seed_text) -> vector | None``, the vector patched in instead
    (``None``: no patch). ``subject_text``: also write the subject's own words where the placeholder was (the
    Patchscopes text-substitution control).
    """

    name: str
    description: str
    vector: str
    subject_text: bool = False

    def rule(self) -> Callable[..., Any]:
        return _resolve(self.vector)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)


class Registry(dict[str, T], Generic[T]):
    """Named plug-ins of one kind, in registration order: ``reg.add(spec)``, ``reg.get_known(name)``.

    Used for strategies and controls here, and for evaluation methods in :mod:`eval.methods`.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, item: T) -> T:
        """Register ``item`` under its name; names are unique."""
        if item.name in self:
            raise ConfigError(f"{self.kind} {item.name!r} is already registered.")
        self[item.name] = item
        return item

    def get_known(self, name: str) -> T:
        """The item called ``name``; an unknown name lists the known ones."""
        try:
            return self[name]
        except KeyError:
            raise ConfigError(f"Unknown {self.kind.lower()} {name!r}; choose one of {', '.join(self)}.") from None


# Who reads each question's first hop: the locator's grammar, the model's own decomposition, or the grammar and
# the model where the grammar reads nothing (autopatch.plan, autopatch.decomposer).
Decomposer = Literal["grammar", "model", "both"]
DECOMPOSERS: tuple[str, ...] = get_args(Decomposer)

STRATEGIES: Registry[StrategySpec] = Registry("Strategy")
CONTROLS: Registry[ControlSpec] = Registry("Control")
register_strategy = STRATEGIES.add
register_control = CONTROLS.add
strategy = STRATEGIES.get_known
control = CONTROLS.get_known


def standalone_strategies() -> tuple[str, ...]:
    """The strategies one model runs alone: every list a model is offered without a second one attached (the
    server's schema, ``generate --strategy``, the default evaluation methods)."""
    return tuple(name for name, spec in STRATEGIES.items() if not spec.needs_source_model)


register_strategy(StrategySpec(
    "reroute", "Patchscopes §5: the state overwrites the placeholder of a fresh prompt asking only the second hop",
    "autopatch.strategies:build_reroute"))
register_strategy(StrategySpec(
    "backpatch", "Auto-Patch / Hopping Too Late: the same prompt, from the source layer into an earlier layer",
    "autopatch.strategies:build_backpatch", target_before_source=True))
register_strategy(StrategySpec(
    "verbalize", "a Patchscope decodes the bridge into words, which fill the second-hop slot",
    "autopatch.strategies:build_verbalize"))
register_strategy(StrategySpec(
    "isolate", "Patchscopes §5, same prompt: the first hop's state computed with the second hop's words masked out "
    "overwrites the same position at the target layer", "autopatch.strategies:build_backpatch",
    source="autopatch.isolate:isolate_jobs"))
register_strategy(StrategySpec(
    "isolate-span", "isolate at every token of the first hop up to the source position (several positions at once)",
    "autopatch.strategies:build_backpatch", source="autopatch.isolate:isolate_span_jobs"))
register_strategy(StrategySpec(
    "decompose", "text only, no hidden state: the located first hop asked as a question, its short answer fills the "
    "second-hop slot (the baseline every patch method must beat)", "autopatch.strategies:build_decompose",
    uses_state=False))
register_strategy(StrategySpec(
    "second-opinion", "decompose, with the hidden state as a second opinion: where the first hop asked in words and "
    "the state's Patchscope readout disagree, the bridge whose second-hop answer the model gives more confidently",
    "autopatch.strategies:build_second_opinion"))
register_strategy(StrategySpec(
    "cross-model", "Patchscopes §4.3: reroute from a smaller model's state of the same token, through a linear map "
    "fitted on calib prompts (autopatch.crossmodel; needs the source model attached)",
    "autopatch.strategies:build_reroute", source="autopatch.crossmodel:cross_model_jobs", needs_source_model=True))

register_control(ControlSpec("random", "the profile's patch with a norm-matched random vector",
                             "autopatch.strategies:random_like"))
register_control(ControlSpec("zero", "the profile's patch with a zero vector", "autopatch.strategies:zero_like"))
register_control(ControlSpec("nopatch", "the profile's target prompt with the placeholder left alone",
                             "autopatch.strategies:no_vector"))
register_control(ControlSpec("text", "the profile's target prompt with the subject's words in the placeholder, no patch",
                             "autopatch.strategies:no_vector", subject_text=True))
