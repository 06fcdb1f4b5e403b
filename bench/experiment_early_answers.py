"""When should the server answer a row: when its batch ends, or as soon as its answer is final? Alternated in one
server process, so the machine's drift between runs cancels out.

Example:
    $ python bench/experiment_early_answers.py                                    # 32 two-hop requests, 8 clients
    $ python bench/experiment_early_answers.py --ordinary-every 3 --max-tokens 64  # a third of them ordinary

Three ways, each run ``--reps`` times in alternating order, from ``--concurrency`` client processes (as in
``bench/bench_server.py``, every second request streamed):

* ``batch end``: every row answered when its batch's ``AutoPatcher.generate`` returns;
* ``left alone``: rows the gate leaves alone answered when the unpatched generation ends (``on_final``);
* ``every row``: patched rows too, as the patched continuation's rounds end them (``on_final`` of each round,
  through ``autopatch.shrinking``'s ``on_finished``).

Per run: wall seconds, p50 latency, the batches the worker ran, and the seconds spent inside the worker's
``run_batch`` (the batches themselves, without the gaps between them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _open_client(url: str, schedule: list, go, out) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from bench.bench_server import _client, ask_server

    _client(url).models.list()
    out.put(None)
    go.wait()
    start = time.perf_counter()

    def send(item):
        at, job = item
        time.sleep(max(0.0, start + at - time.perf_counter()))
        return ask_server(job)

    with ThreadPoolExecutor(max_workers=len(schedule)) as pool:
        out.put(list(pool.map(send, schedule)))


def open_loop(url: str, jobs: list, rate: float) -> tuple[float, list]:
    """``jobs`` sent from one client process at Poisson arrival times (``rate`` a second, seed 0), each on its
    own thread as it falls due; ``(wall seconds, (latency, text) per job)``."""
    import multiprocessing
    import random

    gaps = random.Random(0)
    at, schedule = 0.0, []
    for job in jobs:
        schedule.append((at, job))
        at += gaps.expovariate(rate)
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    client = context.Process(target=_open_client, args=(url, schedule, go, out), daemon=True)
    client.start()
    out.get()
    start = time.perf_counter()
    go.set()
    served = out.get()
    wall = time.perf_counter() - start
    client.join()
    return wall, served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--ordinary-every", type=int, default=0, help="every N-th request an ordinary one (0: none)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", default="8", help="comma-separated client counts")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: requests arrive at this many a second (Poisson, seeded), whatever the answers")
    args = parser.parse_args(argv)

    import torch

    import server.worker as worker_module
    from autopatch.kernels import release_openmp_pool
    from autopatch.loading import load_model
    from autopatch.patcher import AutoPatcher
    from bench.bench_server import ask_server, percentile, run_clients
    from bench.questions import ORDINARY, QUESTIONS
    from server.app import create_app
    from server.runner import BackgroundServer

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    patcher = AutoPatcher(model, tok)
    every = args.ordinary_every
    questions = [ORDINARY[i // every % len(ORDINARY)] if every and i % every == every - 1 else QUESTIONS[i % len(QUESTIONS)]
                 for i in range(args.requests)]
    generate, hand_over = AutoPatcher.generate_with_reports, AutoPatcher._hand_over

    def at_batch_end(self, *a, on_final=None, **k):
        return generate(self, *a, **k)

    ways = {"batch end": (at_batch_end, hand_over), "left alone": (generate, lambda self, *a, **k: None),
            "every row": (generate, hand_over)}
    spans: list[float] = []
    run_batch = worker_module.run_batch

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return run_batch(*a, **k)
        finally:
            spans.append(time.perf_counter() - start)

    worker_module.run_batch = timed
    release_openmp_pool()
    app = create_app(model, tok, model_name="m", profile=patcher.profile, gate=patcher.gate, max_queue=64,
                     request_timeout_s=3600, max_batch_size=8)
    print(f"{args.requests} requests ({'every ' + str(every) + ' ordinary, ' if every else ''}every 2 streamed), "
          f"max_tokens {args.max_tokens}, torch threads {args.threads}\n")
    print("| rep | way | clients | wall s | p50 ms | p90 ms | batches (size: count) | s in run_batch |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    with BackgroundServer(app) as srv:
        jobs = [(srv.url, "m", q, args.max_tokens, i % 2 == 1) for i, q in enumerate(questions)]
        ask_server(jobs[0])
        sizes = app.state.served.worker.batch_sizes
        names = list(ways)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                AutoPatcher.generate_with_reports, AutoPatcher._hand_over = ways[name]
                for level in (int(c) for c in args.concurrency.split(",")):
                    before = sizes.copy()
                    spans.clear()
                    wall, served = (open_loop(srv.url, jobs, args.rate) if args.rate else
                                    run_clients("processes", level, srv.url, jobs))
                    ran = sizes - before
                    print(f"| {rep} | {name} | {'open ' + str(args.rate) + '/s' if args.rate else level} | {wall:.2f} "
                          f"| {percentile([t for t, _ in served], 50) * 1000:.0f} | {percentile([t for t, _ in served], 90) * 1000:.0f} "
                          f"| {', '.join(f'{k}: {ran[k]}' for k in sorted(ran))} | {sum(spans):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
