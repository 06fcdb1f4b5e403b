"""Experiment: Q4_K's own scales (a byte scale and min per 32 weights, a float32 ``d, dmin`` per 256) with int8
activations on AVX512-VNNI, against ``int4-q8``'s layout (float32 ``a, b`` per 32), out of cache.

Example:
    $ python bench/experiment_q4k_q8.py                        # the 1.5B's MLP up-projection, rows 1, 4, 8
    $ python bench/experiment_q4k_q8.py --k 1536 --n 151936 --copies 4 --rows 1

Why: a decode step of ``int4`` reads 6 bits a weight (4 for the level, 2 for the float32 scale and offset per 32),
where llama.cpp reads Q4_K's 4.5. At one row the quantized kernels read their bytes at the memory's speed here
(docs/bench_kernels_zen4.txt), so fewer bytes should mean less time. This layout keeps each weight exactly: for a
Q4_K block ``a = d * sc`` and ``b = -dmin * m`` are products of a float16 and a 6-bit integer, exact in float32, so
the kernel below forms them on the fly and gives the very bits of ``int4-q8``'s kernel (checked on every row).
Here ``sc`` and ``m`` take a byte each (4.75 bits a weight; Q4_K packs them in 6 bits, 4.5): one stream per panel of
4 rows, each 256 columns a 96-byte header (``d[4]``, ``dmin[4]``, ``sc[8][4]``, ``m[8][4]``) then 512 bytes of
levels in ``pack4``'s order. Not a shipped mode: the loader, the cache and the prefill path would come after a win
here. Each call reads a different copy of the weight, as a decode step does; the two layouts alternate, the median
of ``--repeats`` passes.
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
from autopatch import kernels  # noqa: E402
from autopatch.kernels import FLAGS, GROUP, Q8, pack4, pack4_scales, w4_matmul  # noqa: E402
from bench.machine import cpu_name, cpu_summary  # noqa: E402

SUPER = 256  # columns per (d, dmin), as in Q4_K
HEADER = 96  # bytes per panel and superblock before its levels

SOURCE = r"""
#include "%(q8)s" /* its quantizer, row blocks, w4_q8_group and finish */
#if !VNNI512
#error "the experiment is written for AVX512-VNNI"
#endif
/* panels of 4 rows; per 256 columns: float d[4], dmin[4]; uint8 sc[8][4], m[8][4]; 512 bytes of pack4 levels */
int experiment_q4k_q8(int M, int N, int K, const float *x, const uint8_t *packed, float *y) {
    const int G = K / GROUP, S = K / 256, panels = (N + 3) / 4;
    int8_t *xq; float *d, *s;
    if (quantized(M, K, x, &xq, &d, &s)) return -1;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const int n0 = p * 4, nb = N - n0 < 4 ? N - n0 : 4;
        for (int m0 = 0; m0 < M; m0 += W_ROWS) {
            const int mb = M - m0 < W_ROWS ? M - m0 : W_ROWS;
            __m512 acc[W_ROWS];
            __m256 acc01[W_ROWS], acc23[W_ROWS];
            __m128 accb[W_ROWS];
            for (int r = 0; r < mb; r++) { acc[r] = _mm512_setzero_ps(); accb[r] = _mm_setzero_ps(); }
            const uint8_t *block = packed + (size_t)p * S * (96 + 512);
            for (int sb = 0; sb < S; sb++, block += 96 + 512) {
                const __m512 dd = _mm512_permutexvar_ps(SPREAD4, _mm512_castps128_ps512(_mm_loadu_ps((const float *)block)));
                const __m128 dmin = _mm_loadu_ps((const float *)block + 4);
                const uint8_t *sc = block + 32, *mm = block + 64, *levels = block + 96;
                for (int j = 0; j < 8; j++) {
                    const int g = sb * 8 + j;
                    _mm_prefetch((const char *)levels + j * 64 + PREFETCH, _MM_HINT_T0);
                    const __m128 scf = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(*(const int *)(sc + 4 * j))));
                    const __m128 mf = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(*(const int *)(mm + 4 * j))));
                    const __m512 a = _mm512_mul_ps(dd, _mm512_permutexvar_ps(SPREAD4, _mm512_castps128_ps512(scf)));
                    const __m128 b = _mm_xor_ps(_mm_mul_ps(dmin, mf), _mm_set1_ps(-0.f)); /* -(dmin m), exact */
                    w4_q8_group(mb, G, K, g, levels + j * 64, a, b, xq, d, s, m0, acc, accb);
                }
            }
            halves(mb, acc, acc01, acc23);
            finish(mb, N, n0, nb, acc01, acc23, accb, NULL, y + (size_t)m0 * N);
        }
    }
    free(xq); free(d);
    return 0;
}
"""


def build(into: Path) -> ctypes.CDLL:
    """The experiment's kernel, compiled with q8.c (whose group step it shares) and the kernels' flags."""
    source = into / "experiment_q4k_q8.c"
    source.write_text(SOURCE % {"q8": Path(kernels.__file__).with_name("q8.c")})
    target = into / "experiment_q4k_q8.so"
    done = subprocess.run([kernels._compiler() or "gcc", *FLAGS, str(source), "-o", str(target)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the experiment's kernel did not build here (it needs AVX512-VNNI):\n{done.stderr[-1500:]}")
    lib = ctypes.CDLL(str(target))
    lib.experiment_q4k_q8.restype = ctypes.c_int
    lib.experiment_q4k_q8.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
    return lib


def q4k_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random Q4_K-shaped parts: levels ``q``, 6-bit ``sc, m`` per 32, float16-exact ``d, dmin`` per 256."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    sc, m = (torch.randint(0, 64, (n, k // GROUP), generator=g, dtype=torch.uint8) for _ in range(2))
    d, dmin = ((torch.rand(n, k // SUPER, generator=g) / 2000).half().float() for _ in range(2))
    return q, sc, m, d, dmin


def pack_q4k(q: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor) -> torch.Tensor:
    """The experiment's one stream per panel: per 256 columns the 96-byte header, then pack4's 512 bytes."""
    n, k = q.shape
    panels, supers = -(-n // 4), k // SUPER
    rows = panels * 4

    def padded(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(rows, t.shape[1], dtype=t.dtype)
        out[:n] = t
        return out

    floats = [padded(t).view(panels, 4, supers).permute(0, 2, 1).contiguous().view(torch.uint8) for t in (d, dmin)]
    small = [padded(t).view(panels, 4, supers, 8).permute(0, 2, 3, 1).reshape(panels, supers, 32) for t in (sc, m)]
    levels = pack4(q).view(panels, supers, 8 * 64)
    return torch.cat([*floats, *small, levels], dim=2).contiguous()


def timed(lib: ctypes.CDLL, rows: int, n: int, k: int, one: tuple, copies: tuple, repeats: int) -> tuple[bool, list[float]]:
    """Whether the two layouts' products are the same bits on ``one`` weight, and each layout's median ms a call
    over ``copies`` (the two alternated, ``repeats`` passes)."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    y = torch.empty(rows, n)

    def old(ops: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return w4_matmul(x, ops[0], ops[1], None, n=n, prefill=Q8)

    def new(packed: torch.Tensor) -> torch.Tensor:
        assert lib.experiment_q4k_q8(rows, n, k, x.data_ptr(), packed.data_ptr(), y.data_ptr()) == 0
        return y

    same = torch.equal(old(one[0]), new(one[1]).clone())
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, (fn, each) in enumerate(((old, copies[0]), (new, copies[1]))):
            start = time.perf_counter()
            for ops in each:
                fn(ops)
            times[i].append((time.perf_counter() - start) / len(each))
    return same, [statistics.median(t) * 1e3 for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1536)
    parser.add_argument("--n", type=int, default=8960)
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--copies", type=int, default=48, help="copies of the weight cycled through (out of cache)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.k % SUPER:
        raise SystemExit(f"--k must be a multiple of {SUPER} (Q4_K's superblock)")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        q, sc, m, d, dmin = q4k_weight(args.n, args.k, 0)
        a = d.repeat_interleave(SUPER // GROUP, dim=1) * sc.float()
        b = -(dmin.repeat_interleave(SUPER // GROUP, dim=1) * m.float())
        int4 = (pack4(q), pack4_scales(a, b))
        compact = pack_q4k(q, sc, m, d, dmin)
        sizes = {"int4-q8 (float32 a, b per 32)": int4[0].numel() + int4[1].numel() * 4,
                 "Q4_K scales (bytes per 32, d/dmin per 256)": compact.numel()}
        copies = ([tuple(t.clone() for t in int4) for _ in range(args.copies)],
                  [compact.clone() for _ in range(args.copies)])
        print(f"# python bench/experiment_q4k_q8.py --k {args.k} --n {args.n} --rows {args.rows} --copies "
              f"{args.copies} --repeats {args.repeats}\n# {cpu_name()}, {cpu_summary()}, threads "
              f"{torch.get_num_threads()}\n")
        print("| rows | layout | MB a copy | bits a weight | ms a call | GB/s | same bits as int4-q8 |")
        print("|---|---|---|---|---|---|---|")
        for rows in (int(r) for r in args.rows.split(",")):
            same, medians = timed(lib, rows, args.n, args.k, (int4, compact), copies, args.repeats)
            for (name, size), ms in zip(sizes.items(), medians):
                print(f"| {rows} | {name} | {size / 1e6:.2f} | {size * 8 / (args.n * args.k):.2f} | {ms:.3f} | "
                      f"{size / ms / 1e6:.1f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
