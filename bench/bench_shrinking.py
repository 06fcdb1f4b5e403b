"""A batch whose answers end at different lengths, with finished rows kept to the end and leaving early, in one run.

Example:
    $ python bench/bench_shrinking.py                                        # embedded Gemma, 16 prompts, 32 tokens
    $ python bench/bench_shrinking.py --model qwen2.5-coder-0.5b-instruct --repeats 3

One batch of the bench's 8 two-hop questions and 8 ordinary requests (``bench.questions``) through
``AutoPatcher.answer`` (the shipped profile, screen and gate), greedy, ``--max-tokens`` new tokens at most:
once as ``model.generate`` alone would run each of its batches, every row to the end of the longest
(:mod:`autopatch.shrinking` with no round ending early), and once as shipped, finished rows leaving once half of
a round's rows are done. The two alternate ``--repeats`` times; the table gives the median seconds of each, the
ratio, the tokens each answer made, and whether the answers are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from autopatch import shrinking  # noqa: E402
from bench.questions import ORDINARY, QUESTIONS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="an embedded model's name or a local path (default: Gemma)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    from autopatch.loading import EMBEDDED_MODEL_NAME, load_model
    from autopatch.patcher import AutoPatcher

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    patcher = AutoPatcher(model, tok)
    prompts = [p for pair in zip(QUESTIONS, ORDINARY) for p in pair]

    def run(kept: bool) -> tuple[float, list]:
        start = time.perf_counter()
        if kept:
            with mock.patch.object(shrinking, "MIN_BUDGET_LEFT", sys.maxsize):  # no round ends early
                answers = patcher.answer(prompts, max_new_tokens=args.max_tokens)
        else:
            answers = patcher.answer(prompts, max_new_tokens=args.max_tokens)
        return time.perf_counter() - start, answers

    run(False)  # warm-up: kernels, the format's cached prefix
    times: dict[bool, list[float]] = {True: [], False: []}
    answers: dict[bool, list] = {}
    for _ in range(args.repeats):
        for kept in (True, False):
            seconds, answers[kept] = run(kept)
            times[kept].append(seconds)
    kept_s, shipped_s = statistics.median(times[True]), statistics.median(times[False])
    same = sum(a.text == b.text for a, b in zip(answers[True], answers[False]))
    print(f"model {args.model or EMBEDDED_MODEL_NAME}, one batch of {len(prompts)} prompts (8 two-hop, 8 ordinary), "
          f"max_tokens {args.max_tokens}, greedy, torch threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| batch | seconds | ratio to rows kept | answers identical |")
    print("|---|---:|---:|---:|")
    print(f"| finished rows kept to the end (model.generate alone) | {kept_s:.2f} | 1.00 | – |")
    print(f"| finished rows leave (autopatch.shrinking) | {shipped_s:.2f} | {kept_s / shipped_s:.2f} | {same}/{len(prompts)} |")
    tokens = [len(tok(a.text, add_special_tokens=False).input_ids) for a in answers[False]]
    print(f"\nTokens of each answer's text (two-hop and ordinary in turn): {', '.join(map(str, tokens))}")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
