"""The int8 and int4 kernels of two checkouts, built side by side and alternated in one process.

Example:
    $ git worktree add /tmp/before HEAD~1
    $ python bench/ab_kernels.py /tmp/before                    # against this checkout's sources
    $ python bench/ab_kernels.py /tmp/before . --rows 1,4,16
    $ python bench/ab_kernels.py /tmp/before --q8 --shapes 640x262144   # the int8-activation kernels; Gemma's head

Each checkout's ``autopatch/kernels/*.c`` are compiled with :data:`autopatch.kernels.FLAGS` into a library of
their own and loaded with :mod:`ctypes`; every call alternates the two builds (the order flipped each round), so a
machine whose speed drifts within minutes moves both alike, where two runs of ``bench_kernels.py`` do not. Each
row prints milliseconds a call (the median after the first 3 rounds), the ratio (above 1: the second checkout is
faster) and whether the two builds gave the same bits, on the embedded models' decoder shapes. The weights are
small enough to sit in cache, so this times arithmetic, not memory (``bench_kernels.py --copies`` does that),
unless ``--shapes`` names larger ones (``KxN``: the LM heads' 1536x151936 or 640x262144). ``--q8``: the
``-q8`` modes' kernels (``autopatch_w{8,4}_matmul_q8``) instead of the float32-activation ones.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from autopatch.kernels import FLAGS, SOURCES, pack, pack4, pack4_scales, pack_scales, quantize_affine4, quantize_groups  # noqa: E402
from bench.machine import cpu_name, cpu_summary  # noqa: E402

SHAPES = ((1536, 8960), (8960, 1536), (640, 2048), (896, 4864))  # the 1.5B's MLP up and down, Gemma's, the 0.5B's


def build(checkout: Path, into: Path, suffix: str = "") -> ctypes.CDLL:
    """``checkout``'s kernel sources compiled with today's flags and loaded."""
    target = into / f"{abs(hash(str(checkout.resolve())))}.so"
    sources = [str(checkout / "autopatch" / "kernels" / path.name) for path in SOURCES]
    subprocess.run(["gcc", *FLAGS, *sources, "-o", str(target)], check=True)
    lib = ctypes.CDLL(str(target))
    for bits in (8, 4):
        matmul = getattr(lib, f"autopatch_w{bits}_matmul{suffix}")
        matmul.restype = ctypes.c_int if suffix else None
        matmul.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("before", type=Path, help="a checkout (a git worktree of the older commit)")
    parser.add_argument("after", type=Path, nargs="?", default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--rows", default="1,2,3,4,5,8,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", help="KxN weights, comma-separated (default: the decoders' MLP shapes)")
    parser.add_argument("--q8", action="store_true", help="the int8-activation kernels")
    args = parser.parse_args(argv)
    suffix = "_q8" if args.q8 else ""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        libs = {"before": build(args.before, Path(scratch), suffix), "after": build(args.after, Path(scratch), suffix)}
        print(f"{args.before} against {args.after}{' (-q8 kernels)' if args.q8 else ''}; CPU: {cpu_name()} ({cpu_summary()}); {args.rounds} rounds\n")
        print("| weight | rows | int8 ms before → after | int4 ms before → after | same bits |")
        print("|---|---|---|---|---|")
        for k, n in shapes:
            weight = torch.randn(n, k) * 0.02
            q8, s8 = quantize_groups(weight)
            q4, a4, b4 = quantize_affine4(weight)
            layouts = {8: (pack(q8), pack_scales(s8)), 4: (pack4(q4), pack4_scales(a4, b4))}
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k)
                times: dict[tuple[str, int], list[float]] = {(tag, bits): [] for tag in libs for bits in layouts}
                outs: dict[tuple[str, int], torch.Tensor] = {}
                for turn in range(args.rounds):
                    for tag in (("before", "after") if turn % 2 else ("after", "before")):
                        for bits, (packed, scales) in layouts.items():
                            y = torch.empty(rows, n)
                            start = time.perf_counter()
                            getattr(libs[tag], f"autopatch_w{bits}_matmul{suffix}")(
                                rows, n, k, x.data_ptr(), packed.data_ptr(), scales.data_ptr(), None, y.data_ptr())
                            times[(tag, bits)].append(time.perf_counter() - start)
                            outs[(tag, bits)] = y
                ms = {key: statistics.median(v[3:]) * 1e3 for key, v in times.items()}
                cells = [f"{ms[('before', b)]:.2f} → {ms[('after', b)]:.2f} ({ms[('before', b)] / ms[('after', b)]:.2f}×)"
                         for b in layouts]
                same = all(torch.equal(outs[("before", b)], outs[("after", b)]) for b in layouts)
                print(f"| {k} → {n} | {rows} | {cells[0]} | {cells[1]} | {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
