"""The int8 and int4 matmul kernels this machine offers, against float32, on one decoder Linear's shape, in one run.

Example:
    $ python bench/bench_kernels.py                         # Qwen2.5-1.5B's MLP up-projection, 1536 -> 8960
    $ python bench/bench_kernels.py --k 896 --n 4864 --threads 1
    $ python bench/bench_kernels.py --copies 0                # without the out-of-cache table

Milliseconds per call (median of ``--repeats``) at several row counts ``m`` (1 = one decode step at batch 1,
8 = batch 8, 64 and 512 = prefills), and each kernel's speed as a ratio to ``F.linear`` in float32 (above 1 is
faster). This is why autopatch ships its own weight-only kernel (docs/quantization.md): torch's weight-only
int8 and int4 kernels on the CPU are slower than float32, and the fast ones quantize the activations. The ``-q8``
modes' kernels (int8 activations per 32 inputs, integer dot products) are in both tables too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from autopatch.kernels import (  # noqa: E402
    Q8,
    fast_bfloat16,
    pack,
    pack4,
    pack4_scales,
    pack_scales,
    quantize_affine4,
    quantize_groups,
    w4_matmul,
    w8_matmul,
)
from bench.machine import cpu_name  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    """Milliseconds of ``fn()``, the median of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def packed_operands(weight: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``weight`` packed for the int8 kernels and for the int4 ones: ``((packed, scales), (packed, scales))``."""
    q8, s8 = quantize_groups(weight)
    q4, a4, b4 = quantize_affine4(weight)
    return (pack(q8), pack_scales(s8)), (pack4(q4), pack4_scales(a4, b4))


def kernels(weight: torch.Tensor) -> dict:
    """name -> fn(x) for each kernel that runs here."""
    from autopatch.quantize import quantize_per_channel, quantize_per_token

    n, k = weight.shape
    q, scale = quantize_per_channel(weight)
    packed = q.t()
    (packed8, scales8), (packed4, scales4) = packed_operands(weight)
    out = {"float32 F.linear": lambda x: F.linear(x, weight),
           "autopatch int8 (weight-only, a scale per 32)": lambda x: w8_matmul(x, packed8, scales8, None),
           "autopatch int4 (weight-only, a scale and offset per 32)": lambda x: w4_matmul(x, packed4, scales4, None),
           # the -q8 modes: x rounded to int8 per 32 inputs, integer dot products (AVX2, or AVX512-VNNI)
           "autopatch int8, int8 activations (int8-q8)": lambda x: w8_matmul(x, packed8, scales8, None, prefill=Q8),
           "autopatch int4, int8 activations (int4-q8)": lambda x: w4_matmul(x, packed4, scales4, None, prefill=Q8)}
    if fast_bfloat16():  # the int4-bf16 mode: above GEMM_ROWS rows, a bfloat16 GEMM
        out["autopatch int4, bfloat16 prefill (int4-bf16; float32 up to 48 rows)"] = (
            lambda x: w4_matmul(x, packed4, scales4, None, prefill=torch.bfloat16))
        out["torch bfloat16 F.linear (weight already bfloat16)"] = (
            lambda w: lambda x: F.linear(x.bfloat16(), w))(weight.bfloat16())

    def dynamic(x):
        xq, xs = quantize_per_token(x)
        return torch._int_mm(xq, packed).float() * xs * scale

    out["torch._int_mm, per-token int8 activations"] = dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            linear = torch.nn.Linear(k, n, bias=False)
            linear.weight.data = weight
            fbgemm = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                      dtype=torch.qint8)
            out["torch quantize_dynamic (fbgemm, per-tensor activations)"] = fbgemm
        except (ImportError, RuntimeError):
            pass
    try:
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, k), q, scale)
        out["aten._weight_int8pack_mm (weight-only)"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale)
    except RuntimeError:
        pass
    try:
        group = 32
        grouped = weight.view(n, k // group, group)
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
        step = ((high - low) / 15).clamp(min=1e-8)
        q4 = ((grouped - low) / step).round().clamp(0, 15).to(torch.int32).view(n, k)
        zeros = (low + 8 * step).view(n, k // group)
        scales_zeros = torch.stack([step.view(n, k // group), zeros], -1).transpose(0, 1).contiguous()
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 8)
        out["aten._weight_int4pack_mm_for_cpu (weight-only, group 32)"] = (
            lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, group, scales_zeros))
    except (RuntimeError, AttributeError):
        pass
    return out


def out_of_cache(weight: torch.Tensor, copies: int, repeats: int, m: int = 1) -> None:
    """ms per call and the bytes read per second when every call reads a different copy of the weight, as a decode
    step does (the tables above reuse one weight, which the last-level cache may hold). The first row reads the
    float32 copies without multiplying: the rate this machine's memory gives, against which each kernel's is read."""
    int8, int4 = packed_operands(weight)
    layouts = {
        # What the memory delivers: one pass summing each copy, no multiplying (the ceiling for the rows below).
        "memory read (torch.sum of each float32 copy)": ((weight,), lambda x, w: w.sum()),
        "float32 F.linear": ((weight,), lambda x, w: F.linear(x, w)),
        "autopatch int8": (int8, lambda x, p, s: w8_matmul(x, p, s, None)),
        "autopatch int4": (int4, lambda x, p, s: w4_matmul(x, p, s, None)),
        "autopatch int8, int8 activations": (int8, lambda x, p, s: w8_matmul(x, p, s, None, prefill=Q8)),
        "autopatch int4, int8 activations": (int4, lambda x, p, s: w4_matmul(x, p, s, None, prefill=Q8)),
    }
    x = torch.randn(m, weight.shape[1])
    print(f"\nOut of cache: {copies} copies of the weight, one call on each in turn, m={m}\n")
    print("| kernel | MB per copy | ms per call | GB/s read |")
    print("|---|---|---|---|")
    for name, (tensors, fn) in layouts.items():
        sets = [tuple(t.clone() for t in tensors) for _ in range(copies)]
        size = sum(t.numel() * t.element_size() for t in tensors)
        per_call = []
        for _ in range(repeats):
            start = time.perf_counter()
            for operands in sets:
                fn(x, *operands)
            per_call.append((time.perf_counter() - start) / copies)
        best = min(per_call)
        print(f"| {name} | {size / 1e6:.1f} | {best * 1e3:.3f} | {size / best / 1e9:.1f} |")
        del sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--k", type=int, default=1536, help="input features")
    parser.add_argument("--n", type=int, default=8960, help="output features")
    parser.add_argument("--rows", default="1,8,64,512")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--copies", type=int, default=48,
                        help="copies of the weight cycled through for the out-of-cache table (0: skip it)")
    parser.add_argument("--copies-rows", default="1", help="rows of x in the out-of-cache tables, comma-separated")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    weight = torch.randn(args.n, args.k, generator=torch.Generator().manual_seed(0)) * 0.02
    rows = [int(r) for r in args.rows.split(",")]
    table = kernels(weight)
    inputs = {m: torch.randn(m, args.k) for m in rows}
    timings = {name: {m: median_ms(lambda fn=fn, m=m: fn(inputs[m]), args.repeats) for m in rows} for name, fn in table.items()}
    base = timings["float32 F.linear"]
    print(f"Linear {args.k} -> {args.n}, threads: {torch.get_num_threads()}, torch {torch.__version__}, CPU: {cpu_name()} "
          f"(AMX: {torch.cpu._is_amx_tile_supported()}, AVX512-BF16: {torch.cpu._is_avx512_bf16_supported()})\n")
    print("| kernel | " + " | ".join(f"m={m} ms (vs float32)" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name, by_rows in timings.items():
        cells = " | ".join(f"{by_rows[m]:.2f} ({base[m] / by_rows[m]:.2f}x)" for m in rows)
        print(f"| {name} | {cells} |")
    if args.copies:
        for m in (int(r) for r in args.copies_rows.split(",")):
            out_of_cache(weight, args.copies, max(3, args.repeats // 3), m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
