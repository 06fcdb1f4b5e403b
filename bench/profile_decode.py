"""How one decode step's time splits between the quantized matmuls and everything else.

Example:
    $ python bench/profile_decode.py --model qwen2.5-coder-1.5b-instruct
    $ python bench/profile_decode.py --model gemma-3-270m --quantize int4-bf16 --against-unchecked --repeats 5

Prints the bytes the packed layers hold (what a decode step reads), by weight bits and inputs. Times
``model.generate`` of 1 and of 33 greedy tokens at batch 1 (EOS disabled: bench.bench_quantize.eos_disabled) and, inside them, the time spent in
the quantized Linear layers; prints per-token milliseconds for the whole step and for the matmuls.

``--against-unchecked`` alternates, ``--repeats`` times in this process, the shipped packed layers (each calls its
kernel through :func:`autopatch.kernels.bind`, the weight checked once) with the same layers calling
:func:`autopatch.kernels.w8_matmul` / ``w4_matmul``, which check every operand on every call (as before commit
6f770d7), and prints each way's median step and matmul time and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def checked_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A packed layer's forward with every call through its checked matmul (``type(self).matmul``)."""
    rows = x.reshape(-1, self.in_features).float().contiguous()
    out = type(self).matmul(rows, self.qweight, self.gscale, self.bias, n=self.out_features, prefill=self.prefill)
    return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def layer_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Each packed layer's bytes (weights and scales: what a decode step reads of it), by module name."""
    from autopatch.quantize import PackedLinear

    return {name: sum(t.numel() * t.element_size() for t in (module.qweight, module.gscale))
            for name, module in model.named_modules() if isinstance(module, PackedLinear)}


def packed_bytes(model: torch.nn.Module) -> str:
    """What a decode step reads from the packed layers, by weight bits and by inputs (int8-rounded or float32)."""
    from collections import Counter

    from autopatch.kernels import Q8

    modules = dict(model.named_modules())
    size: Counter[str] = Counter()
    for name, n in layer_bytes(model).items():
        module = modules[name]
        inputs = "int8 inputs" if module.prefill == Q8 else "float32 inputs"
        size[f"int{module.bits} weights, {inputs}"] += n
    total = sum(size.values())
    parts = ", ".join(f"{kind} {n / 1e6:.0f} MB ({n / total:.0%})" for kind, n in sorted(size.items()))
    return f"packed layers read a decode step: {total / 1e6:.0f} MB ({parts})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--against-unchecked", action="store_true",
                        help="alternate the bound kernel calls with calls that check every operand")
    parser.add_argument("--repeats", type=int, default=1, help="passes of each way (with --against-unchecked)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    import autopatch
    from autopatch.quantize import Int8Linear, PackedLinear
    from bench.bench_quantize import eos_disabled

    model, tok = autopatch.load_model(args.model, quantize=args.quantize)
    print(packed_bytes(model))
    spent = [0.0]
    originals = {cls: cls.forward for cls in {type(m) for m in model.modules() if isinstance(m, Int8Linear)}}

    def timed(forward):
        def wrapper(self, x):
            start = time.perf_counter()
            out = forward(self, x)
            spent[0] += time.perf_counter() - start
            return out
        return wrapper

    enc = tok(["What is the capital of the country where the Colosseum is located? Answer:"], return_tensors="pt")
    kwargs = dict(do_sample=False, pad_token_id=tok.pad_token_id, logits_processor=eos_disabled(model))

    def step(checked: bool) -> tuple[float, float]:
        """One decode step's milliseconds, whole and in the matmuls: (33 tokens less 1) / 32."""
        for cls, forward in originals.items():
            cls.forward = timed(checked_forward if checked and issubclass(cls, PackedLinear) else forward)  # type: ignore[method-assign]
        try:
            model.generate(**enc, max_new_tokens=3, **kwargs)
            totals = {}
            for n in (1, 33):
                spent[0] = 0.0
                start = time.perf_counter()
                model.generate(**enc, max_new_tokens=n, **kwargs)
                totals[n] = (time.perf_counter() - start, spent[0])
        finally:
            for cls, forward in originals.items():
                cls.forward = forward  # type: ignore[method-assign]
        return (totals[33][0] - totals[1][0]) / 32 * 1e3, (totals[33][1] - totals[1][1]) / 32 * 1e3

    if not args.against_unchecked:
        whole, matmul = step(False)
        print(f"{args.model} ({args.quantize}): a decode step {whole:.1f} ms, of which quantized matmuls {matmul:.1f} ms, "
              f"the rest {whole - matmul:.1f} ms")
        return 0
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for checked in (False, True):
            runs[checked].append(step(checked))
    med = {c: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r)) for c, r in runs.items()}
    print(f"{args.model} ({args.quantize}), median of {args.repeats} alternated passes:")
    for checked, label in ((False, "kernel calls bound once (shipped)"), (True, "every call checked (before 6f770d7)")):
        whole, matmul = med[checked]
        print(f"  {label}: a decode step {whole:.2f} ms, quantized matmuls {matmul:.2f} ms, the rest {whole - matmul:.2f} ms"
              f"  (steps: {', '.join(f'{w:.1f}' for w, _ in runs[checked])})")
    print(f"  checked / bound: step {med[True][0] / med[False][0]:.3f}x, matmuls {med[True][1] / med[False][1]:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
