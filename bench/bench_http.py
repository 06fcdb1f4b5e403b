"""The server's cost per request over one keep-alive connection, on a tiny random model: what HTTP, validation,
tokenizing and the worker's hand-offs add to a generation that itself takes a few milliseconds.

Example:
    $ python bench/bench_http.py                    # 20 plain and 20 streamed requests, 4 tokens each
    $ python bench/bench_http.py --requests 50

Each request goes through ``http.client`` on one connection (as the ``openai`` client keeps its connection), to
the app under :class:`server.runner.BackgroundServer`, the runner the tests and ``bench/bench_server.py`` use.
Prints the median milliseconds per request, plain and streamed (read to the end), and whether the server's side
of the connection has Nagle's algorithm off (``TCP_NODELAY``; with it on, each plain response waited for the
client's delayed acknowledgement of its headers).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="of each kind")
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    from autopatch.profile import PatchProfile
    from autopatch.prompts import PromptFormat
    from server.app import create_app
    from server.runner import BackgroundServer
    from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))
    app = create_app(tiny_model_for_bytes("llama"), byte_tokenizer(), model_name="tiny", profile=profile)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with BackgroundServer(app) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        times: dict[str, list[float]] = {"plain": [], "streamed": []}
        for i in range(2 * (args.requests + 1)):
            kind = "streamed" if i % 2 else "plain"
            body = {"model": "tiny", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
                    "stream": kind == "streamed"}
            start = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"request {i} failed with {response.status}")
            if i >= 2:  # the first of each kind warms up
                times[kind].append((time.perf_counter() - start) * 1000)
        nodelay = [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                   for c in srv.server.server_state.connections]
        conn.close()
    print(f"tiny llama, {args.requests} requests of each kind on one connection, max_tokens {args.max_tokens}")
    for kind, values in times.items():
        print(f"{kind}: median {statistics.median(values):.1f} ms a request (min {min(values):.1f}, max {max(values):.1f})")
    print(f"server side TCP_NODELAY: {bool(nodelay and all(nodelay))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
