"""The same generations on the thread that loaded the model and on a second thread, as the server runs them.

Example:
    $ python bench/bench_threads.py                  # embedded Gemma, 8 answer() calls per pass

libgomp keeps one OpenMP thread pool per thread that ever ran a parallel region; with two pools on few cores it
stops spinning between regions. This bench times 8 ``AutoPatcher.answer`` calls (medians of ``--repeats``): on the
loading thread, on a second thread while the loading thread's pool is still there, and on a third thread after
the loading thread released it (:func:`autopatch.kernels.release_openmp_pool`, what the server's worker does
when it starts). Ratios are against the loading thread, in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.questions import QUESTIONS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from autopatch import load_model
    from autopatch.kernels import release_openmp_pool
    from autopatch.patcher import AutoPatcher
    from autopatch.quantize import model_quantization

    torch.set_grad_enabled(False)
    model, tok = load_model(args.model)
    patcher = AutoPatcher(model, tok)
    questions = list(QUESTIONS)[:8]

    def seconds() -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for q in questions:
                patcher.answer(q, max_new_tokens=16)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def on_a_new_thread() -> float:
        out: list[float] = []
        thread = threading.Thread(target=lambda: (torch.set_grad_enabled(False), out.append(seconds())))
        thread.start()
        thread.join()
        return out[0]

    seconds()  # warm-up
    loading = seconds()
    second = on_a_new_thread()
    released = release_openmp_pool()
    third = on_a_new_thread()
    print(f"model: {model.config.model_type} ({model_quantization(model)}), {len(questions)} answer() calls of 16 "
          f"tokens, medians of {args.repeats}, threads: {torch.get_num_threads()}\n")
    print("| where | seconds | ratio |")
    print("|---|---|---|")
    print(f"| the loading thread | {loading:.2f} | 1.00x |")
    print(f"| a second thread, the loading thread's pool kept | {second:.2f} | {second / loading:.2f}x |")
    print(f"| a third thread, after release_openmp_pool() ({'released' if released else 'not released'}) | "
          f"{third:.2f} | {third / loading:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
