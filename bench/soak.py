"""Soak the server: mixed, streamed, dropped, cancelled, oversized and concurrent requests for a bounded time.

Example:
    $ python bench/soak.py --tiny --seconds 60 --threads 1               # tiny random model
    $ python bench/soak.py --seconds 300 --concurrency 4 --threads 1     # embedded Gemma 3 270M

A real uvicorn server on 127.0.0.1 (``server.runner.BackgroundServer``) gets
requests from ``--concurrency`` client threads until ``--seconds`` have passed
or ``--requests`` were sent. Each request is drawn (seeded) from a mix:
plain answers (patched or not, different ``max_tokens``, stop strings, seeded
sampling), streams read to the end, streams dropped after the first frame,
non-streamed requests whose client disconnects while waiting, bodies over the
size limit, prompts over the token limit and malformed JSON. The queue is
twice as long as the concurrency and the timeout generous, so no 503 or 504
is expected: every 5xx is a failure.

It prints the requests sent per kind and status, the number of 5xx (must be
0), p50/p99 latency of the completed plain answers, the process's resident
memory before and after (server and clients share the process), and checks
that afterwards ``/health`` is ok with an empty queue, no hook is left on the
model, and a fixed question gets the answer it got before the soak. Exits
with 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.bench_server import percentile  # noqa: E402
from bench.questions import QUESTIONS  # noqa: E402

KINDS = ("plain", "stream", "stream-dropped", "disconnect", "too-large", "too-many-tokens", "bad-json")
WEIGHTS = (10, 3, 2, 2, 1, 1, 1)


def rss_mib() -> float:
    """Resident memory of this process in MiB (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def hooks_on(model) -> int:
    """Forward hooks and pre-hooks left on the model's modules (autopatch removes its own in ``finally``)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def raw_request(host: str, port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="local path or HF id (default: the embedded Gemma 3 270M)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop sending after this long")
    parser.add_argument("--requests", type=int, default=5000, help="stop sending after this many")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--max-tokens", type=int, default=8, help="largest max_tokens of a plain request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    import httpx
    import torch

    from bench.bench_server import _load
    from server.app import create_app
    from server.runner import BackgroundServer

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, name, profile = _load(args)
    body_limit, prompt_limit = 64 * 1024, 100 if args.tiny else 1024  # the tiny model has 128 positions
    # The queue holds every client's request twice over: a client that disconnects starts its next request
    # before the server has noticed (it checks every 0.2 s), so its old job still holds a place meanwhile.
    app = create_app(model, tok, model_name=name, profile=profile, max_queue=2 * args.concurrency,
                     request_timeout_s=600,
                     max_body_bytes=body_limit, max_prompt_tokens=prompt_limit)
    hooks_before = hooks_on(model)
    rng_lock, rng = threading.Lock(), random.Random(args.seed)
    statuses: Counter[tuple[str, int]] = Counter()
    latencies: list[float] = []
    sent = [0]
    stop_at = time.monotonic() + args.seconds

    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=600) as http:
        url = "/v1/chat/completions"

        def chat(question: str, **extra) -> dict:
            return {"model": name, "messages": [{"role": "user", "content": question}], **extra}

        reference = http.post(url, json=chat(QUESTIONS[0], max_tokens=args.max_tokens)).json()
        rss_before = rss_mib()

        def one(kind: str, r: random.Random) -> int:
            question = r.choice(QUESTIONS)
            if kind == "plain":
                extra: dict = {"max_tokens": r.randint(1, args.max_tokens), "autopatch": {"enabled": r.random() < 0.7}}
                if r.random() < 0.2:
                    extra["stop"] = [r.choice(["e", " ", "\n", "the"])]
                if r.random() < 0.2:
                    extra.update(temperature=0.8, seed=r.randint(0, 100))
                start = time.perf_counter()
                status = http.post(url, json=chat(question, **extra)).status_code
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                return status
            if kind == "stream":
                with http.stream("POST", url, json=chat(question, max_tokens=args.max_tokens, stream=True)) as resp:
                    text = "".join(resp.iter_text())
                if resp.status_code == 200 and ('"error"' in text or not text.rstrip().endswith("data: [DONE]")):
                    print(f"stream: an error frame or no [DONE]: {text[-300:]!r}")
                    return 599  # a stream that failed after it started
                return resp.status_code
            if kind in ("stream-dropped", "disconnect"):
                body = json.dumps(chat(question, max_tokens=args.max_tokens, stream=kind == "stream-dropped"))
                sock = raw_request(srv.host, srv.port, body.encode())
                if kind == "stream-dropped":
                    sock.recv(1024)  # the first frame
                else:
                    time.sleep(r.random() * 0.2)
                sock.close()
                return 0  # nobody reads the answer; the server must still cope
            if kind == "too-large":
                return http.post(url, json=chat("x" * (body_limit + 10))).status_code
            if kind == "too-many-tokens":
                return http.post(url, json=chat("y " * (prompt_limit * 2 + 10))).status_code
            return http.post(url, content=b'{"messages": [', headers={"content-type": "application/json"}).status_code

        def client() -> None:
            while time.monotonic() < stop_at:
                with rng_lock:
                    if sent[0] >= args.requests:
                        return
                    sent[0] += 1
                    kind = rng.choices(KINDS, WEIGHTS)[0]
                    r = random.Random(rng.random())
                try:
                    status = one(kind, r)
                except httpx.HTTPError as err:
                    print(f"{kind}: {type(err).__name__}: {err}")
                    status = -1
                statuses[(kind, status)] += 1

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for future in [pool.submit(client) for _ in range(args.concurrency)]:
                future.result()
        wall = time.perf_counter() - started
        time.sleep(1.0)  # let cancelled work drain
        health = http.get("/health").json()
        after = http.post(url, json=chat(QUESTIONS[0], max_tokens=args.max_tokens)).json()
        rss_after = rss_mib()

    print(f"model {name}, {args.concurrency} client threads, {wall:.1f} s, {sent[0]} requests "
          f"({sent[0] / wall:.1f}/s), torch threads {torch.get_num_threads()}\n")
    print("| kind | status | count |\n| --- | ---: | ---: |")
    for (kind, status), count in sorted(statuses.items()):
        print(f"| {kind} | {status if status > 0 else 'closed by the client' if status == 0 else 'client error'} "
              f"| {count} |")
    server_errors = sum(c for (_, s), c in statuses.items() if s >= 500 or s < 0)
    same = after["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    print(f"\n5xx or failed: {server_errors}")
    if latencies:
        print(f"plain answers: {len(latencies)}, p50 {percentile(latencies, 50) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.0f} ms")
    print(f"RSS before {rss_before:.0f} MiB, after {rss_after:.0f} MiB")
    print(f"after: /health {health['status']} with queue_depth {health['queue_depth']}; hooks left on the model: "
          f"{hooks_on(model) - hooks_before}; the reference answer is {'unchanged' if same else 'CHANGED'}")
    ok = server_errors == 0 and health["queue_depth"] == 0 and hooks_on(model) == hooks_before and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
