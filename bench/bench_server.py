"""Server throughput at several concurrencies, as ratios to the same requests sent one at a time to ``AutoPatcher.generate``.

Example:
    $ python bench/bench_server.py --threads 1                       # embedded Gemma, 32 requests of 16 tokens
    $ python bench/bench_server.py --ordinary-every 3 --max-tokens 64  # a third of them ordinary requests
    $ python bench/bench_server.py --tiny --requests 32 --threads 1  # tiny random model: mechanics only

One process, one model. First every request runs sequentially through
``AutoPatcher.generate`` (same prompt rendering, gate and profile as the
server, greedy decoding, stopping at the format's stop strings with a
stopping criterion as the server does): that is the one-at-a-time baseline. Then the
server's batched call (``server.batching.run_batch``) in this process, no HTTP,
twice: with finished rows kept to the end of each ``generate`` (as
``model.generate`` alone keeps them) and as shipped (:mod:`autopatch.shrinking`);
with every forward pass of the baseline and of the shipped batches logged, and the
most any scheduler could gain from them. Then a real
uvicorn server on 127.0.0.1 (micro-batching on: ``--max-batch-size``,
``--batch-window-ms``, ``--max-batch-wait-ms``) gets the same requests from 1, 4 and 8 clients
(``--concurrency``; client processes of their own, or threads of this process with ``--clients threads``)
through the ``openai`` client, every ``--stream-every``-th
one streamed (default: every second; 0: none), read to its end. For each
concurrency it prints wall time, requests per second, the throughput ratio
server / one-at-a-time (above 1.00: batching gains more than HTTP costs), the
ratio to the server's own throughput at one client, p50/p99 latency, and how
many answers equal the baseline's (the baseline's text cut at the format's stop
strings, as the server cuts it; a stream's text is its deltas joined).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
# Nothing heavy at the top: each client process imports this file (torch, autopatch and the model stay in main).


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few requests, p99 is the slowest one)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class ForwardLog:
    """Every forward call of the model until :meth:`close`: (rows, tokens per row, seconds). Hooks, so
    ``forward``'s signature (which ``generate`` inspects) stays the model's own."""

    def __init__(self, model):
        self.calls, self._start = [], 0.0
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def close(self) -> None:
        """Remove the hooks (the server's rows run without them)."""
        for handle in self._handles:
            handle.remove()

    def _pre(self, module, args, kwargs):
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.calls.append((int(ids.shape[0]), int(ids.shape[1]), time.perf_counter() - self._start))

    def take(self) -> list[tuple[int, int, float]]:
        calls, self.calls = self.calls, []
        return calls


def ceiling(one: list[tuple[int, int, float]], batched: list[tuple[int, int, float]], size: int) -> list[str]:
    """What the batched run's own forward passes would cost if every decode step ran in a full batch (its decode
    rows packed ``size`` to a step, at the cost of its widest steps), its prefills as they ran: the most a scheduler
    could gain on this workload over the one-at-a-time run, before HTTP and Python between the steps. (A lone
    request runs more prompt tokens than its share of a batch's, whose rows share their prompts' start, so this
    counts the batched run's tokens, not the lone run's.)"""
    def split(calls):
        return [c for c in calls if c[1] > 1], [c for c in calls if c[1] == 1]

    one_prefill, one_decode = split(one)
    batch_prefill, batch_decode = split(batched)
    widest = max((rows for rows, _, _ in batch_decode), default=1)
    step = sum(t for rows, _, t in batch_decode if rows == widest) / max(1, sum(rows == widest for rows, _, _ in batch_decode))
    row_steps = sum(rows for rows, _, _ in batch_decode)
    ideal = sum(t for *_, t in batch_prefill) + -(-row_steps // size) * step
    total = sum(t for *_, t in one)
    lines = ["| run | prefill calls | prompt tokens | prefill s | decode steps | decode row-steps | decode s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, (pre, dec) in (("one at a time", (one_prefill, one_decode)), (f"batches of {size}", (batch_prefill, batch_decode))):
        lines.append(f"| {label} | {len(pre)} | {sum(r * n for r, n, _ in pre)} | {sum(t for *_, t in pre):.2f} | "
                     f"{len(dec)} | {sum(r for r, _, _ in dec)} | {sum(t for *_, t in dec):.2f} |")
    lines.append(f"\nA decode step costs {step * 1000:.0f} ms at {widest} rows against "
                 f"{sum(t for *_, t in one_decode) / max(1, len(one_decode)) * 1000:.0f} ms at 1. The batched run's "
                 f"prefills as they ran and its {row_steps} decode row-steps in full steps of {size}: {ideal:.2f} s of "
                 f"forward passes against {total:.2f} s one at a time, at most {total / ideal:.2f}x.")
    return lines


_CLIENTS: dict[str, object] = {}


def ask_server(job: tuple[str, str, str, int, bool]) -> tuple[float, str]:
    """One chat request through the ``openai`` client (one client per process, reused): ``(seconds, text)``.
    A module-level function, so that a client process can run it."""
    url, name, question, max_tokens, stream = job
    client = _client(url)
    start = time.perf_counter()
    messages = [{"role": "user", "content": question}]
    if stream:
        chunks = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,  # type: ignore[attr-defined]
                                                temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # read to its end first
        return time.perf_counter() - start, text
    resp = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, temperature=0)  # type: ignore[attr-defined]
    return time.perf_counter() - start, resp.choices[0].message.content or ""


def _client(url: str):
    import openai

    if url not in _CLIENTS:
        _CLIENTS[url] = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    return _CLIENTS[url]


def _client_loop(url: str, jobs: list, go, out) -> None:
    """One client process: warm up (the client, its connection and the ``openai`` package's lazy imports, through
    ``/v1/models``, which runs no model), say so, wait for the start, then send its jobs one after another."""
    _client(url).models.list()
    out.put(None)
    go.wait()
    out.put([(index, *ask_server(job)) for index, job in jobs])


def run_clients(kind: str, level: int, url: str, jobs: list) -> tuple[float, list[tuple[float, str]]]:
    """``jobs`` sent by ``level`` closed-loop clients; ``(wall seconds, (latency, text) per job)``.

    ``processes``: client ``k`` is a process of its own (as real clients are: it does not share the server's
    interpreter lock) that sends jobs ``k, k + level, ...`` in turn; all are started and warm before the clock
    starts. ``threads``: a pool of ``level`` threads of this process takes the jobs in order.
    """
    if kind == "threads":
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=level) as pool:
            served = list(pool.map(ask_server, jobs))
        return time.perf_counter() - start, served
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    shares = [[(i, jobs[i]) for i in range(k, len(jobs), level)] for k in range(level)]
    clients = [context.Process(target=_client_loop, args=(url, share, go, out), daemon=True) for share in shares]
    for client in clients:
        client.start()
    for _ in clients:
        out.get()
    start = time.perf_counter()
    go.set()
    done = [out.get() for _ in clients]
    wall = time.perf_counter() - start
    for client in clients:
        client.join()
    by_index = {index: (latency, text) for results in done for index, latency, text in results}
    return wall, [by_index[i] for i in range(len(jobs))]


def _load(args):
    if args.tiny:
        from autopatch.profile import PatchProfile
        from autopatch.prompts import PromptFormat
        from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

        profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))
        return tiny_model_for_bytes("llama"), byte_tokenizer(), "tiny-llama", profile
    from autopatch.loading import EMBEDDED_MODEL_NAME, load_model

    model, tok = load_model(args.model, quantize=args.quantize, batch_invariant=args.batch_invariant)
    return model, tok, args.model or EMBEDDED_MODEL_NAME, None  # None: the profile of the gate shipped for it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="local path or HF id (default: the embedded Gemma 3 270M)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (mechanics only)")
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--stream-every", type=int, default=2, help="stream every N-th request (0: none)")
    parser.add_argument("--ordinary-every", type=int, default=0,
                        help="every N-th request an ordinary one (bench.questions.ORDINARY), the rest two-hop (0: none)")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client counts")
    parser.add_argument("--clients", choices=("processes", "threads"), default="processes",
                        help="clients in processes of their own (as real clients are), or threads of this process "
                             "(they share the server's interpreter lock; the only way before --clients)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's (1: batching off)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="the server's")
    parser.add_argument("--max-batch-wait-ms", type=float, default=100.0, help="the server's (0: the gap alone)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quantize", default=None, help="a mode of autopatch.quantize (default: the model's CPU default)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="answers independent of the batch (autopatch.invariance.set_batch_invariant)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch
    from transformers import StoppingCriteriaList

    from autopatch import shrinking
    from autopatch.kernels import release_openmp_pool
    from autopatch.patcher import AutoPatcher
    from autopatch.stopping import StopOnText, cut_at_stop
    from bench.questions import ORDINARY, QUESTIONS
    from server.app import create_app
    from server.prompting import build_prompt
    from server.runner import BackgroundServer

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, name, profile = _load(args)
    patcher = AutoPatcher(model, tok, profile)
    questions = [ORDINARY[i // args.ordinary_every % len(ORDINARY)] if args.ordinary_every
                 and i % args.ordinary_every == args.ordinary_every - 1 else QUESTIONS[i % len(QUESTIONS)]
                 for i in range(args.requests)]
    device = next(model.parameters()).device

    def run_direct(question: str) -> tuple[float, str]:
        start = time.perf_counter()
        prompt = build_prompt([{"role": "user", "content": question}], tok, patcher.profile.prompt_format)
        ids = tok(prompt.text, add_special_tokens=prompt.add_special_tokens, return_tensors="pt").input_ids.to(device)
        criteria = StoppingCriteriaList([StopOnText(tok, prompt.stop, ids.shape[1])]) if prompt.stop else None
        out = patcher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id, questions=[prompt.question], stopping_criteria=criteria)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return time.perf_counter() - start, cut_at_stop(text, prompt.stop)[0]  # as the server cuts it

    run_direct(questions[0])  # warm-up
    log = ForwardLog(model)
    start = time.perf_counter()
    direct = [run_direct(q) for q in questions]
    direct_wall = time.perf_counter() - start
    forwards = {"one": log.take()}
    rows = [("AutoPatcher.generate, one at a time", 1, direct_wall, [t for t, _ in direct], args.requests)]
    batch_tokens = []
    if args.max_batch_size > 1:  # the server's batched call alone, in this process: what batching can give at most
        from server.batching import run_batch
        from server.jobs import GenerationJob

        def job_of(question: str, emit) -> GenerationJob:
            prompt = build_prompt([{"role": "user", "content": question}], tok, patcher.profile.prompt_format)
            ids = tok(prompt.text, add_special_tokens=prompt.add_special_tokens).input_ids
            return GenerationJob(prompt_ids=ids, question=prompt.question, max_new_tokens=args.max_tokens,
                                 profile=patcher.profile, gate=patcher.gate, patching=True, emit=emit,
                                 stop=prompt.stop)

        def run_batches(label: str, tokens: list | None) -> None:
            """Each request's latency is from its batch's start to its answer (rows the gate leaves alone are
            answered before the batch ends: server.batching.run_batch's ``on_final``)."""
            start, texts, latencies = time.perf_counter(), [], []
            for k in range(0, len(questions), args.max_batch_size):
                began = time.perf_counter()
                batch = questions[k:k + args.max_batch_size]
                answers: list[list] = [[] for _ in batch]
                jobs = [job_of(q, lambda e, got=got: got.append((time.perf_counter(), e)))
                        for q, got in zip(batch, answers)]
                for got, event in zip(answers, run_batch(model, tok, jobs)):
                    if event is not None:
                        got.append((time.perf_counter(), event))
                done = [(at, event[1]) for got in answers for at, event in got if event[0] == "done"]
                texts += [r.text for _, r in done]
                if tokens is not None:
                    tokens.append([r.completion_tokens for _, r in done])
                latencies += [at - began for at, _ in done]
            same = sum(a == b for (_, a), b in zip(direct, texts))
            rows.append((label, 1, time.perf_counter() - start, latencies, same))

        label = f"server.batching.run_batch in this process, batches of {args.max_batch_size}"
        with mock.patch.object(shrinking, "MIN_BUDGET_LEFT", sys.maxsize):  # no round ends early: one generate
            run_batches(label + ", finished rows kept to the end", None)
        log.take()
        run_batches(label, batch_tokens)
        forwards["batched"] = log.take()

    log.close()
    # As `autopatch serve` does when its worker starts on the thread that loaded the model: this thread is done
    # with torch, so its idle OpenMP pool goes (autopatch.kernels.release_openmp_pool).
    release_openmp_pool()
    worker_batches: list[str] = []
    app = create_app(model, tok, model_name=name, profile=patcher.profile, gate=patcher.gate,
                     max_queue=max(32, args.requests), request_timeout_s=3600, max_batch_size=args.max_batch_size,
                     batch_window_s=args.batch_window_ms / 1000, max_batch_wait_s=args.max_batch_wait_ms / 1000)
    with BackgroundServer(app) as srv:
        jobs = [(srv.url, name, question, args.max_tokens,
                 bool(args.stream_every and i % args.stream_every == args.stream_every - 1))
                for i, question in enumerate(questions)]
        ask_server((srv.url, name, questions[0], args.max_tokens, bool(args.stream_every)))  # warm-up
        sizes = app.state.served.worker.batch_sizes
        for level in levels:
            before = sizes.copy()
            wall, served = run_clients(args.clients, level, srv.url, jobs)
            ran = sizes - before
            worker_batches.append(f"{level} client(s): " + ", ".join(f"{ran[k]}×{k}" for k in sorted(ran)))
            same = sum(a == b for (_, a), (_, b) in zip(direct, served))
            rows.append((f"autopatch serve + openai client {args.clients} (batch <= {args.max_batch_size})", level, wall,
                         [t for t, _ in served], same))

    streamed = f"every {args.stream_every} streamed" if args.stream_every else "none streamed"
    if args.ordinary_every:
        streamed += f", every {args.ordinary_every} an ordinary request"
    from autopatch.invariance import batch_invariant
    from autopatch.quantize import model_quantization

    invariant = ", batch-invariant" if batch_invariant(model) else ""
    from bench.machine import cpu_name

    print(f"model {name} ({model_quantization(model)}{invariant}), {args.requests} requests ({streamed}), max_tokens {args.max_tokens}, greedy, "
          f"torch threads {torch.get_num_threads()}, batch window {args.batch_window_ms:g} ms"
          f" (held up to {args.max_batch_wait_ms:g} ms for the last batch's size), CPU: {cpu_name()}\n")
    print("| path | concurrency | wall s | req/s | ratio to one-at-a-time | ratio to the server at 1 client | p50 ms "
          "| p99 ms | answers identical |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    server_at_1 = next((wall for label, level, wall, *_ in rows if label.startswith("autopatch serve") and level == 1),
                       None)
    for label, level, wall, latencies, same in rows:
        to_server = f"{server_at_1 / wall:.2f}" if server_at_1 and label.startswith("autopatch serve") else "–"
        print(f"| {label} | {level} | {wall:.2f} | {len(latencies) / wall:.2f} | {direct_wall / wall:.2f} | "
              f"{to_server} | {percentile(latencies, 50) * 1000:.0f} | {percentile(latencies, 99) * 1000:.0f} | "
              f"{same}/{args.requests} |")
    print("\nBatches the server's worker ran (count×size): " + "; ".join(worker_batches))
    if args.ordinary_every:
        ordinary = {i for i in range(args.requests) if i % args.ordinary_every == args.ordinary_every - 1}
        print("\np50 latency ms, ordinary / two-hop requests: " + "; ".join(
            f"{label.split(' (')[0].split(',')[0]} at {level}: "
            f"{percentile([t for i, t in enumerate(latencies) if i in ordinary], 50) * 1000:.0f} / "
            f"{percentile([t for i, t in enumerate(latencies) if i not in ordinary], 50) * 1000:.0f}"
            for label, level, wall, latencies, same in rows))
    if batch_tokens:
        print("\nTokens each row of the in-process batches made (finished rows leave the batch, autopatch.shrinking): "
              + "; ".join(", ".join(map(str, b)) for b in batch_tokens))
        print("\nForward passes of the model in the one-at-a-time and the in-process batched runs:\n")
        print("\n".join(ceiling(forwards["one"], forwards["batched"], args.max_batch_size)))
    return 0 if all(same == args.requests for *_, same in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
