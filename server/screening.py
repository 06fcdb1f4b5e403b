"""The proxy's two-hop screen: a small embedded model reads each located request and passes only composable questions.

Example:
    >>> screen = LocalScreen.load("qwen2.5-coder-0.5b-instruct")      # its shipped screen, on its own prefill
    >>> screen.verdict([{"role": "user", "content": "What is the capital of the country where the Colosseum is?"}])
    (0.97, True)
    $ autopatch serve --upstream http://localhost:8001/v1 --screen-model qwen2.5-coder-0.5b-instruct

Why it exists: ``serve --upstream`` cannot read the upstream model's prefill, and without a screen it decomposed
every request the locator reads, instructions and code questions included (about one answer in five changed on
the do-no-harm test). Whether a request is a composable two-hop question does not depend on which model answers
it, so the screen a small embedded model ships (fitted on calib requests and questions, read on that model's own
prefill: :mod:`classifiers.screen`) decides for the upstream. It costs one prefill of the small model, for located
requests only; the rest are passed through without it. Calls are serialised: the small model runs one request
at a time beside the proxy's threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autopatch.errors import AutopatchError, ConfigError

logger = logging.getLogger("autopatch")

DEFAULT_SCREEN_MODEL = "qwen2.5-coder-0.5b-instruct"  # the screen that passed fewest ordinary requests (docs/scale.md)


@dataclass
class LocalScreen:
    """A shipped two-hop screen and the small model whose prefill it reads."""

    model: Any
    tokenizer: Any
    screen: Any  # classifiers.gate.PatchGate (the screen of a ScreenedGate)
    profile: Any  # autopatch.profile.PatchProfile: the prompt format requests are rendered in
    name: str
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, name: str = DEFAULT_SCREEN_MODEL, *, quantize: str | None = None) -> LocalScreen:
        """The model ``name`` (embedded name, local path or HF id) and the screen shipped with its gate;
        :class:`ConfigError` when it ships none."""
        import torch

        from autopatch import load_model
        from autopatch.resolve import resolve
        from classifiers.screen import ScreenedGate

        torch.set_grad_enabled(False)
        model, tok = load_model(name, quantize=quantize)
        resolution = resolve(model, tok)
        if not isinstance(resolution.gate, ScreenedGate):
            raise ConfigError(f"{name} ships no two-hop screen (its gate is {type(resolution.gate).__name__}); "
                              "use --screen-model with an embedded model that does, or --no-screen")
        return cls(model, tok, resolution.gate.screen, resolution.profile, name)

    def verdict(self, messages: Sequence[Mapping[str, str]]) -> tuple[float, bool]:
        """``(P(two-hop question), passed)`` for a chat request, read as the small model's server would read it."""
        from autopatch.prompts import render_chat
        from classifiers.features import extract_prompt_features

        prompt = render_chat(messages, self.tokenizer, self.profile.prompt_format)
        with self._lock:
            features, _ = extract_prompt_features(self.model, self.tokenizer, [prompt.text], [prompt.question],
                                                  self.screen.spec, profile=self.profile)
        score = float(self.screen.scores(features)[0])
        return score, score >= self.screen.threshold


def proxy_screen(name: str | None = None, quantize: str | None = None) -> LocalScreen:
    """The proxy's screen: ``name``'s; by default :data:`DEFAULT_SCREEN_MODEL`'s, else the embedded default
    model's when that one is not installed (said in the log)."""
    from autopatch.loading import EMBEDDED_MODEL_NAME

    if name is not None:
        return LocalScreen.load(name, quantize=quantize)
    try:
        return LocalScreen.load(DEFAULT_SCREEN_MODEL, quantize=quantize)
    except AutopatchError as err:
        logger.warning("the proxy's screen: %s is not available (%s); using %s's screen instead",
                       DEFAULT_SCREEN_MODEL, err, EMBEDDED_MODEL_NAME)
        return LocalScreen.load(EMBEDDED_MODEL_NAME, quantize=quantize)
