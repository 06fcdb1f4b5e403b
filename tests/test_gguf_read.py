"""The first load's GGUF helpers: a chunked, threaded dequantize bit-identical to ``gguf``'s, and one shared reader."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from autopatch.gguf_read import dequantize, one_pass
from autopatch.kernels import GGUF_BLOCKS, kernel_error

QUANTIZED = ("Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_0", "Q5_K")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF file of random blocks of every type the embedded models use (and two more), plus a float tensor."""
    path = tmp_path_factory.mktemp("gguf") / "random.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for name in QUANTIZED:
        qtype = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, per_row = 37, 4 * 256  # 37 rows: chunks never divide it evenly
        raw = rng.integers(0, 256, size=(rows, per_row // block * size), dtype=np.uint8)
        writer.add_tensor(f"t.{name}", raw, raw_dtype=qtype)
    writer.add_tensor("t.F32", rng.normal(size=(5, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("chunk_values,threads,native", [(1 << 22, 1, False), (3000, 2, False), (1, 3, False),
                                                          (0, 1, True), (0, 2, True)])
def test_dequantize_is_bit_identical_to_gguf_s_over_any_chunking(gguf_file, chunk_values, threads, native):
    if native:  # gguf.c, on every type the embedded models use
        assert kernel_error() is None and set(QUANTIZED) <= set(GGUF_BLOCKS)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
    reader = gguf.GGUFReader(gguf_file)
    assert {t.name for t in reader.tensors} == {*(f"t.{n}" for n in QUANTIZED), "t.F32"}
    for tensor in reader.tensors:
        with np.errstate(all="ignore"):  # random scale bits include NaN and infinity
            theirs = gguf.dequantize(tensor.data, tensor.tensor_type)
            ours = dequantize(tensor.data, tensor.tensor_type, chunk_values=chunk_values or 1 << 22, threads=threads,
                              native=native)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, tensor.name
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), tensor.name  # NaNs from random scales too
    if native:
        torch.set_num_threads(previous)


def test_one_pass_shares_one_reader_per_file_and_restores_the_gguf_module(gguf_file):
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    reader_class, dequantize_function, load_function = gguf.GGUFReader, gguf.dequantize, hf_gguf.load_gguf_checkpoint
    with one_pass():
        first, again = gguf.GGUFReader(gguf_file), gguf.GGUFReader(str(gguf_file))
        assert first is again and gguf.dequantize is dequantize and hf_gguf.load_gguf_checkpoint is not load_function
        for tensor in first.tensors:  # as transformers calls it; plain types go to gguf's own function
            with np.errstate(all="ignore"):
                assert gguf.dequantize(tensor.data, tensor.tensor_type).shape[0] == tensor.data.shape[0]
    assert gguf.GGUFReader is reader_class and gguf.dequantize is dequantize_function
    assert hf_gguf.load_gguf_checkpoint is load_function
    with pytest.raises(RuntimeError), one_pass():
        raise RuntimeError("a failing load")
    assert gguf.GGUFReader is reader_class and gguf.dequantize is dequantize_function
    assert hf_gguf.load_gguf_checkpoint is load_function


def test_the_native_dequantize_runs_every_embedded_type_and_refuses_a_wrong_size(gguf_file):
    from autopatch.kernels import gguf_dequant

    reader = gguf.GGUFReader(gguf_file)
    for tensor in reader.tensors:
        if tensor.tensor_type.name in QUANTIZED:
            blocks = np.ascontiguousarray(tensor.data).view(np.uint8)
            _, size, values = GGUF_BLOCKS[tensor.tensor_type.name]
            out = np.empty(blocks.size // size * values, dtype=np.float32)
            assert gguf_dequant(tensor.tensor_type.name, blocks, out), tensor.name
            with pytest.raises(ValueError, match="gguf_dequant"):
                gguf_dequant(tensor.tensor_type.name, blocks, out[:-1])
    assert not gguf_dequant("IQ2_XXS", np.zeros(66, dtype=np.uint8), np.empty(256, dtype=np.float32))


def test_dequantize_writes_into_a_scratch_buffer_that_is_large_enough(gguf_file):
    reader = gguf.GGUFReader(gguf_file)
    tensor = next(t for t in reader.tensors if t.tensor_type.name == "Q4_K")
    with np.errstate(all="ignore"):
        fresh = dequantize(tensor.data, tensor.tensor_type)
        scratch = np.full(fresh.size + 7, 5.0, dtype=np.float32)
        reused = dequantize(tensor.data, tensor.tensor_type, scratch=scratch)
        small = dequantize(tensor.data, tensor.tensor_type, scratch=scratch[:10])
    assert np.shares_memory(reused, scratch) and not np.shares_memory(small, scratch)
    assert np.array_equal(reused.view(np.uint32), fresh.view(np.uint32)) and reused.shape == fresh.shape
    assert np.array_equal(small.view(np.uint32), fresh.view(np.uint32))
