"""Quantization modes side by side, in one run: load time, peak memory, prefill and decode speed, as ratios.

Example:
    $ python bench/bench_quantize.py --model qwen2.5-coder-1.5b-instruct            # none vs int8 vs int8-dynamic
    $ python bench/bench_quantize.py --model gemma-3-270m --modes none,int8 --repeats 3

Each mode runs in a fresh child process (so peak RSS and load time are that mode's own), twice: the first load
with an empty quantized-weights cache, then a later load that reads it. Then, at batch size 1 on the
bench's two-hop questions in the profile's prompt format, greedy with EOS disabled (:func:`eos_disabled`):

* ``prefill s``: from the call to its first token (the prompt's forward pass plus one LM-head step);
* ``decode tok/s``: the tokens after the first of a ``--new-tokens`` generation, over the time from the first
  token to the last, each token's time taken as it is made (not one generation's time less another's: where a
  prefill is most of a call, the two prefills' difference would be the figure);
* ``bs=8 s``: ``AutoPatcher.answer`` (the shipped profile, screen and gate) on all 8 questions at once.

Each timing is the median of ``--repeats``; ratios are against ``none`` in the same run, on the same machine.

``--llama-cpp`` adds llama.cpp (``pip install llama-cpp-python``, which builds from source) on the very GGUF
file autopatch unpacks, as the CPU anchor: the same rendered prompts, greedy, its own prefill and decode timed
the same way (``Llama.generate``, greedy, each token's time taken as it is yielded); its "load" is opening the
GGUF file (memory-mapped, nothing to unpack).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from bench.machine import cpu_summary  # noqa: E402


def _child(model_name: str | None, mode: str, new_tokens: int, repeats: int, timed: bool) -> dict:
    """One mode in this process: load (timed), and unless ``timed`` is False, the speed figures."""
    import resource

    import torch
    from transformers import StoppingCriteriaList

    torch.set_grad_enabled(False)
    import autopatch
    from bench.questions import QUESTIONS

    started = time.perf_counter()
    model, tok = autopatch.load_model(model_name, quantize=mode)
    result: dict = {"load_s": time.perf_counter() - started}
    if timed:
        patcher = autopatch.AutoPatcher(model, tok)
        fmt = patcher.profile.prompt_format
        singles = [tok([fmt.render(q, tok)], return_tensors="pt") for q in QUESTIONS]
        clock = TokenClock()
        gen = dict(do_sample=False, pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([clock]),
                   logits_processor=eos_disabled(model))

        def run(n: int) -> tuple[float, float]:
            """Seconds to the first token, and per token after it, summed over the prompts."""
            first = after = 0.0
            for enc in singles:
                clock.start()
                model.generate(**enc, max_new_tokens=n, **gen)
                first, after = first + clock.first_s(), after + clock.after_s()
            return first / len(singles), after / (len(singles) * (n - 1))

        run(2)  # warm-up
        runs = [run(new_tokens) for _ in range(repeats)]
        prefill = statistics.median(r[0] for r in runs)
        per_token = statistics.median(r[1] for r in runs)
        batched = []
        for _ in range(repeats):
            t = time.perf_counter()
            patcher.answer(QUESTIONS, max_new_tokens=16)
            batched.append(time.perf_counter() - t)
        result.update(prefill_s=prefill, decode_tps=1 / per_token,
                      answer8_s=statistics.median(batched), prompts=[fmt.render(q, tok) for q in QUESTIONS])
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def eos_disabled(model):
    """A logits processor that makes every ``generate`` call run to ``max_new_tokens``: EOS masked in place.

    Not ``min_new_tokens``: its processor compares the whole vocabulary with the EOS ids and copies the scores on
    every step (Gemma's vocabulary has 262,144 entries), a cost no ordinary generation pays."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    eos = model.generation_config.eos_token_id
    ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)

    class NoEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, ids] = -float("inf")
            return scores

    return LogitsProcessorList([NoEos()])


class TokenClock:
    """A stopping criterion that never stops: it notes when each token of a ``generate`` call is made."""

    def __init__(self) -> None:
        import torch  # here, not at the top: the llama.cpp child imports this module and must not load torch

        self._bool = torch.bool

    def start(self) -> None:
        self.began, self.times = time.perf_counter(), []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return input_ids.new_zeros(input_ids.shape[0], dtype=self._bool)

    def first_s(self) -> float:
        return self.times[0] - self.began

    def after_s(self) -> float:
        return self.times[-1] - self.times[0]


def _llama_child(model_name: str | None, new_tokens: int, repeats: int, threads: int, prompts_file: str) -> dict:
    """llama.cpp on the embedded model's own GGUF file, timed like :func:`_child`, on the prompts it rendered."""
    import resource

    import llama_cpp

    from autopatch.loading import _assemble_gguf
    from autopatch.models import DEFAULT_MODEL, embedded_model

    spec = embedded_model(model_name or DEFAULT_MODEL)
    if spec is None:
        raise SystemExit("--llama-cpp needs an embedded model (it runs the GGUF file autopatch ships)")
    gguf = _assemble_gguf(spec, lambda _msg: None)
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - started
    texts = json.loads(Path(prompts_file).read_text())
    prompts = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]

    eos = llm.token_eos()

    def no_eos(_ids, scores):  # a fixed length, as EOS disabled does for the torch modes
        scores[eos] = -float("inf")
        return scores

    def run(n: int) -> tuple[float, float]:
        """Seconds to the first token, and per token after it, as :func:`_child` times them."""
        first = after = 0.0
        for tokens in prompts:
            llm.reset()  # no reuse of the previous prompt's cache: each prefill is timed whole
            start, times = time.perf_counter(), []
            for _token in llm.generate(tokens, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([no_eos])):
                times.append(time.perf_counter())
                if len(times) == n:
                    break
            first, after = first + times[0] - start, after + times[-1] - times[0]
        return first / len(prompts), after / (len(prompts) * (n - 1))

    run(2)
    runs = [run(new_tokens) for _ in range(repeats)]
    return {"load_s": load_s, "first_load_s": load_s, "prefill_s": statistics.median(r[0] for r in runs),
            "decode_tps": 1 / statistics.median(r[1] for r in runs), "answer8_s": float("nan"),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def _spawn(args: argparse.Namespace, mode: str, timed: bool, cache: str) -> dict | None:
    env = dict(os.environ, AUTOPATCH_QUANTIZED_CACHE=cache)  # an empty quantized cache for this run only
    root = str(Path(__file__).resolve().parent.parent)
    call = f"_child({args.model!r}, {mode!r}, {args.new_tokens}, {args.repeats}, {timed!r})" if mode != "llama.cpp" \
        else f"_llama_child({args.model!r}, {args.new_tokens}, {args.repeats}, {args.threads}, {cache + '/prompts.json'!r})"
    code = f"import json,sys; sys.path.insert(0, {root!r}); from bench.bench_quantize import _child, _llama_child; " \
           f"print('RESULT ' + json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:  # a crash is a row of the table, not the end of the run
        why = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        print(f"mode {mode} failed (exit code {out.returncode}): {why[0][:300]}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", default="none,int8,int8-dynamic")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-cpp", action="store_true", help="add llama.cpp on the same GGUF file (the CPU anchor)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode is timed from the first token to the last")
    import torch

    args.threads = torch.get_num_threads()
    modes = [m for m in args.modes.split(",") if m]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="autopatch-quantized-") as cache:
        failed: dict[str, str] = {}
        for mode in modes:
            first = _spawn(args, mode, timed=False, cache=cache)
            later = _spawn(args, mode, timed=True, cache=cache) if first else None
            if first is None or later is None:
                failed[mode] = "crashed (see stderr)"
                continue
            rows[mode] = {**later, "first_load_s": first["load_s"], "peak_rss_gb": max(first["peak_rss_gb"],
                                                                                       later["peak_rss_gb"])}
        if args.llama_cpp and rows:
            (Path(cache) / "prompts.json").write_text(json.dumps(next(iter(rows.values()))["prompts"]))
            llama = _spawn(args, "llama.cpp", timed=True, cache=cache)
            if llama is None:
                failed["llama.cpp"] = "crashed (see stderr)"
            else:
                rows["llama.cpp"] = llama
    base = rows.get("none")
    print(f"model: {args.model or 'gemma-3-270m'}, threads: {torch.get_num_threads()}, new tokens: {args.new_tokens}, "
          f"repeats: {args.repeats}, CPU: {cpu_summary()}\n")
    print("| mode | first load s | later load s | peak RSS GB | prefill s (bs=1) | decode tok/s (bs=1) | "
          "answer() 8 questions s |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        def ratio(key: str, higher_is_better: bool = False, r: dict = r, mode: str = mode) -> str:
            if base is None or mode == "none":
                return ""
            x = r[key] / base[key] if higher_is_better else base[key] / r[key]
            return f" ({x:.2f}x)"
        print(f"| {mode} | {r['first_load_s']:.1f} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{r['prefill_s']:.3f}{ratio('prefill_s')} | {r['decode_tps']:.2f}{ratio('decode_tps', True)} | "
              + (f"{r['answer8_s']:.2f}{ratio('answer8_s')} |" if r["answer8_s"] == r["answer8_s"] else "– |"))
    for mode, why in failed.items():
        print(f"| {mode} | {why} | | | | | |")
    print("\n(x) = speed relative to none: above 1 is faster.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
