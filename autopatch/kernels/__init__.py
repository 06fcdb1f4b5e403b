"""Native kernels autopatch builds on first use: :func:`w8_matmul` and :func:`w4_matmul` (weight-only int8
and int4 matmuls), and :func:`gguf_dequant` (GGUF blocks to float32, for the embedded models' first load).

Example:
    >>> from autopatch.kernels import kernel_error, pack, unpack, w8_matmul
    >>> kernel_error() is None          # a C compiler and AVX2+FMA (or AVX-512) are here
    True
    >>> q, scales = quantize_groups(weight)      # int8 [n, k], one float32 scale per 32 weights of a row
    >>> packed, pscales = pack(q), pack_scales(scales)
    >>> y = w8_matmul(x, packed, pscales, bias)  # x float32 [m, k] -> float32 [m, n]
    >>> torch.equal(unpack(packed, n), q)
    True
    >>> q4, a, b = quantize_affine4(weight)      # uint8 0..15 [n, k] with W = a * q4 + b per 32 weights
    >>> y = w4_matmul(x, pack4(q4), pack4_scales(a, b), bias)

Why a C file: the int8 kernels torch and torchao offer on the CPU either dequantize the whole weight per call
(``aten._weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``: 4-10x slower than float32 here) or quantize
the activations too (``quantized::linear_dynamic``, ``torch._int_mm``: fast, but it costs accuracy), see
docs/quantization.md. ``w8.c`` and ``w4.c`` are about 120 lines each of AVX2/AVX-512 intrinsics, compiled once
per machine into one library with the host's C compiler (``$CC``, else ``cc``/``gcc``) into
:func:`autopatch.cache.cache_dir` ``/kernels/``, named by the hash of the sources, flags and CPU, and loaded
with :mod:`ctypes` (which releases the GIL during a call). The layouts they read (groups, panels, packing) are
:mod:`autopatch.kernels.layout`, re-exported here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from autopatch.cache import cache_dir
from autopatch.kernels.layout import (
    CHUNK,
    GROUP,
    PANEL,
    dequantize_affine4,
    dequantize_groups,
    pack,
    pack4,
    pack4_scales,
    pack_scales,
    packable,
    panels,
    unpack,
    unpack4,
    unpack4_scales,
    unpack_scales,
)

__all__ = ["CHUNK", "GEMM_BLOCK", "GEMM_ROWS", "GGUF_BLOCKS", "GROUP", "PANEL", "Q8", "Bound", "avx512", "bind",
           "dequantize_affine4", "dequantize_groups", "fast_bfloat16", "gguf_dequant", "kernel_error",
           "matmul_in_blocks", "pack", "pack4", "pack4_scales", "pack_scales", "packable", "padded_to_blocks",
           "panels", "q8_quantize", "quantize_affine4", "quantize_groups", "release_openmp_pool", "unpack", "unpack4",
           "unpack4_scales", "unpack_scales", "w4_matmul", "w8_matmul"]

SOURCES = tuple(Path(__file__).with_name(name) for name in ("w8.c", "w4.c", "gguf.c", "q8.c"))
HEADERS = (Path(__file__).with_name("store.h"),)  # included by the sources: part of the build's key, not compiled
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
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return None, f"the int8 kernel is written for x86-64 (AVX2 or AVX-512); this CPU is {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set $CC, or install gcc) to build the int8 kernel"
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"w8-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".w8-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", staging], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode != 0:
                names = " and ".join(path.name for path in SOURCES)
                return None, f"{compiler} could not build {names}: {done.stderr.strip()[-400:]}"
            os.replace(staging, target)  # atomic: a concurrent build never leaves half a library
        finally:
            Path(staging).unlink(missing_ok=True)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        return None, f"could not load the built kernel {target}: {err}"
    for bits in (8, 4):
        matmul = getattr(lib, f"autopatch_w{bits}_matmul")
        matmul.restype = None
        matmul.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5
        for suffix in DEQUANT_SUFFIX.values():
            dequant = getattr(lib, f"autopatch_w{bits}_dequant{suffix}")
            dequant.restype = None
            dequant.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
        q8 = getattr(lib, f"autopatch_w{bits}_matmul_q8")
        q8.restype = ctypes.c_int
        q8.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5
    lib.autopatch_q8_quantize.restype = None
    lib.autopatch_q8_quantize.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 4
    lib.autopatch_set_threads.argtypes = [ctypes.c_int]
    lib.autopatch_groups8.restype = None
    lib.autopatch_groups8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.autopatch_affine4.restype = None
    lib.autopatch_affine4.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.autopatch_gguf_dequant.restype = ctypes.c_int
    lib.autopatch_gguf_dequant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return lib, None


DEQUANT_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}  # a prefill's GEMM dtype -> its dequant function
# ``prefill=Q8``: every product, at any row count, rounds x to int8 per 32 inputs and sums in int32 (q8.c)
Q8 = torch.int8


def quantize_groups(weight: torch.Tensor, *, native: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [n, k], float32 [n, k/32])``: symmetric, one scale (absmax / 127) per 32 weights of a row.
    Computed by ``gguf.c`` where the kernels are built (unless ``native=False``), else by the torch operations
    below, bit for bit the same."""
    n, k = weight.shape
    if not packable(k):
        raise ValueError(f"quantize_groups: {k} columns is not a multiple of {GROUP}")
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // GROUP, dtype=torch.float32)
    lib = _native() if native else None
    if lib is not None:
        x = weight.detach().float().contiguous()
        lib.autopatch_groups8(x.data_ptr(), n * k // GROUP, q.data_ptr(), scales.data_ptr())
        return q, scales
    for start in range(0, n, 4096):  # in slices, so a large LM head needs no float32 temporaries of its size
        groups = weight[start : start + 4096].detach().float().reshape(-1, k // GROUP, GROUP)
        part = groups.abs().amax(dim=2).clamp_(min=1e-12).div_(127.0)
        scales[start : start + 4096] = part
        q[start : start + 4096] = torch.round(groups / part[:, :, None]).clamp_(-127, 127).to(torch.int8).reshape(-1, k)
    return q, scales


def quantize_affine4(weight: torch.Tensor, *, native: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q uint8 [n, k] in 0..15, a float32 [n, k/32], b float32 [n, k/32])`` with ``weight ≈ a * q + b``
    per 32 weights of a row.

    A group already on a 4-bit grid (a weight dequantized from a GGUF Q4_K block: ``d*sc*q - dmin*m``) is
    recovered exactly: the finest step ``(max - min) / s``, s = 15..1, on which every weight lies gives
    ``a``, and ``b`` is the group's minimum. Any other group gets ``a = (max - min) / 15`` and rounding.
    Computed by ``gguf.c`` where the kernels are built (unless ``native=False``), else by the torch operations
    below, bit for bit the same.
    """
    n, k = weight.shape
    if not packable(k):
        raise ValueError(f"quantize_affine4: {k} columns is not a multiple of {GROUP}")
    q = torch.empty(n, k, dtype=torch.uint8)
    a = torch.empty(n, k // GROUP, dtype=torch.float32)
    b = torch.empty(n, k // GROUP, dtype=torch.float32)
    lib = _native() if native else None
    if lib is not None:  # gguf.c's autopatch_affine4: the same operations, one pass per group
        x = weight.detach().float().contiguous()
        lib.autopatch_affine4(x.data_ptr(), n * k // GROUP, q.data_ptr(), a.data_ptr(), b.data_ptr())
        return q, a, b
    for start in range(0, n, 4096):
        groups = weight[start : start + 4096].detach().float().reshape(-1, GROUP)
        low = groups.amin(dim=1)
        span = (groups.amax(dim=1) - low).clamp_(min=1e-30)
        offset = groups - low[:, None]
        levels = torch.full_like(low, 15.0)
        open_ = torch.arange(len(low))  # groups whose grid is not found yet; most Q4_K groups span all 16 levels
        for steps in range(15, 0, -1):
            pos = offset[open_] * (steps / span[open_])[:, None]
            fits = (pos - pos.round()).abs_().amax(dim=1) < 1e-3
            levels[open_[fits]] = steps
            open_ = open_[~fits]
            if not len(open_):
                break
        levels[open_] = 15.0  # on no 4-bit grid: round
        step = span / levels
        rows = min(4096, n - start)
        a[start : start + rows] = step.view(rows, -1)
        b[start : start + rows] = low.view(rows, -1)
        q[start : start + rows] = (offset / step[:, None]).round_().clamp_(0, 15).to(torch.uint8).view(rows, k)
    return q, a, b


def kernel_error() -> str | None:
    """``None`` when the kernels are built and give the right answer on known products, else why not."""
    lib, why = _build()
    if lib is None:
        return why
    x = torch.tensor([[1.0, -2.0, 0.5, 0.25] * 16] * 5, dtype=torch.float32)
    w = (torch.arange(5 * 64) % 255 - 127).to(torch.int8).reshape(5, 64)
    scales = torch.tensor([[0.5, 0.25]] * 5)
    want = x @ dequantize_groups(w, scales).t()
    got = w8_matmul(x, pack(w), pack_scales(scales), None, n=5)
    if not torch.allclose(got, want, atol=1e-4):
        return f"the built int8 kernel gave {got.tolist()} instead of {want.tolist()} on a known product"
    xq, d, _ = q8_quantize(x)  # the int8-activation kernels multiply the weight by x as rounded here
    rounded = xq.float() * d.repeat_interleave(GROUP, dim=1)
    want = rounded @ dequantize_groups(w, scales).t()
    got = w8_matmul(x, pack(w), pack_scales(scales), None, n=5, prefill=Q8)
    if not torch.allclose(got, want, atol=1e-3):
        return f"the built int8-activation kernel gave {got.tolist()} instead of {want.tolist()} on a known product"
    q4 = (torch.arange(5 * 64) % 16).to(torch.uint8).reshape(5, 64)
    a, b = torch.tensor([[0.5, 0.25]] * 5), torch.tensor([[-1.0, 2.0]] * 5)
    for prefill, inputs, what in ((torch.float32, x, "int4"), (Q8, rounded, "int4 int8-activation")):
        want = inputs @ dequantize_affine4(q4, a, b).t()
        got = w4_matmul(x, pack4(q4), pack4_scales(a, b), None, n=5, prefill=prefill)
        if not torch.allclose(got, want, atol=1e-3 if prefill == Q8 else 1e-4):
            return f"the built {what} kernel gave {got.tolist()} instead of {want.tolist()} on a known product"
    return None


def q8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How the ``Q8`` kernels round float32 ``x [m, k]``: ``(xq int8 [m, k], d float32 [m, k/32], s float32
    [m, k/32])``, ``xq`` the round-to-even of ``x * (127 / max|x|)`` per group of 32 inputs, ``d = max|x| / 127``
    and ``s = d * xq.sum()`` per group, the rounded group's sum (``q8.c``'s ``autopatch_q8_quantize``;
    ``RuntimeError`` where it is not built)."""
    lib, why = _build()
    if lib is None:
        raise RuntimeError(why)
    m, k = x.shape
    if not packable(k):
        raise ValueError(f"q8_quantize: {k} columns is not a multiple of {GROUP}")
    x = x.detach().float().contiguous()
    xq = torch.empty(m, k, dtype=torch.int8)
    d, s = torch.empty(m, k // GROUP), torch.empty(m, k // GROUP)
    lib.autopatch_q8_quantize(m, k, x.data_ptr(), xq.data_ptr(), d.data_ptr(), s.data_ptr())
    return xq, d, s


_THREADS = [0]


def _use_threads(lib: ctypes.CDLL) -> None:
    """The kernels' OpenMP threads follow ``torch.get_num_threads()``."""
    threads = torch.get_num_threads()
    if _THREADS[0] != threads:
        lib.autopatch_set_threads(threads)
        _THREADS[0] = threads


def _native() -> ctypes.CDLL | None:
    """The built library, its threads set for a call now; ``None`` where it is not built here."""
    lib, _ = _build()
    if lib is not None:
        _use_threads(lib)
    return lib


def _layout(bits: int, n: int, k: int) -> tuple[torch.dtype, tuple[int, ...], torch.dtype, tuple[int, ...]]:
    """The packed weight's and the scales' dtype and shape for ``n`` rows of ``k`` inputs in the ``bits`` kernel."""
    if bits == 8:
        return torch.int8, (panels(n), k // CHUNK, PANEL, CHUNK), torch.float32, (panels(n), k // GROUP, PANEL)
    return torch.uint8, (panels(n), k // GROUP, PANEL, GROUP // 2), torch.float32, (panels(n), k // GROUP, 2, PANEL)


def _check(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
           n: int, prefill: torch.dtype = torch.float32) -> ctypes.CDLL:
    """The built library, once the operands match the kernel's layout (else ``ValueError``; no kernel here:
    ``RuntimeError``)."""
    lib, why = _build()
    if lib is None:
        raise RuntimeError(why)
    m, k = x.shape
    packed_dtype, packed_shape, scales_dtype, scales_shape = _layout(bits, n, k)
    if (x.dtype, packed.dtype, scales.dtype) != (torch.float32, packed_dtype, scales_dtype) or not packable(k) \
            or tuple(packed.shape) != packed_shape or tuple(scales.shape) != scales_shape \
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,))):
        raise ValueError(f"w{bits}_matmul: expected float32 [m, k] with k a multiple of {GROUP}, {packed_dtype} "
                         f"{packed_shape} and {scales_dtype} {scales_shape} for {n} rows (and bias [n]); got "
                         f"{x.dtype} {tuple(x.shape)}, {packed.dtype} {tuple(packed.shape)}, {scales.dtype} "
                         f"{tuple(scales.shape)}")
    tensors = [t for t in (x, packed, scales, bias) if t is not None]
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError(f"w{bits}_matmul needs contiguous CPU tensors")
    if prefill not in DEQUANT_SUFFIX and prefill != Q8:
        raise ValueError(f"w{bits}_matmul: prefill must be one of {[*DEQUANT_SUFFIX, Q8]}, got {prefill}")
    return lib


def _call(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
          n: int, prefill: torch.dtype, gemm: bool | None, blocks: bool = False) -> torch.Tensor:
    """Check the operands against the kernel's layout, then multiply."""
    lib = _check(bits, x, packed, scales, bias, n, prefill)
    _use_threads(lib)
    if prefill == Q8:
        return _bound(lib, bits, packed, scales, bias, n, x.shape[1], q8=True)(x)
    if (x.shape[0] > GEMM_ROWS) if gemm is None else gemm:
        dequant = getattr(lib, f"autopatch_w{bits}_dequant{DEQUANT_SUFFIX[prefill]}")
        return _dequantized_gemm(dequant, x, packed, scales, bias, n, prefill, blocks)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    getattr(lib, f"autopatch_w{bits}_matmul")(x.shape[0], n, x.shape[1], x.data_ptr(), packed.data_ptr(),
                                              scales.data_ptr(), None if bias is None else bias.data_ptr(),
                                              y.data_ptr())
    return y


def w8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
              n: int | None = None, prefill: torch.dtype = torch.float32, gemm: bool | None = None,
              blocks: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` for float32 ``x [m, k]``, ``packed = pack(q)``, ``scales = pack_scales(s)`` and
    ``W = q * s`` per group of 32; ``n`` (default: all panel rows) is W's true row count. On the CPU.
    ``gemm``: multiply in torch's GEMM, from the weight dequantized in slices (``True``), or in autopatch's kernel
    (``False``); by default the GEMM above :data:`GEMM_ROWS` rows. ``prefill``: the dtype that GEMM multiplies in
    (see :func:`_dequantized_gemm`); ``blocks``: a bfloat16 GEMM in fixed blocks of :data:`GEMM_BLOCK` rows.
    ``prefill=Q8``: at every row count, ``x`` rounded to int8 per 32 inputs (a float32 scale each) and the products
    summed in int32 (``q8.c``); ``gemm`` and ``blocks`` are ignored."""
    return _call(8, x, packed, scales, bias, packed.shape[0] * PANEL if n is None else n, prefill, gemm, blocks)


def w4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
              n: int | None = None, prefill: torch.dtype = torch.float32, gemm: bool | None = None,
              blocks: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` for float32 ``x [m, k]``, ``packed = pack4(q4)``, ``scales = pack4_scales(a, b)`` and
    ``W = a * q + b`` per group of 32; ``n`` (default: all panel rows) is W's true row count. On the CPU.
    ``gemm``, ``prefill`` and ``blocks``: as in :func:`w8_matmul`."""
    return _call(4, x, packed, scales, bias, packed.shape[0] * PANEL if n is None else n, prefill, gemm, blocks)


@dataclasses.dataclass(frozen=True, eq=False)
class Bound:
    """One packed weight's product with at most :data:`GEMM_ROWS` rows, its operands checked once, by
    :func:`bind`: a decode step multiplies each of a model's weights once, and on a small weight checking every
    operand on every call cost as much as the product. The same kernel call as :func:`w8_matmul` /
    :func:`w4_matmul` below :data:`GEMM_ROWS` rows, so the same bits.

    Example:
        >>> bound = bind(8, packed, scales, None, n=32, k=64)
        >>> torch.equal(bound(x), w8_matmul(x, packed, scales, None, n=32))  # x: contiguous float32 CPU [m, 64]
        True
    """

    lib: ctypes.CDLL
    matmul: Callable[..., int | None]  # the q8 kernels return 0, or -1 when out of memory
    n: int
    k: int
    operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # held, so their memory stays theirs
    pointers: tuple[int, int, int | None]
    q8: bool = False  # the int8-activation kernel (prefill=Q8), at any row count

    def binds(self, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, q8: bool = False) -> bool:
        """Whether these are still the operands bound, in the same memory (a moved or replaced buffer is not), for
        the same kernel."""
        return self.pointers == _pointers(packed, scales, bias) and self.q8 == q8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` for a contiguous float32 CPU ``x [m, k]`` with ``m <= GEMM_ROWS`` unless ``q8`` (the
        caller's promise: only the weight was checked)."""
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        _use_threads(self.lib)
        if self.matmul(x.shape[0], self.n, self.k, x.data_ptr(), *self.pointers, y.data_ptr()) and self.q8:
            raise MemoryError(f"the int8-activation kernel could not allocate {x.shape[0]} rows of {self.k} inputs")
        return y


def bind(bits: int, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *, n: int,
         k: int, q8: bool = False) -> Bound:
    """The ``bits`` kernel's product with this weight (``n`` rows of ``k`` inputs), checked now as
    :func:`w8_matmul` / :func:`w4_matmul` check it on every call (``ValueError``, or ``RuntimeError`` where no
    kernel is built); ``q8``: the int8-activation kernel (``prefill=Q8``)."""
    return _bound(_check(bits, torch.empty(0, k), packed, scales, bias, n), bits, packed, scales, bias, n, k, q8)


def _bound(lib: ctypes.CDLL, bits: int, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
           n: int, k: int, q8: bool) -> Bound:
    """The :class:`Bound` call of operands already checked by :func:`_check`."""
    name = f"autopatch_w{bits}_matmul{'_q8' if q8 else ''}"
    return Bound(lib, getattr(lib, name), n, k, (packed, scales, bias), _pointers(packed, scales, bias), q8)


def _pointers(packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int | None]:
    """The kernel's weight operands as it takes them: their data pointers (``None`` for no bias)."""
    return packed.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr()


GEMM_ROWS = 48  # above this many rows (a prefill), dequantize the weight in slices and let torch's GEMM multiply
GEMM_SLICE = 1024  # weight rows dequantized at a time: a bounded float32 buffer (4 KiB per input column)
GEMM_SLICE_BYTES = 8 << 20  # the bfloat16 prefill's buffer: 2730 rows of 1536 columns
# A batch-invariant bfloat16 GEMM (blocks=True) multiplies exactly this many rows a call, the last block padded
# with zero rows. oneDNN picks its kernel, and so each sum's order, by the row count; at a fixed count a row's result
# depends on that row alone, not on its position or its neighbours (bench/bench_batch_invariance.py), so a prompt
# gets the same arithmetic alone or in any batch, at a measured cost (docs/quantization.md).
GEMM_BLOCK = 128


def padded_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [m, k]`` with zero rows appended up to a multiple of ``block`` rows (``x`` itself when it is one)."""
    extra = -x.shape[0] % block
    return x if extra == 0 else torch.cat((x, x.new_zeros(extra, x.shape[1])))


def matmul_in_blocks(x: torch.Tensor, wt: torch.Tensor, block: int, *, out: torch.Tensor) -> None:
    """``out = x @ wt``, one GEMM call per ``block`` rows of ``x`` (its height a multiple of ``block``): the layout
    whose rows come out the same whatever the other rows are (:data:`GEMM_BLOCK`)."""
    for r0 in range(0, x.shape[0], block):
        torch.matmul(x[r0 : r0 + block], wt, out=out[r0 : r0 + block])


def _dequantized_gemm(dequant: Callable[..., None], x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None, n: int, dtype: torch.dtype = torch.float32,
                      blocks: bool = False) -> torch.Tensor:
    """``x @ W.T`` for many rows: the matmul is compute-bound there, so the float GEMM's blocking wins, and
    reading the quantized weight once per slice costs little beside it.

    In ``torch.bfloat16`` both operands are rounded to bfloat16 (``dequant`` writes the weight's slices in it)
    and each product comes back rounded to bfloat16 (torch's CPU GEMM has no float32 output for bfloat16
    operands), then widened into the float32 result: on a CPU with bfloat16 matrix units (AMX, AVX512-BF16)
    several times faster than float32 (:func:`fast_bfloat16`). ``blocks``: in blocks of exactly :data:`GEMM_BLOCK`
    rows, so that a row's result does not depend on the other rows (:mod:`autopatch.invariance`)."""
    m, k = x.shape
    padded = panels(n) * PANEL
    # float32: slices of GEMM_SLICE rows; bfloat16: larger ones in a buffer of GEMM_SLICE_BYTES, since its GEMM is
    # fast enough that small slices cost
    step = GEMM_SLICE if dtype == torch.float32 else max(PANEL, GEMM_SLICE_BYTES // (k * dtype.itemsize) // PANEL * PANEL)
    block = GEMM_BLOCK if blocks and dtype != torch.float32 else max(m, 1)
    rows_in = padded_to_blocks(x.to(dtype), block)
    product = torch.empty(rows_in.shape[0], n, dtype=dtype)
    buffer = torch.empty(min(padded, step), k, dtype=dtype)
    for n0 in range(0, n, step):
        rows = min(step, padded - n0)
        dequant(k, packed.data_ptr(), scales.data_ptr(), n0, rows, buffer.data_ptr())
        width = min(rows, n - n0)
        matmul_in_blocks(rows_in, buffer[:width].t(), block, out=product[:, n0 : n0 + width])
    y = product[:m].float()  # the float32 product itself (no copy) when dtype is float32
    if bias is not None:
        y.add_(bias)
    return y


def avx512() -> bool:
    """Whether this CPU has AVX-512, whose table lookups the float32-activation kernels use to widen 4-bit
    weights (without it they are compute-bound even at one row, docs/quantization.md)."""
    return bool(getattr(torch.cpu, "_is_avx512_supported", lambda: False)())


def fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16), where torch's
    bfloat16 GEMM runs several times faster than float32; elsewhere it is emulated and slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's capability checks (private)
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


GGUF_BLOCKS = {"Q4_K": (0, 144, 256), "Q5_K": (1, 176, 256), "Q6_K": (2, 210, 256), "Q4_0": (3, 18, 32),
               "Q5_0": (4, 22, 32), "Q8_0": (5, 34, 32)}  # name -> (kind in gguf.c, bytes, values) per block


def gguf_dequant(qtype: str, blocks, out) -> bool:
    """Dequantize the GGUF ``qtype`` blocks (a contiguous uint8 NumPy array) into ``out`` (contiguous float32
    NumPy, ``values`` per block) with ``gguf.c``, bit-identical to the ``gguf`` package; ``False`` (``out``
    untouched) when the type is not one it knows or the kernels are not built here."""
    lib = _native()
    if lib is None or qtype not in GGUF_BLOCKS:
        return False
    kind, size, values = GGUF_BLOCKS[qtype]
    n_blocks = blocks.size // size
    if not (blocks.flags.c_contiguous and out.flags.c_contiguous and blocks.size == n_blocks * size
            and out.size == n_blocks * values and str(out.dtype) == "float32" and str(blocks.dtype) == "uint8"):
        raise ValueError(f"gguf_dequant: {blocks.size} bytes of {qtype} blocks into {out.size} {out.dtype} values")
    return lib.autopatch_gguf_dequant(kind, blocks.ctypes.data, n_blocks, out.ctypes.data) == 0


def release_openmp_pool() -> bool:
    """Free the calling thread's idle OpenMP thread pool (``omp_pause_resource_all``); ``True`` when it was freed.

    Call it on a thread that is done with torch (the one that loaded a model for a server, say) before another
    thread takes over the model's work. libgomp keeps one pool per thread that ever ran a parallel region, and once
    the pools together hold more threads than there are cores it stops spinning between regions; on 2 cores a
    second pool made every generation on the server's worker thread about 1.5x slower (bench/bench_threads.py). The
    pool comes back by itself if this thread runs a parallel region again.
    """
    try:
        runtime = ctypes.CDLL("libgomp.so.1")  # the one torch loaded (and the kernels link), found by its soname
        return int(runtime.omp_pause_resource_all(2)) == 0  # 2: omp_pause_hard
    except (OSError, AttributeError):
        return False
