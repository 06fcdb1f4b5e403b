"""How one decode step's time splits between the int8 matmuls and everything else.

Example:
    $ python bench/profile_decode.py --model qwen2.5-coder-1.5b-instruct

Times ``model.generate`` of 1 and of 33 greedy tokens at batch 1 (EOS disabled: bench.bench_quantize.eos_disabled) and, inside them, the time spent in
the int8 Linear layers; prints per-token milliseconds for the whole step and for the matmuls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--quantize", default="int8")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    import autopatch
    from autopatch.quantize import Int8Linear
    from bench.bench_quantize import eos_disabled

    model, tok = autopatch.load_model(args.model, quantize=args.quantize)
    spent = [0.0]
    originals = {cls: cls.forward for cls in {type(m) for m in model.modules() if isinstance(m, Int8Linear)}}

    def timed(forward):
        def wrapper(self, x):
            start = time.perf_counter()
            out = forward(self, x)
            spent[0] += time.perf_counter() - start
            return out
        return wrapper

    for cls, forward in originals.items():
        cls.forward = timed(forward)  # type: ignore[method-assign]
    enc = tok(["What is the capital of the country where the Colosseum is located? Answer:"], return_tensors="pt")
    kwargs = dict(do_sample=False, pad_token_id=tok.pad_token_id, logits_processor=eos_disabled(model))
    model.generate(**enc, max_new_tokens=3, **kwargs)
    totals = {}
    for n in (1, 33):
        spent[0] = 0.0
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=n, **kwargs)
        totals[n] = (time.perf_counter() - start, spent[0])
    step = (totals[33][0] - totals[1][0]) / 32 * 1e3
    matmul = (totals[33][1] - totals[1][1]) / 32 * 1e3
    print(f"{args.model} ({args.quantize}): a decode step {step:.1f} ms, of which int8 matmuls {matmul:.1f} ms, "
          f"the rest {step - matmul:.1f} ms")
    for cls, forward in originals.items():
        cls.forward = forward  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
