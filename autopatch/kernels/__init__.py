"""Native kernels autopatch builds on first use: :func:`w8_matmul` (weight-only int8 matmul).

Example:
    >>> from autopatch.kernels import w8_matmul, kernel_error
    >>> kernel_error() is None          # a C compiler and AVX2+FMA (or AVX-512) are here
    True
    >>> y = w8_matmul(x, qweight, wscale, bias)   # x float32 [m, k], qweight int8 [n, k] -> float32 [m, n]

Why a C file: the int8 kernels torch and torchao offer on the CPU either dequantize the whole weight per call
(``aten._weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``: 4-12x slower than float32 here) or quantize
the activations too (``quantized::linear_dynamic``, ``torch._int_mm``: fast, but it costs accuracy), see
docs/quantization.md. ``w8.c`` is ~100 lines of AVX2/AVX-512 intrinsics, compiled once per machine with the
host's C compiler (``$CC``, else ``cc``/``gcc``) into :func:`autopatch.loading.cache_dir` ``/kernels/``, named by
the hash of its source, flags and CPU, and loaded with :mod:`ctypes` (which releases the GIL during a call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("w8.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{flags}"


@functools.lru_cache(maxsize=1)
def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)`` once built and loaded, else ``(None, why not)``."""
    from autopatch.loading import cache_dir

    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return None, f"the int8 kernel is written for x86-64 (AVX2 or AVX-512); this CPU is {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set $CC, or install gcc) to build the int8 kernel"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"w8-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".w8-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", staging], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                return None, f"{compiler} could not build {SOURCE.name}: {done.stderr.strip()[-400:]}"
            os.replace(staging, target)  # atomic: a concurrent build never leaves half a library
        finally:
            Path(staging).unlink(missing_ok=True)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        return None, f"could not load the built kernel {target}: {err}"
    lib.autopatch_w8_matmul.restype = None
    lib.autopatch_w8_matmul.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5
    lib.autopatch_set_threads.argtypes = [ctypes.c_int]
    return lib, None


def kernel_error() -> str | None:
    """``None`` when the int8 kernel is built and gives the right answer on a known product, else why not."""
    lib, why = _build()
    if lib is None:
        return why
    x = torch.tensor([[1.0, -2.0, 0.5] * 6], dtype=torch.float32)
    w = torch.arange(-45, 45, dtype=torch.int8).reshape(5, 18)
    scale = torch.full((5,), 0.5)
    want = (x @ w.float().t()) * scale
    got = w8_matmul(x, w, scale, None)
    if not torch.allclose(got, want, atol=1e-4):
        return f"the built int8 kernel gave {got.tolist()} instead of {want.tolist()} on a known product"
    return None


_THREADS = [0]


def w8_matmul(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (qweight * wscale[:, None]).T + bias``: float32 ``[m, k]`` by int8 ``[n, k]``, on the CPU."""
    lib, why = _build()
    if lib is None:
        raise RuntimeError(why)
    m, k = x.shape
    n = qweight.shape[0]
    if (x.dtype, qweight.dtype, wscale.dtype) != (torch.float32, torch.int8, torch.float32) or qweight.shape[1] != k \
            or wscale.shape != (n,) or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,))):
        raise ValueError(f"w8_matmul: expected float32 [m, k], int8 [n, k], float32 [n] (and bias [n]); got "
                         f"{x.dtype} {tuple(x.shape)}, {qweight.dtype} {tuple(qweight.shape)}, {tuple(wscale.shape)}")
    tensors = [t for t in (x, qweight, wscale, bias) if t is not None]
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError("w8_matmul needs contiguous CPU tensors")
    threads = torch.get_num_threads()
    if _THREADS[0] != threads:
        lib.autopatch_set_threads(threads)
        _THREADS[0] = threads
    y = torch.empty(m, n, dtype=torch.float32)
    lib.autopatch_w8_matmul(m, n, k, x.data_ptr(), qweight.data_ptr(), wscale.data_ptr(),
                            None if bias is None else bias.data_ptr(), y.data_ptr())
    return y
