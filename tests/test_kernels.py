"""autopatch.kernels' int8-activation kernels (q8.c, ``kernels.Q8``) and the ``-q8`` modes on them (the weight-only
kernels are tested with their modes in test_quantize.py).

Tolerances, stated once: the kernel and the rounded product computed here in float64 (x rounded to int8 per 32
inputs exactly as ``q8_quantize`` rounds it, the weight as the layer holds it) agree to 1e-5 relative (float32
summation order only); a ``-q8`` model's outputs equal those of its twin whose Linears compute that rounded product
(greedy tokens identical, logits within 1e-3); against float32 activations the rounding moves a product by well
under 1% on random inputs, asserted as a bound, not as equality.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from autopatch import kernels
from autopatch.kernels import (
    FLAGS,
    GROUP,
    Q8,
    dequantize_affine4,
    dequantize_groups,
    pack,
    pack4,
    pack4_scales,
    pack_scales,
    q8_quantize,
    quantize_groups,
    w4_matmul,
    w8_matmul,
)
from autopatch.quantize import (
    QUANT_MODES,
    Int8Linear,
    PackedLinear,
    check_mode,
    model_quantization,
    quantize_model,
)
from tests.tiny_models import byte_tokenizer, tiny_model, tiny_model_for_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq, d)`` by the rule q8.c follows, in torch: float32 ``127 / max|x|``, round half to even."""
    groups = x.float().reshape(x.shape[0], -1, GROUP)
    top = groups.abs().amax(dim=2)
    inv = torch.where(top > 0, torch.tensor(127.0) / top, torch.zeros_like(top))
    xq = torch.round(groups * inv[:, :, None]).to(torch.int8).reshape(x.shape)
    return xq, top / 127.0


def rounded_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in float64: the weight as it is times x as :func:`reference_q8` rounds it."""
    xq, d = reference_q8(x)
    rounded = (xq.double().reshape(x.shape[0], -1, GROUP) * d.double()[:, :, None]).reshape(x.shape)
    return rounded @ weight.double().t()


def _int4_operands(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    a, b = torch.rand(n, k // GROUP, generator=g) / 50, torch.randn(n, k // GROUP, generator=g) / 10
    return q, a, b, dequantize_affine4(q, a, b)


def test_the_rounding_is_the_torch_rule_bit_for_bit():
    x = torch.randn(7, 96) * torch.logspace(-3, 2, 96)
    x[2, 32:64] = 0.0  # an all-zero group: scale 0, every value 0
    xq, d, s = q8_quantize(x)
    want_q, want_d = reference_q8(x)
    assert torch.equal(xq, want_q) and torch.equal(d, want_d)
    sums = xq.reshape(7, 3, GROUP).sum(dim=2).float()  # exact integers
    assert torch.equal(s, d * sums) and int(xq.abs().max()) == 127


@pytest.mark.parametrize("m,n,k", [(1, 4, 32), (3, 5, 64), (9, 37, 64), (4, 8, 96), (70, 1030, 32)])
def test_int4_q8_kernel_is_the_rounded_product(m, n, k):
    q, a, b, weight = _int4_operands(n, k, m * 100 + n)
    g = torch.Generator().manual_seed(m * 100 + n + 1)  # seeded: the bound below is a statement about these inputs
    bias, x = torch.randn(n, generator=g), torch.randn(m, k, generator=g)
    got = w4_matmul(x, pack4(q), pack4_scales(a, b), bias, n=n, prefill=Q8)
    want = rounded_product(x, weight) + bias.double()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got - (x @ weight.t() + bias)).norm() < 0.01 * (x @ weight.t()).norm()  # the rounding, bounded


@pytest.mark.parametrize("m,n,k", [(1, 4, 32), (3, 5, 64), (9, 37, 64), (4, 8, 96), (70, 1030, 32)])
def test_int8_q8_kernel_is_the_rounded_product(m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)  # -128 too: |w| = 128 in vpmaddubsw
    scales = torch.rand(n, k // GROUP, generator=g) / 50
    weight = dequantize_groups(q, scales)
    x = torch.randn(m, k, generator=g) * 3
    got = w8_matmul(x, pack(q), pack_scales(scales), None, n=n, prefill=Q8)
    assert torch.allclose(got.double(), rounded_product(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_q8_output_does_not_depend_on_its_batch_at_any_row_count(bits):
    k, n = 2080, 14
    if bits == 4:
        q, a, b, _ = _int4_operands(n, k, 0)
        packed, scales, matmul = pack4(q), pack4_scales(a, b), w4_matmul
    else:
        q8, s8 = quantize_groups(torch.randn(n, k))
        packed, scales, matmul = pack(q8), pack_scales(s8), w8_matmul
    x = torch.randn(70, k)
    alone = [matmul(x[i : i + 1].contiguous(), packed, scales, None, n=n, prefill=Q8)[0] for i in range(70)]
    for m in [*range(2, 14), 70]:  # every pass shape, and a prefill's count (no GEMM path in this mode)
        batched = matmul(x[:m].contiguous(), packed, scales, None, n=n, prefill=Q8)
        assert all(torch.equal(alone[i], batched[i]) for i in range(m)), m


@pytest.mark.parametrize("bits", [8, 4])
def test_the_avx2_build_of_the_q8_kernels_gives_the_same_bits(bits, tmp_path):
    """Built for AVX2 alone (``-mno-avx512f``), q8.c multiplies as the library in use does, bit for bit: on an
    AVX512-VNNI machine that is its other path (vpdpbusd on 4 weight rows at once), elsewhere the same one."""
    target = tmp_path / "q8_avx2.so"
    compiler = kernels._compiler()  # the one the library in use was built with
    assert compiler is not None
    subprocess.run([compiler, *FLAGS, "-mno-avx512f", str(Path(kernels.__file__).with_name("q8.c")), "-o",
                    str(target)], check=True)
    matmul_q8 = getattr(ctypes.CDLL(str(target)), f"autopatch_w{bits}_matmul_q8")
    k, n = 2080, 14
    if bits == 4:
        q, a, b, _ = _int4_operands(n, k, 1)
        packed, scales, matmul = pack4(q), pack4_scales(a, b), w4_matmul
    else:
        q8, s8 = quantize_groups(torch.randn(n, k, generator=torch.Generator().manual_seed(1)))
        packed, scales, matmul = pack(q8), pack_scales(s8), w8_matmul
    bias = torch.randn(n)
    for m in (1, 3, 5, 7, 13):  # one pass or several, of either path's row blocks (3 and 6)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        avx2 = torch.empty(m, n)
        assert matmul_q8(*(ctypes.c_int(v) for v in (m, n, k)),
                         *(ctypes.c_void_p(t.data_ptr()) for t in (x, packed, scales, bias, avx2))) == 0
        assert torch.equal(matmul(x, packed, scales, bias, n=n, prefill=Q8), avx2), m


def test_the_q8_modes_share_their_weights_cache_and_run_wherever_the_kernels_build():
    for weights in ("int8", "int4"):
        mode = check_mode(f"{weights}-q8")
        assert mode.cache_name == weights and mode.layers == QUANT_MODES[weights].layers and mode.prefill == Q8


class RoundedTwin(nn.Module):
    """A float module computing what a packed layer computes in a ``-q8`` mode (:func:`rounded_product`)."""

    def __init__(self, layer: PackedLinear):
        super().__init__()
        self.weight = layer.dequantized_weight()
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = rounded_product(rows, self.weight).float()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


class FloatTwin(nn.Module):
    """A float module computing what a packed layer computes on float32 activations: its weight as held, times x."""

    def __init__(self, layer: PackedLinear):
        super().__init__()
        self.weight, self.bias = layer.dequantized_weight(), layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _rounded_twin(reference: nn.Module, quantized: nn.Module, kept: tuple[str, ...] = ()) -> nn.Module:
    """``reference`` with each of ``quantized``'s packed layers replaced by its twin: float inputs for the layers
    named in ``kept`` (by last name), rounded ones for the rest."""
    for name, module in list(quantized.named_modules()):
        if isinstance(module, PackedLinear):
            parent, _, child = name.rpartition(".")
            twin = FloatTwin(module) if child in kept else RoundedTwin(module)
            setattr(reference.get_submodule(parent) if parent else reference, child, twin)
    return reference


@pytest.mark.parametrize("mode", ["int8-q8", "int4-q8"])
def test_a_q8_model_is_its_rounded_twin_the_head_included(mode):
    quantized, reference = tiny_model("llama"), tiny_model("llama")
    assert quantize_model(quantized, mode) > 0 and model_quantization(quantized) == mode
    packed = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    assert all(isinstance(m, PackedLinear) and m.prefill == Q8 for m in packed)
    assert quantized.lm_head in packed
    twin = _rounded_twin(reference, quantized)
    ids = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        assert torch.allclose(quantized(ids).logits, twin(ids).logits, atol=1e-3)
        decoded = quantized.generate(ids, max_new_tokens=4, do_sample=False)  # decode steps: one row each
        assert torch.equal(decoded, twin.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("kept", [("up_proj",), ("gate_proj", "up_proj", "lm_head")])
def test_a_q8_mode_keeping_some_inputs_float_rounds_the_rest_only(kept):
    from autopatch.invariance import set_batch_invariant
    from autopatch.quantize import apply_mode

    mode = QUANT_MODES["int4"].with_q8_activations(kept, suffix="-test")
    assert mode.name == "int4-q8-test" and mode.cache_name == "int4" and mode.float_inputs == kept
    quantized, reference = tiny_model("llama"), tiny_model("llama")
    quantize_model(quantized, "int4")
    apply_mode(quantized, mode)
    for name, module in quantized.named_modules():
        if isinstance(module, PackedLinear):
            assert module.prefill == (torch.float32 if name.rpartition(".")[2] in kept else Q8), name
    reference = _rounded_twin(reference, quantized, kept)
    ids = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        assert torch.allclose(quantized(ids).logits, reference(ids).logits, atol=1e-3)
        assert torch.equal(quantized.generate(ids, max_new_tokens=4, do_sample=False),
                           reference.generate(ids, max_new_tokens=4, do_sample=False))
    quantized.set_attn_implementation("sdpa")
    assert not set_batch_invariant(quantized)  # its float32 layers multiply a row by its batch's size: refused
    apply_mode(quantized, QUANT_MODES["int4-q8"])
    assert set_batch_invariant(quantized)  # every input rounded: row-invariant
    set_batch_invariant(quantized, on=False)


@pytest.mark.parametrize("strategy", ["decompose", "reroute"])
def test_strategies_patch_a_q8_model_as_its_rounded_twin(strategy):
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import PatchProfile
    from autopatch.prompts import PromptFormat
    from autopatch.registry import strategy as strategy_spec

    tok = byte_tokenizer()
    quantized, reference = tiny_model_for_bytes("llama"), tiny_model_for_bytes("llama")
    quantize_model(quantized, "int8-q8")
    twin = _rounded_twin(reference, quantized)
    target = 1 if strategy_spec(strategy).target_before_source else 2
    profile = PatchProfile(strategy=strategy, source_layer=2, target_layer=target,
                           prompt_format=PromptFormat(demonstrations=()))
    questions = ["What is the capital of the country where the Colosseum is located?",
                 "Who founded the company that makes the iPhone?"]
    outputs = []
    for model in (quantized, twin):
        patcher = AutoPatcher(model, tok, profile, gate=AlwaysPatch())
        with torch.no_grad():
            answers = patcher.answer(questions, max_new_tokens=5)
        outputs.append([(a.text, a.report.patched, a.report.strategy) for a in answers])
    assert outputs[0] == outputs[1] and all(patched for _, patched, _ in outputs[0])
