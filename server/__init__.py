"""OpenAI-compatible chat endpoint serving one model through autopatch.

Example:
    >>> import autopatch
    >>> from server import create_app
    >>> model, tok = autopatch.load_model()
    >>> app = create_app(model, tok, model_name="gemma-3-270m")   # a FastAPI app; run it with uvicorn
    $ autopatch serve --port 8000                                    # the same, from the command line

Modules: ``schemas`` (request/response models), ``errors`` (OpenAI's error
shape), ``guards`` (API key, body limits), ``prompting`` (chat template or
few-shot fallback), ``planning`` (validation and tokenization, off the event
loop), ``jobs`` (what the worker runs and returns), ``worker`` (the single
generation thread), ``batching`` (micro-batches of compatible requests),
``cancel`` (deadlines checked inside the forward pass), ``app`` (routes and
streaming), ``upstream`` (``serve --upstream``: the text decomposition in
front of any OpenAI-compatible server, no model here), ``runner`` (uvicorn in
a background thread, for tests, benchmarks and ``bench/soak.py``), ``cli``
(``autopatch serve``).
See ``docs/server.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # lazy, so that `autopatch --help` (which imports server.cli) does not import FastAPI and torch
    if name == "create_app":
        from server.app import create_app

        return create_app
    raise AttributeError(f"module 'server' has no attribute {name!r}")
