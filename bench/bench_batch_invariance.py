"""Does a row's bfloat16 product depend on the rows beside it? torch's one call against fixed blocks of rows.

Example:
    $ python bench/bench_batch_invariance.py
    $ python bench/bench_batch_invariance.py --threads 1

For each weight shape of the embedded models' decoder Linears (``N x K``), multiplies 700 random bfloat16 rows in one
call, then each run of ``m`` of those rows (several offsets) in a call of its own, and counts the ``m`` whose rows come
out different: torch's (oneDNN's) bfloat16 GEMM picks its kernel by the row count. Then the same with
``autopatch.kernels.GEMM_BLOCK`` rows a call (the last block padded with zero rows), the bfloat16 prefill's layout:
every row must come out the same at every ``m`` and offset. Last, milliseconds of both layouts at several ``m``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from autopatch.kernels import GEMM_BLOCK, matmul_in_blocks, padded_to_blocks  # noqa: E402
from bench.bench_kernels import median_ms  # noqa: E402

SHAPES = ((8960, 1536), (1536, 8960), (1536, 1536), (256, 1536),  # Qwen2.5-1.5B: MLP up/gate, down, q/o, k/v
          (4864, 896), (896, 4864), (896, 896), (128, 896),  # Qwen2.5-0.5B
          (2048, 640), (640, 2048), (1024, 640), (256, 640))  # Gemma 3 270M
ROWS = (*range(1, 70), 100, 128, 200, 320, 511)


def blocked(x: torch.Tensor, wt: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ wt`` laid out as the bfloat16 prefill lays it out (autopatch.kernels' own helpers)."""
    rows = padded_to_blocks(x, block)
    out = torch.empty(rows.shape[0], wt.shape[1], dtype=x.dtype)
    matmul_in_blocks(rows, wt, block, out=out)
    return out[: x.shape[0]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, GEMM_BLOCK {GEMM_BLOCK}\n")
    print("| N x K | row counts m (of 1-69, 100, 128, 200, 320, 511) whose rows differ from one call over 700 | "
          f"the same in blocks of {GEMM_BLOCK} |\n|---|---|---|")
    varies = 0
    for n, k in SHAPES:
        wt = (torch.randn(n, k) * 0.02).bfloat16().t()
        x = torch.randn(700, k).bfloat16()
        whole, whole_blocked = x @ wt, blocked(x, wt, GEMM_BLOCK)
        differ = {"one call": [], "blocks": []}
        for m in ROWS:
            for off in (0, 37, 101):
                if not torch.equal(x[off : off + m] @ wt, whole[off : off + m]):
                    differ["one call"].append(m)
                    break
            for off in (0, 37, 101):
                if not torch.equal(blocked(x[off : off + m], wt, GEMM_BLOCK), whole_blocked[off : off + m]):
                    differ["blocks"].append(m)
                    break
        varies += len(differ["blocks"])
        show = lambda ms: f"{len(ms)}: {', '.join(map(str, ms[:6]))}{', …' if len(ms) > 6 else ''}" if ms else "none"  # noqa: E731
        print(f"| {n} x {k} | {show(differ['one call'])} | {show(differ['blocks'])} |", flush=True)
    print(f"\nms per product, one call against blocks of {GEMM_BLOCK} (median of 9)\n")
    print("| N x K | " + " | ".join(f"m={m}" for m in (16, 40, 100, 300, 512)) + " |\n|---|---|---|---|---|---|")
    for n, k in SHAPES[:4]:
        wt = (torch.randn(n, k) * 0.02).bfloat16().t()
        cells = []
        for m in (16, 40, 100, 300, 512):
            x = torch.randn(m, k).bfloat16()
            one = median_ms(lambda x=x, wt=wt: x @ wt, 9)
            blocks = median_ms(lambda x=x, wt=wt: blocked(x, wt, GEMM_BLOCK), 9)
            cells.append(f"{one:.2f} / {blocks:.2f} ({one / blocks:.2f}x)")
        print(f"| {n} x {k} | " + " | ".join(cells) + " |", flush=True)
    return 1 if varies else 0


if __name__ == "__main__":
    raise SystemExit(main())
