"""Read a GGUF file once and dequantize it in large chunks on every core: the embedded models' first load.

Example:
    >>> from autopatch.gguf_read import one_pass
    >>> with one_pass():   # transformers' GGUF loaders, as they are, but sharing one reader and a faster dequantize
    ...     tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ...     model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

Why: transformers parses the whole GGUF file once for the tokenizer, once for the config and once for the
weights (about 5 s each for the 1.5B's 151,936-token vocabulary on these cores; :func:`one_pass` shares the
reader and the metadata), and the ``gguf`` package
dequantizes 16 rows at a time from the memory map, so per-call overhead dominates. :func:`dequantize` runs
``gguf``'s block formulas in one C pass over the blocks on every core (``autopatch/kernels/gguf.c``), or, where
that is not built, ``gguf``'s own NumPy formulas on chunks of about four million values from an in-memory copy,
on several threads (NumPy releases the GIL); both are bit-identical to ``gguf`` (``tests/test_gguf_read.py``). :func:`one_pass`
puts both in place for the duration of a ``with`` block and restores the ``gguf`` module after, as the engine's
hooks are removed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from autopatch import kernels

__all__ = ["dequantize", "one_pass"]

_PLAIN = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def dequantize(data: np.ndarray, qtype: Any, *, chunk_values: int = 1 << 22, threads: int | None = None,
               native: bool = True, scratch: np.ndarray | None = None) -> np.ndarray:
    """``gguf.dequantize(data, qtype)``, bit for bit: by :func:`autopatch.kernels.gguf_dequant` where it is built
    and knows the type (unless ``native=False``), else ``gguf``'s formulas in chunks of about ``chunk_values``
    outputs on ``threads`` threads. ``scratch``: a float32 array the result may be written into (a view of it is
    returned) where it is large enough, so that a caller who is done with each result before the next reuses the
    same memory instead of faulting in fresh pages for every tensor."""
    import gguf

    block_class = getattr(gguf.quants, qtype.name, None)
    if qtype.name in _PLAIN or block_class is None or not hasattr(block_class, "dequantize_rows"):
        return gguf.quants.dequantize(data, qtype)  # the module's own: gguf.dequantize may be this function
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(data).reshape(-1, data.shape[-1])  # off the memory map, once
    per_row = rows.shape[1] // size * block
    if scratch is not None and scratch.dtype == np.float32 and scratch.size >= rows.shape[0] * per_row:
        out = scratch.reshape(-1)[: rows.shape[0] * per_row].reshape(rows.shape[0], per_row)
    else:
        out = np.empty((rows.shape[0], per_row), dtype=np.float32)
    if native and kernels.gguf_dequant(qtype.name, rows.view(np.uint8), out):
        return out.reshape((*data.shape[:-1], per_row))
    step = max(1, chunk_values // per_row)

    def run(start: int) -> None:
        out[start:start + step] = block_class.dequantize_rows(rows[start:start + step]).reshape(-1, per_row)

    starts = range(0, rows.shape[0], step)
    workers = min(len(starts), threads or os.cpu_count() or 1)
    if workers <= 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, starts))
    return out.reshape((*data.shape[:-1], per_row))


@contextmanager
def one_pass() -> Iterator[None]:
    """Inside: ``gguf.GGUFReader`` returns one shared reader per file, ``gguf.dequantize`` is :func:`dequantize`
    (transformers imports both from ``gguf`` when it loads a GGUF file), and transformers' metadata-only
    ``load_gguf_checkpoint`` parses a file once. Restored on exit, however it exits."""
    import gguf

    original_reader, original_dequantize = gguf.GGUFReader, gguf.dequantize
    readers: dict[tuple[str, str], Any] = {}

    class PlainReader(original_reader):  # type: ignore[misc,valid-type]
        """``gguf.GGUFReader`` over a plain ndarray view of its memory map: every field and tensor it slices is a
        plain array, without ``np.memmap``'s Python-level ``__getitem__`` and ``__array_finalize__`` on each of the
        million slices a large vocabulary makes (the same bytes, not copied)."""

        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._plain = mapped.view(np.ndarray)

    def shared_reader(path: Any, mode: Any = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = PlainReader(path, mode)
        return readers[key]

    hf_gguf: Any = None
    try:
        from transformers import modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:
        pass
    original_load: Any = getattr(hf_gguf, "load_gguf_checkpoint", None)
    parsed: dict[str, Any] = {}

    def load_once(gguf_checkpoint_path: Any, return_tensors: bool = False, model_to_load: Any = None,
                  torch_dtype: Any = None) -> Any:
        """transformers' ``load_gguf_checkpoint``; its metadata-only result is parsed once per file (the tokenizer,
        the config and the model each ask for it) and handed out as a copy."""
        if return_tensors or model_to_load is not None or torch_dtype is not None:
            return original_load(gguf_checkpoint_path, return_tensors, model_to_load, torch_dtype)
        key = os.path.realpath(os.fspath(gguf_checkpoint_path))
        if key not in parsed:
            parsed[key] = original_load(gguf_checkpoint_path, False)
        return copy.deepcopy(parsed[key])

    gguf.GGUFReader, gguf.dequantize = shared_reader, dequantize  # type: ignore[assignment,misc]
    if original_load is not None:
        hf_gguf.load_gguf_checkpoint = load_once
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.dequantize = original_reader, original_dequantize  # type: ignore[misc]
        if original_load is not None:
            hf_gguf.load_gguf_checkpoint = original_load
        readers.clear()
        parsed.clear()
