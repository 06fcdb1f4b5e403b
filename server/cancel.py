"""Deadlines that bind inside a forward pass: a hook on every decoder block raises :class:`Cancelled`.

Example:
    >>> from server.cancel import Cancelled, cancellable
    >>> try:
    ...     with cancellable(model, lambda: time.monotonic() > deadline):
    ...         patcher.generate_with_reports(ids, max_new_tokens=64)
    ... except Cancelled:
    ...     ...                                   # answer 504; the hooks are gone either way

Stopping criteria run between tokens, so on their own they cannot end a long
prefill (a 4,000-token prompt on a CPU takes seconds), the gate's prefill, the
bridge decoding of ``verbalize`` or the patched continuation's prefill. The
worker therefore wraps each generation in :func:`cancellable`: a forward
pre-hook on each decoder block asks ``should_stop()`` and raises
:class:`Cancelled`, so a request whose deadline passed, or whose client left,
frees the worker within one block's forward. The locator needs no hook: it
reads at most ``autopatch.locate.MAX_QUESTION_CHARS`` characters (about 10 ms
measured at that size) and the first block's hook runs right after it.

Hooks act only on the thread that opened the context (the engine's hooks do the
same), and are removed in ``finally``. Nothing is cached half-way: the shared
prefix cache (:mod:`autopatch.prefix_cache`) stores an entry only after its forward
pass has finished, and the engine's capture and patch hooks are removed in
``finally`` too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from autopatch.architectures import decoder_layers


class Cancelled(Exception):
    """Raised inside a forward pass once nobody waits for its result any more (deadline passed, client gone)."""


@contextmanager
def cancellable(model: nn.Module, should_stop: Callable[[], bool]) -> Iterator[None]:
    """Within the context, every decoder block of ``model`` raises :class:`Cancelled` when ``should_stop()``."""
    owner = threading.get_ident()

    def check(module: nn.Module, args: tuple) -> None:
        if threading.get_ident() == owner and should_stop():
            raise Cancelled("the request was cancelled or passed its deadline")

    handles = [block.register_forward_pre_hook(check) for block in decoder_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
