"""Throughput and latency of the HTTP server next to the same requests sent straight to ``AutoPatcher.generate``.

Example:
    $ python bench/bench_server.py --requests 8 --concurrency 4 --max-tokens 8     # embedded Gemma (slow on CPU)
    $ python bench/bench_server.py --tiny --requests 32 --concurrency 4            # tiny random model: a smoke run

One process, one model. First every request runs sequentially through
``AutoPatcher.generate`` (same prompt rendering, same gate and profile as the
server, greedy decoding); then a real uvicorn server on 127.0.0.1 gets the same
requests from ``--concurrency`` threads using the ``openai`` client. The server
has one generation worker, so concurrency cannot add throughput: the
throughput ratio (server / direct) is the server's overhead (HTTP, JSON,
validation, queueing, streaming bridge); per-request latency under concurrency
also includes waiting in the queue. Answers are compared as a sanity check.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.questions import QUESTIONS  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few requests, p99 is the slowest one)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _load(args):
    if args.tiny:
        from autopatch.profile import PatchProfile
        from autopatch.prompts import PromptFormat
        from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

        profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))
        return tiny_model_for_bytes("llama"), byte_tokenizer(), "tiny-llama", profile, None
    from autopatch.loading import EMBEDDED_MODEL_NAME, load_model
    from server.cli import default_gate

    model, tok = load_model(args.model)
    gate = default_gate(model)
    return model, tok, args.model or EMBEDDED_MODEL_NAME, getattr(gate, "profile", None), gate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="local path or HF id (default: the embedded Gemma 3 270M)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (mechanics only)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    import openai
    import torch

    from autopatch.patcher import AutoPatcher
    from server.app import create_app
    from server.prompting import build_prompt
    from server.runner import BackgroundServer

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, name, profile, gate = _load(args)
    patcher = AutoPatcher(model, tok, profile, gate)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    device = next(model.parameters()).device

    def run_direct(question: str) -> tuple[float, str]:
        start = time.perf_counter()
        prompt = build_prompt([{"role": "user", "content": question}], tok, patcher.profile.prompt_format)
        ids = tok(prompt.text, add_special_tokens=prompt.add_special_tokens, return_tensors="pt").input_ids.to(device)
        out = patcher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id, questions=[prompt.question])
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return time.perf_counter() - start, text

    run_direct(questions[0])  # warm-up
    start = time.perf_counter()
    direct = [run_direct(q) for q in questions]
    direct_wall = time.perf_counter() - start

    app = create_app(model, tok, model_name=name, profile=patcher.profile, gate=patcher.gate,
                     max_queue=max(32, args.requests), request_timeout_s=3600)
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=3600)

        def run_server(question: str) -> tuple[float, str]:
            start = time.perf_counter()
            resp = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                  max_tokens=args.max_tokens, temperature=0)
            return time.perf_counter() - start, resp.choices[0].message.content or ""

        run_server(questions[0])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            served = list(pool.map(run_server, questions))
        server_wall = time.perf_counter() - start

    rows = [("AutoPatcher.generate (sequential)", 1, direct_wall, [t for t, _ in direct]),
            ("autopatch serve + openai client", args.concurrency, server_wall, [t for t, _ in served])]
    print(f"model {name}, {args.requests} requests, max_tokens {args.max_tokens}, greedy, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| path | concurrency | wall s | req/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, conc, wall, lat in rows:
        print(f"| {label} | {conc} | {wall:.2f} | {len(lat) / wall:.2f} | {percentile(lat, 50) * 1000:.0f} | "
              f"{percentile(lat, 99) * 1000:.0f} |")
    ratio = (args.requests / server_wall) / (args.requests / direct_wall)
    print(f"\nthroughput ratio server/direct: {ratio:.2f} (1.00 = no overhead); "
          f"service time per request: {server_wall / args.requests * 1000:.0f} ms vs {direct_wall / args.requests * 1000:.0f} ms")
    mismatches = sum(a != b for (_, a), (_, b) in zip(direct, served))
    print(f"answers identical to the direct path: {args.requests - mismatches}/{args.requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
