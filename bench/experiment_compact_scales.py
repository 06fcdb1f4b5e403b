"""Experiment: does the int4 kernel gain from its scales in fewer bytes (Q4_K's d/sc layout)?

Example:
    $ python bench/experiment_compact_scales.py

Builds ``bench/experiment_compact_scales.c`` (w4.c's kernel with a float32 ``d, dmin`` per 256 columns and a uint8
``sc, m`` per 32, 4.75 bits a weight) beside autopatch's ``int4`` layout (float32 ``a, b`` per 32, 6 bits a weight), on
the 1.5B's 1536 -> 8960 projection with random Q4_K-shaped data, checks both against float32, and times one call on
each of 48 copies in turn (out of cache, as a decode step reads its weights) at 1, 4 and 8 rows.
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from autopatch import kernels as K  # noqa: E402


def compact_pack(q, d, dmin, sc, m):
    panels, supers = q.shape[0] // 4, q.shape[1] // 256
    nibbles = K.pack4(q).view(panels, supers, 8 * 64)
    floats = torch.stack([d.view(panels, 4, supers), dmin.view(panels, 4, supers)], 1).permute(0, 3, 1, 2)
    floats = floats.contiguous().view(torch.uint8).view(panels, supers, 32)
    ints = [t.view(panels, 4, supers, 8).permute(0, 2, 3, 1).contiguous().view(panels, supers, 32) for t in (sc, m)]
    return torch.cat([floats, *ints, nibbles], 2).contiguous()


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    n, k, copies = 8960, 1536, 48
    build = Path(tempfile.mkdtemp()) / "w4k.so"
    subprocess.run(["cc", *K.FLAGS, str(Path(__file__).with_suffix(".c")), "-o", str(build)], check=True)
    lib = ctypes.CDLL(str(build))
    lib.w4k_matmul.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    d, dmin = torch.rand(n, k // 256) * 1e-3, torch.rand(n, k // 256) * 1e-3
    sc, m = (torch.randint(0, 64, (n, k // 32), dtype=torch.uint8) for _ in range(2))
    a, b = d.repeat_interleave(8, 1) * sc.float(), -(dmin.repeat_interleave(8, 1) * m.float())
    weight = K.dequantize_affine4(q, a, b)
    old = (K.pack4(q), K.pack4_scales(a, b))
    new = compact_pack(q, d, dmin, sc, m)

    def compact(x, packed):
        y = torch.empty(x.shape[0], n)
        lib.w4k_matmul(x.shape[0], n, k, x.data_ptr(), packed.data_ptr(), y.data_ptr())
        return y

    x = torch.randn(4, k)
    want = x @ weight.t()
    print(f"max |error| vs float32: int4 {(K.w4_matmul(x, *old, None) - want).abs().max():.2e}, "
          f"compact {(compact(x, new) - want).abs().max():.2e}")
    old_bytes, new_bytes = old[0].numel() + old[1].numel() * 4, new.numel()
    print(f"bytes per copy: int4 {old_bytes / 1e6:.2f} MB, compact {new_bytes / 1e6:.2f} MB\n")
    print("| rows | int4 ms (GB/s) | compact ms (GB/s) | compact speed-up |\n|---|---|---|---|")
    for rows in (1, 4, 8):
        x = torch.randn(rows, k)
        olds, news = [tuple(t.clone() for t in old) for _ in range(copies)], [new.clone() for _ in range(copies)]
        times: dict[str, list[float]] = {"int4": [], "compact": []}
        for _ in range(9):  # alternated, so drift hits both
            start = time.perf_counter()
            for p, s in olds:
                K.w4_matmul(x, p, s, None)
            times["int4"].append((time.perf_counter() - start) / copies * 1e3)
            start = time.perf_counter()
            for p in news:
                compact(x, p)
            times["compact"].append((time.perf_counter() - start) / copies * 1e3)
        o, c = statistics.median(times["int4"]), statistics.median(times["compact"])
        print(f"| {rows} | {o:.3f} ({old_bytes / o / 1e6:.1f}) | {c:.3f} ({new_bytes / c / 1e6:.1f}) | {o / c:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
