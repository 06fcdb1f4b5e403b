"""``autopatch serve``: load a model once and serve it over an OpenAI-compatible HTTP API.

Example:
    $ autopatch serve                                   # embedded Gemma 3 270M on http://127.0.0.1:8000
    $ autopatch serve --model /models/qwen2 --port 9000 --max-queue 8 --timeout 60

The profile and gate are resolved by :func:`autopatch.resolve.resolve`: the
gate shipped for the model and its profile; when none is shipped, or the
shipped one is refused, it patches every located two-hop question
(``AlwaysPatch``) and logs one warning. Each request is logged with its status and latency.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import time

from autopatch.cli import _add_model_arg, subcommand
from server.screening import DEFAULT_SCREEN_MODEL, proxy_screen

logger = logging.getLogger("autopatch.server")


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    _add_model_arg(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-queue", type=int, default=32, help="requests that may wait for the model; more get 503")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a request may take, preparation, queueing and generation; then 504")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: the --model value, or gemma-3-270m)")
    parser.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    parser.add_argument("--no-patching", action="store_true", help="patch only requests that set autopatch.enabled")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health (when not given: the "
                             "AUTOPATCH_API_KEY environment variable; no key when that is unset too)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096,
                        help="longer prompts get 400 context_length_exceeded (0: only the model's context limits them)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="greedy requests (streamed or not) generated together at most (1: no batching)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="the worker closes a batch once no request has joined it for this long")
    parser.add_argument("--max-batch-wait-ms", type=float, default=100.0,
                        help="while a batch is smaller than the one that just ended, or than the requests still being "
                             "prepared would make it, the worker holds it open for up to this long (those requests "
                             "are on their way)")
    parser.add_argument("--keep-alive-timeout", type=float, default=5.0,
                        help="seconds an idle keep-alive connection stays open between requests")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a client may pause while sending its request body; then 408")
    parser.add_argument("--limit-concurrency", type=int, default=256,
                        help="open connections at most; requests beyond get 503 (bounds idle and slow clients)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--profile", default=None, help="a patch profile JSON file (default: resolved for the model)")
    parser.add_argument("--gate", default=None, help="a gate directory (default: the gate shipped for the model)")
    parser.add_argument("--upstream", default=None, metavar="URL",
                        help="serve no model: decompose two-hop questions through this OpenAI-compatible server "
                             "(vLLM, llama.cpp, another autopatch serve...) and pass everything else through")
    parser.add_argument("--upstream-api-key-env", default="UPSTREAM_API_KEY", metavar="VAR",
                        help="environment variable holding the upstream's API key (never logged or echoed)")
    parser.add_argument("--upstream-model", default=None, help="the model name to send to the upstream")
    parser.add_argument("--screen-model", default=None, metavar="NAME",
                        help="with --upstream: the embedded model whose shipped two-hop screen decides which located "
                             f"requests are decomposed (default: {DEFAULT_SCREEN_MODEL}, else the embedded default "
                             "model when that is not installed)")
    parser.add_argument("--no-screen", action="store_true",
                        help="with --upstream: decompose every located request (no screen)")


@subcommand("serve", "serve a model with autopatch over an OpenAI-compatible HTTP API", _configure_serve)
def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from autopatch.loading import EMBEDDED_MODEL_NAME, load_model
    from server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.upstream:
        return _serve_upstream(args)
    started = time.perf_counter()
    model, tok = load_model(args.model, quantize=args.quantize, batch_invariant=args.batch_invariant)
    name = args.served_model_name or (str(args.model) if args.model else EMBEDDED_MODEL_NAME)
    api_key = args.api_key or os.environ.get("AUTOPATCH_API_KEY") or None
    warn_if_exposed(args.host, api_key)
    app = create_app(model, tok, model_name=name, profile=args.profile, gate=args.gate,
                     max_queue=args.max_queue, request_timeout_s=args.timeout, max_tokens_cap=args.max_tokens_cap,
                     patching_default=not args.no_patching, api_key=api_key, max_body_bytes=args.max_body_bytes,
                     max_prompt_tokens=args.max_prompt_tokens or None, max_batch_size=args.max_batch_size,
                     batch_window_s=args.batch_window_ms / 1000, max_batch_wait_s=args.max_batch_wait_ms / 1000,
                     body_timeout_s=args.body_timeout)
    served = app.state.served
    resolution = served.base.resolution
    logger.info("loaded %s in %.1fs: strategy=%s (profile: %s) gate=%s (%s) context=%d prompt=%s", name,
                time.perf_counter() - started, served.base.profile.strategy, resolution.profile_source,
                type(served.base.gate).__name__, resolution.gate_source, served.context_length,
                "chat-template" if getattr(tok, "chat_template", None) else "fewshot-qa")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_keep_alive=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency)
    return 0


def _serve_upstream(args: argparse.Namespace) -> int:
    """``--upstream``: the decomposition in front of another server (server.upstream); no model is loaded here."""
    import uvicorn

    from server.upstream import create_proxy_app

    api_key = args.api_key or os.environ.get("AUTOPATCH_API_KEY") or None
    warn_if_exposed(args.host, api_key)
    screen = None if args.no_screen else proxy_screen(args.screen_model, args.quantize)
    app = create_proxy_app(args.upstream, api_key=api_key, upstream_api_key=os.environ.get(args.upstream_api_key_env),
                           upstream_model=args.upstream_model, timeout_s=args.timeout, max_body_bytes=args.max_body_bytes,
                           screen=screen)
    logger.info("decomposing through %s (hidden-state strategies are refused: the upstream exposes only text); "
                "screen: %s", app.state.upstream.url, screen.name if screen else "none, every located request")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_keep_alive=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency)
    return 0


def is_loopback(host: str) -> bool:
    """``host`` is reachable only from this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def warn_if_exposed(host: str, api_key: str | None) -> None:
    """Log a warning when the server will be reachable from other machines (louder without an API key)."""
    if is_loopback(host):
        return
    logger.warning("binding to %s, not loopback: other machines can reach this server. Put a TLS-terminating proxy "
                   "in front of it; the server itself speaks plain HTTP.", host)
    if not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                       "(pass --api-key or set AUTOPATCH_API_KEY)", host)
