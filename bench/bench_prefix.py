"""Lone requests with and without the prefix cache's ways of finding a start (:mod:`autopatch.prefix_cache`), in one run.

Example:
    $ python bench/bench_prefix.py --model qwen2.5-coder-1.5b-instruct   # its shipped decomposer is the model
    $ python bench/bench_prefix.py --system "You are the help desk of a travel agency. Answer briefly."

The bench's 8 two-hop questions and 8 ordinary requests (``bench.questions``), one at a time, each rendered as the
server renders a chat request (``server.prompting.build_prompt``; ``--system`` adds a system message of the
client's own before it) and answered by ``AutoPatcher.generate`` (the shipped profile, screen, gate and
decomposer), greedy, ``--max-tokens`` new tokens at most, four ways:

* ``no prefix cache``: ``AutoPatcher(reuse_prefix=False)``, every prompt run whole;
* ``the format's start``: only the prompt format's fixed start is reused (as before the decomposition prompt's
  start was registered and lone rows' shared starts found);
* ``registered starts``: the format's and, where the decomposer asks the model, the decomposition prompt's
  (:func:`autopatch.decomposer.decomposition_prefix`);
* ``shipped``: those, and the start a lone row shares with one of the latest lone rows
  (``prefix_cache.RECENT_ROWS``), such as a client's own system prompt.

Before each pass the model's prefix cache is emptied and a new patcher built, so each pass pays its own starts'
first computation, as a fresh server would. The ways alternate ``--repeats`` times; the table gives each one's
median seconds, its ratio to ``shipped``, the prompt tokens its forward passes ran in the last pass (prefills and
prefixes; decode steps not counted) and how many answers equal ``shipped``'s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.questions import ORDINARY, QUESTIONS  # noqa: E402

WAYS = ("no prefix cache", "the format's start", "registered starts", "shipped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="an embedded model's name or a local path (default: Gemma)")
    parser.add_argument("--quantize", default=None, help="a mode of autopatch.quantize (default: the model's CPU default)")
    parser.add_argument("--system", default=None, help="a system message of the client's own before each request")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    import autopatch.patcher
    from autopatch import prefix_cache
    from autopatch.loading import EMBEDDED_MODEL_NAME, load_model
    from autopatch.patcher import AutoPatcher
    from autopatch.quantize import model_quantization
    from autopatch.stopping import cut_at_stop
    from bench.bench_server import ForwardLog
    from bench.machine import cpu_summary
    from server.prompting import build_prompt

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, quantize=args.quantize)
    questions = [p for pair in zip(QUESTIONS, ORDINARY) for p in pair]
    system = [{"role": "system", "content": args.system}] if args.system else []

    def answer(patcher: AutoPatcher, question: str) -> str:
        prompt = build_prompt([*system, {"role": "user", "content": question}], tok, patcher.profile.prompt_format)
        ids = tok(prompt.text, add_special_tokens=prompt.add_special_tokens, return_tensors="pt").input_ids
        out = patcher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id, questions=[prompt.question])
        return cut_at_stop(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), prompt.stop)[0]

    def run(way: str) -> tuple[float, int, list[str], str]:
        prefix_cache.clear_prefix_cache(model)
        log.take()
        start = time.perf_counter()
        with ExitStack() as stack:
            if way in ("the format's start", "registered starts"):
                stack.enter_context(mock.patch.object(prefix_cache, "RECENT_ROWS", 0))  # no lone row remembered
            if way == "the format's start":
                stack.enter_context(mock.patch.object(autopatch.patcher, "decomposition_prefix", lambda fmt, tok: []))
            patcher = AutoPatcher(model, tok, reuse_prefix=way != "no prefix cache")
            texts = [answer(patcher, q) for q in questions]
        seconds = time.perf_counter() - start
        prefix_cache.clear_prefix_cache(model)  # the next way starts from nothing, its deque length its own
        return seconds, sum(rows * n for rows, n, _ in log.take() if n > 1), texts, patcher.decomposer

    log = ForwardLog(model)  # every forward call's rows and tokens: a pass's prompt tokens
    try:
        run("shipped")  # warm-up: kernels, first calls
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        ran: dict[str, tuple[int, list[str], str]] = {}
        for _ in range(args.repeats):
            for way in WAYS:
                seconds, prefilled, texts, decomposer = run(way)
                times[way].append(seconds)
                ran[way] = (prefilled, texts, decomposer)
    finally:
        log.close()
    shipped = statistics.median(times["shipped"])
    print(f"model {args.model or EMBEDDED_MODEL_NAME} ({model_quantization(model)}), decomposer {ran['shipped'][2]}, "
          f"{len(questions)} requests one at a time (8 two-hop, 8 ordinary"
          f"{', a system message of their own' if args.system else ''}), max_tokens {args.max_tokens}, greedy, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}, CPU: {cpu_summary()}\n")
    print("| requests one at a time | seconds | ratio to shipped | prompt tokens run | answers equal to shipped's |")
    print("|---|---:|---:|---:|---:|")
    for way in WAYS:
        seconds = statistics.median(times[way])
        same = sum(a == b for a, b in zip(ran[way][1], ran["shipped"][1]))
        print(f"| {way} | {seconds:.2f} | {seconds / shipped:.2f} | {ran[way][0]} | {same}/{len(questions)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
