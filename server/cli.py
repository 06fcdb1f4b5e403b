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
import logging
import os
import time

from autopatch.cli import _add_model_arg, subcommand

logger = logging.getLogger("autopatch.server")


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    _add_model_arg(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-queue", type=int, default=32, help="requests that may wait for the model; more get 503")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a request may take, queueing plus generation; then 504")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: the --model value, or gemma-3-270m)")
    parser.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    parser.add_argument("--no-patching", action="store_true", help="patch only requests that set autopatch.enabled")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health (when not given: the "
                             "AUTOPATCH_API_KEY environment variable; no key when that is unset too)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--profile", default=None, help="a patch profile JSON file (default: resolved for the model)")
    parser.add_argument("--gate", default=None, help="a gate directory (default: the gate shipped for the model)")


@subcommand("serve", "serve a model with autopatch over an OpenAI-compatible HTTP API", _configure_serve)
def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from autopatch.loading import EMBEDDED_MODEL_NAME, load_model
    from server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    model, tok = load_model(args.model)
    name = args.served_model_name or (str(args.model) if args.model else EMBEDDED_MODEL_NAME)
    api_key = args.api_key or os.environ.get("AUTOPATCH_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                       "(pass --api-key or set AUTOPATCH_API_KEY)", args.host)
    app = create_app(model, tok, model_name=name, profile=args.profile, gate=args.gate,
                     max_queue=args.max_queue, request_timeout_s=args.timeout, max_tokens_cap=args.max_tokens_cap,
                     patching_default=not args.no_patching, api_key=api_key, max_body_bytes=args.max_body_bytes)
    served = app.state.served
    resolution = served.base.resolution
    logger.info("loaded %s in %.1fs: strategy=%s (profile: %s) gate=%s (%s) context=%d prompt=%s", name,
                time.perf_counter() - started, served.base.profile.strategy, resolution.profile_source,
                type(served.base.gate).__name__, resolution.gate_source, served.context_length,
                "chat-template" if getattr(tok, "chat_template", None) else "fewshot-qa")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
