"""Quantized inference (autopatch.quantize, autopatch.kernels): the kernel's arithmetic, the modes' refusals,
and every strategy and hook on quantized tiny models.

Tolerances, stated once: the int8 and int4 kernels and a float matmul by the same dequantized weight agree to
1e-4 (float32 summation order only); a quantized model's patched outputs equal those of the float model that carries
the same dequantized weights (greedy tokens identical, logits within 1e-3); against the original float weights,
int8 rounding moves logits by at most a few hundredths on these random models, and that is not asserted as equal.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopatch.errors import ConfigError
from autopatch.invariance import set_batch_invariant
from autopatch.kernels import (
    kernel_error,
    pack,
    pack4,
    pack4_scales,
    pack_scales,
    quantize_affine4,
    quantize_groups,
    unpack,
    unpack4,
    unpack4_scales,
    unpack_scales,
    w4_matmul,
    w8_matmul,
)
from autopatch.quantize import (
    QUANT_MODES,
    DynamicInt8Linear,
    Int8Linear,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    apply_mode,
    available_modes,
    check_mode,
    model_quantization,
    quantize_model,
)
from tests.tiny_models import TINY_ARCHITECTURES, byte_tokenizer, tiny_model, tiny_model_for_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_kernel_builds_here():
    assert kernel_error() is None  # CI's machine has gcc and AVX2; a failure here names what is missing


@pytest.mark.parametrize("m,n,k", [(1, 4, 32), (3, 5, 64), (9, 37, 64), (4, 8, 96), (70, 1030, 32)])  # 70 rows: the GEMM path
def test_kernel_equals_a_float_matmul_by_the_dequantized_weight(m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, k // 32, generator=g) / 50
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    want = x @ (q.float() * scales.repeat_interleave(32, dim=1)).t() + bias
    assert torch.allclose(w8_matmul(x, pack(q), pack_scales(scales), bias, n=n), want, atol=1e-4)


@pytest.mark.parametrize("k", [64, 2080, 8960])  # the kernels pass rows of x in blocks chosen by count and width
def test_a_rows_output_does_not_depend_on_its_batch(k):
    g = torch.Generator().manual_seed(0)
    q = pack(torch.randint(-127, 128, (14, k), generator=g, dtype=torch.int8))
    scales = pack_scales(torch.rand(14, k // 32, generator=g))
    x = torch.randn(13, k, generator=g)
    alone = [w8_matmul(x[i : i + 1].contiguous(), q, scales, None, n=14)[0] for i in range(13)]
    for m in range(2, 14):  # every block shape: 2 to 8 rows at once, and what is left after 8
        batched = w8_matmul(x[:m].contiguous(), q, scales, None, n=14)
        assert all(torch.equal(alone[i], batched[i]) for i in range(m)), m


def test_pack_round_trips_and_pads_to_whole_panels():
    q = torch.arange(5 * 32).remainder(255).sub(127).to(torch.int8).reshape(5, 32)
    packed = pack(q)
    assert packed.shape == (2, 2, 4, 16)
    assert torch.equal(unpack(packed, 5), q)
    scales = torch.rand(5, 3)
    assert pack_scales(scales).shape == (2, 3, 4) and torch.equal(unpack_scales(pack_scales(scales), 5), scales)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(torch.zeros(4, 20, dtype=torch.int8))


def test_group_scales_follow_each_32_weights():
    weight = torch.cat([torch.full((2, 32), 0.01), torch.full((2, 32), 5.0)], dim=1)
    q, scales = quantize_groups(weight)
    assert torch.allclose(scales, torch.tensor([[0.01, 5.0]] * 2) / 127)
    assert bool((q == 127).all())  # a small group keeps its full int8 range beside a large one
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_groups(torch.zeros(2, 48))


def test_kernel_refuses_mismatched_shapes_instead_of_reading_past_them():
    q, scales = pack(torch.zeros(8, 32, dtype=torch.int8)), pack_scales(torch.ones(8, 1))
    with pytest.raises(ValueError, match="expected float32"):
        w8_matmul(torch.randn(2, 64), q, scales, None)
    with pytest.raises(ValueError, match="expected float32"):
        w8_matmul(torch.randn(2, 32).double(), q, scales, None)
    with pytest.raises(ValueError, match="expected float32"):
        w8_matmul(torch.randn(2, 32), q, pack_scales(torch.ones(4, 1)), None)


@pytest.mark.parametrize("layer_type", [WeightOnlyInt8Linear, WeightOnlyInt4Linear])
def test_a_layer_binds_its_kernel_once_with_the_same_bits_and_rebinds_a_replaced_weight(layer_type):
    """Up to GEMM_ROWS rows a packed layer calls its kernel through kernels.bind (the weight checked once): the
    same bits as the checked call, for every row count; a weight replaced or copied gets its own binding."""
    import copy

    from autopatch.kernels import GEMM_ROWS, bind

    g = torch.Generator().manual_seed(31)
    layer = layer_type.from_linear(nn.Linear(64, 37))
    for m in (1, 2, 5, 9, GEMM_ROWS):
        x = torch.randn(m, 64, generator=g)
        want = type(layer).matmul(x, layer.qweight, layer.gscale, layer.bias, n=37)
        assert torch.equal(layer(x), want) and torch.equal(layer(x[None])[0], want)
    bound = layer._bound
    assert bound is not None and layer(torch.randn(1, 64, generator=g)) is not None and layer._bound is bound
    twin = copy.deepcopy(layer)  # its own buffers: its own binding, the same product
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(twin(x), layer(x)) and twin._bound is not bound
    other = layer_type.from_linear(nn.Linear(64, 37))
    layer.qweight, layer.gscale = other.qweight.clone(), other.gscale.clone()  # replaced, not written in place
    layer.bias = other.bias.clone()
    assert torch.equal(layer(x), other(x)) and layer._bound is not bound
    with pytest.raises(ValueError, match="expected float32"):  # checked as the unbound call checks it
        bind(layer.bits, layer.qweight, layer.gscale, None, n=36, k=64)


def _grid4(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random 4-bit levels with a scale and offset per 32 weights, as a GGUF Q4_K tensor has them."""
    return (torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8), torch.rand(n, k // 32, generator=g) / 50,
            -torch.rand(n, k // 32, generator=g) / 10)


def _dequant4(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(b.repeat_interleave(32, dim=1), q.float(), a.repeat_interleave(32, dim=1))


@pytest.mark.parametrize("m,n,k", [(1, 4, 32), (3, 5, 64), (9, 37, 64), (4, 8, 96), (70, 1030, 32)])  # 70 rows: the GEMM path
def test_int4_kernel_equals_a_float_matmul_by_the_dequantized_weight(m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n)
    q, a, b = _grid4(n, k, g)
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    want = x @ _dequant4(q, a, b).t() + bias
    assert torch.allclose(w4_matmul(x, pack4(q), pack4_scales(a, b), bias, n=n), want, atol=1e-4)


@pytest.mark.parametrize("k", [64, 2080, 8960])  # narrow rows: one pass per weight row; wide ones: blocks of 4
def test_an_int4_rows_output_does_not_depend_on_its_batch(k):
    g = torch.Generator().manual_seed(0)
    q, a, b = _grid4(14, k, g)
    packed, scales = pack4(q), pack4_scales(a, b)
    x = torch.randn(13, k, generator=g)
    alone = [w4_matmul(x[i : i + 1].contiguous(), packed, scales, None, n=14)[0] for i in range(13)]
    for m in range(2, 14):  # every block shape: 2 to 5 rows at once, then blocks of 4 and what is left
        batched = w4_matmul(x[:m].contiguous(), packed, scales, None, n=14)
        assert all(torch.equal(alone[i], batched[i]) for i in range(m)), m


def test_pack4_round_trips_and_pads_to_whole_panels():
    q, a, b = _grid4(5, 64, torch.Generator().manual_seed(1))
    packed = pack4(q)
    assert packed.shape == (2, 2, 4, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack4(packed, 5), q)
    back_a, back_b = unpack4_scales(pack4_scales(a, b), 5)
    assert torch.equal(back_a, a) and torch.equal(back_b, b)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack4(torch.zeros(4, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected float32"):
        w4_matmul(torch.randn(2, 64), packed, pack_scales(torch.ones(5, 2)), None, n=5)


def test_affine4_recovers_a_4bit_grid_and_rounds_anything_else():
    g = torch.Generator().manual_seed(2)
    q, a, b = _grid4(6, 96, g)
    q[0, :32] = torch.randint(3, 9, (32,), generator=g, dtype=torch.uint8)  # a group using only 6 of the 16 levels
    q[1, 32:64] = 7  # a constant group
    weight = _dequant4(q, a, b)
    got_q, got_a, got_b = quantize_affine4(weight)
    assert torch.allclose(_dequant4(got_q, got_a, got_b), weight, atol=1e-6)  # exact but for float32 rounding
    noisy = weight + torch.randn(weight.shape, generator=g) * 1e-3
    error = (_dequant4(*quantize_affine4(noisy)) - noisy).abs()
    assert error.max() > 1e-5 and bool((error <= (noisy.amax() - noisy.amin()) / 30 + 1e-6).all())  # half a step at most


def test_affine4_and_int8_groups_in_c_are_bit_identical_to_the_torch_operations():
    g = torch.Generator().manual_seed(3)
    q, a, b = _grid4(40, 256, g)
    q[0, :32] = torch.randint(3, 9, (32,), generator=g, dtype=torch.uint8)
    q[1, 32:64] = 7
    grid = _dequant4(q, a, b)
    for weight in (grid, grid + torch.randn(grid.shape, generator=g) * 1e-4, torch.randn(33, 96, generator=g) * 3,
                   torch.zeros(4, 64), grid.t().contiguous()[:, :32].t().contiguous()):
        for quantizer in (quantize_affine4, quantize_groups):
            ours, theirs = quantizer(weight), quantizer(weight, native=False)
            for x, y in zip(ours, theirs):
                assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


@pytest.mark.parametrize("layer", [WeightOnlyInt8Linear, DynamicInt8Linear])
def test_int8_layers_keep_shape_and_approximate_the_float_layer(layer):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    quantized = layer.from_linear(linear)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        out, ref = quantized(x), linear(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.05
    assert torch.allclose(quantized.dequantized_weight(), linear.weight, atol=linear.weight.abs().max().item() / 254 + 1e-6)


def test_int8_layers_round_trip_through_safetensors_without_pickle(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    layer = WeightOnlyInt8Linear.from_linear(nn.Linear(64, 10))
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    fresh = WeightOnlyInt8Linear(64, 10)
    fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))


def test_unknown_mode_is_refused_naming_the_modes_that_work():
    with pytest.raises(ConfigError, match=r"Unknown quantization mode 'int3'.*none, int8"):
        check_mode("int3")
    assert check_mode(None) is QUANT_MODES["none"]


def test_a_mode_this_machine_cannot_run_is_refused_with_the_reason(monkeypatch):
    import autopatch.quantize as quantize

    monkeypatch.setattr(quantize, "_kernel_error", lambda: "no C compiler found")
    with pytest.raises(ConfigError, match=r"'int8' cannot run here: no C compiler found.*work on this machine: none"):
        check_mode("int8")
    assert "int8" not in available_modes()


def test_load_model_refuses_a_bad_mode_before_loading_anything(monkeypatch):
    import autopatch.loading as loading

    def boom(*_args, **_kwargs):
        raise AssertionError("the model was looked up before the mode was checked")

    monkeypatch.setattr(loading, "resolve_model_source", boom)
    with pytest.raises(ConfigError, match="Unknown quantization mode"):
        loading.load_model("anything", quantize="fp4")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        loading.load_model("anything", quantize="int8", device="cuda")


def _dequantized_twin(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """``model`` with each Linear that ``quantized`` swapped replaced by a float Linear of the int8 weight."""
    for name, module in quantized.named_modules():
        if isinstance(module, Int8Linear):
            float_linear = model.get_submodule(name)
            float_linear.weight = nn.Parameter(module.dequantized_weight().clone(), requires_grad=False)
    return model


def _on_a_4bit_grid(*models: nn.Module) -> None:
    """Round every decoder Linear of ``models`` to a 4-bit grid, as a model dequantized from GGUF Q4_K has them
    (the LM head keeps its random weights, so ``int4`` must leave it int8)."""
    from autopatch.architectures import decoder_layers

    for model in models:
        for module in decoder_layers(model).modules():
            if isinstance(module, nn.Linear) and module.in_features % 32 == 0:
                with torch.no_grad():
                    module.weight.copy_(_dequant4(*quantize_affine4(module.weight)))


def test_int4_holds_4bit_weights_at_4_bits_and_everything_else_at_8():
    model = tiny_model("qwen2")
    head = model.lm_head
    _on_a_4bit_grid(model)
    quantize_model(model, "int4")
    kinds = {type(m) for name, m in model.named_modules() if isinstance(m, Int8Linear) and "layers" in name}
    assert kinds == {WeightOnlyInt4Linear}
    assert isinstance(model.lm_head, WeightOnlyInt8Linear) and model.lm_head is not head
    plain = tiny_model("qwen2")  # random weights: 4 bits would round them more than 8 do
    quantize_model(plain, "int4")
    assert not any(isinstance(m, WeightOnlyInt4Linear) for m in plain.modules())


def test_int4_all_rounds_every_weight_to_4_bits_the_head_included():
    model = tiny_model("qwen2")  # random weights, which int4 keeps at 8 bits
    quantize_model(model, "int4-all")
    linears = [m for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert linears and all(isinstance(m, WeightOnlyInt4Linear) for m in linears)
    assert isinstance(model.lm_head, WeightOnlyInt4Linear) and model_quantization(model) == "int4-all"


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-all"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_quantized_tiny_models_keep_embeddings_and_match_their_dequantized_twin(arch, mode):
    from autopatch.fingerprint import model_fingerprint

    quantized, reference = tiny_model(arch), tiny_model(arch)
    if mode == "int4":
        _on_a_4bit_grid(quantized, reference)
    before = model_fingerprint(quantized)
    swapped = quantize_model(quantized, mode)
    assert swapped > 0 and model_quantization(quantized) == mode
    assert model_fingerprint(quantized) == before  # the shipped profile, gate and screen still resolve
    twin = _dequantized_twin(reference, quantized)
    ids = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        assert torch.allclose(quantized(ids).logits, twin(ids).logits, atol=1e-3)


def _strategies_and_controls() -> list[tuple[str, str | None]]:
    from autopatch.registry import CONTROLS, standalone_strategies

    return [(name, None) for name in standalone_strategies()] + [("reroute", name) for name in CONTROLS]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("strategy,control", _strategies_and_controls())
def test_every_strategy_and_control_patches_a_quantized_model_as_the_float_twin(strategy, control, mode):
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import PatchProfile
    from autopatch.prompts import PromptFormat
    from autopatch.registry import strategy as strategy_spec

    tok = byte_tokenizer()
    quantized, reference = tiny_model_for_bytes("llama"), tiny_model_for_bytes("llama")
    if mode == "int4":
        _on_a_4bit_grid(quantized, reference)
    quantize_model(quantized, mode)
    assert mode == "int8" or any(isinstance(m, WeightOnlyInt4Linear) for m in quantized.modules())
    twin = _dequantized_twin(reference, quantized)
    target = 1 if strategy_spec(strategy).target_before_source else 2
    profile = PatchProfile(strategy=strategy, source_layer=2, target_layer=target,
                           prompt_format=PromptFormat(demonstrations=()))
    questions = ["What is the capital of the country where the Colosseum is located?",
                 "Who founded the company that makes the iPhone?"]
    outputs = []
    for model in (quantized, twin):
        patcher = AutoPatcher(model, tok, profile, gate=AlwaysPatch(), control=control)
        with torch.no_grad():
            answers = patcher.answer(questions, max_new_tokens=5)
        outputs.append([(a.text, a.report.patched, a.report.strategy) for a in answers])
    assert outputs[0] == outputs[1]
    assert all(patched for _, patched, _ in outputs[0])


def test_capture_and_patch_on_a_quantized_model_leave_no_hooks():
    from autopatch.architectures import decoder_layers
    from autopatch.engine import PatchEdit, capture, patch

    model = tiny_model("qwen2")
    quantize_model(model, "int8")
    ids = torch.randint(3, 90, (1, 6))
    with torch.no_grad(), capture(model, layers=[1], positions=[-1]) as cap:
        model(ids)
    h = cap.states[1][0, 0]
    with torch.no_grad(), patch(model, [PatchEdit(layer=2, row=0, position=-1, vector=h)]):
        patched = model(ids).logits
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.equal(patched, plain)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in decoder_layers(model).modules())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_are_cached_checksummed_and_rebuilt_when_damaged(monkeypatch, tmp_path, mode):
    import autopatch.quantize_cache as quantize_cache

    def model():
        fresh = tiny_model("qwen2")
        if mode == "int4":
            _on_a_4bit_grid(fresh)
        return fresh

    monkeypatch.setenv("AUTOPATCH_CACHE", str(tmp_path))
    ids = torch.randint(3, 90, (1, 7))
    first = model()
    assert quantize_model(first, mode, cache_key="tiny-qwen2") > 0
    weights, manifest = quantize_cache.cache_paths("tiny-qwen2", mode)
    assert weights.exists() and manifest.exists()

    calls = []
    originals = {cls: cls.from_linear.__func__ for cls in QUANT_MODES[mode].layers}  # type: ignore[attr-defined]
    for cls, original in originals.items():
        monkeypatch.setattr(cls, "from_linear",
                            classmethod(lambda c, linear, o=original: calls.append(1) or o(c, linear)))
    second = model()
    quantize_model(second, mode, cache_key="tiny-qwen2")
    assert calls == []  # read from the cache, not quantized again
    assert [type(m) for m in second.modules()] == [type(m) for m in first.modules()]  # int4 and int8 layers alike
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)

    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the tensors
    weights.write_bytes(bytes(data))
    third = model()
    quantize_model(third, mode, cache_key="tiny-qwen2")
    assert calls  # the damaged file was refused and the weights quantized again
    with torch.no_grad():
        assert torch.equal(first(ids).logits, third(ids).logits)


def test_cache_key_changes_when_the_weights_file_changes(tmp_path):
    from autopatch.quantize import source_cache_key

    (tmp_path / "model.safetensors").write_bytes(b"one")
    before = source_cache_key(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"other")
    assert source_cache_key(tmp_path) != before
    assert source_cache_key(tmp_path / "missing") is None


@pytest.mark.parametrize("command", ["eval", "generate", "serve", "explain", "train-gate", "train-screen"])
def test_every_model_loading_subcommand_takes_quantize(command):
    from autopatch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # type: ignore[union-attr]
    options = {o for action in sub.choices[command]._actions for o in action.option_strings}
    assert "--quantize" in options
    helps = " ".join(a.help or "" for a in sub.choices[command]._actions if "--quantize" in a.option_strings)
    assert all(mode in helps for mode in QUANT_MODES)  # the help names every mode of the table


def test_the_default_mode_is_the_embedded_models_measured_one_on_the_cpu_only(monkeypatch):
    from dataclasses import replace

    import autopatch.models as models
    import autopatch.quantize as quantize
    from autopatch.quantize import default_mode

    assert all(m in QUANT_MODES for spec in models.EMBEDDED_MODELS.values() for m in spec.cpu_quantize)
    name = "qwen2.5-coder-1.5b-instruct"
    monkeypatch.setitem(models.EMBEDDED_MODELS, name,
                        replace(models.EMBEDDED_MODELS[name], cpu_quantize=("int8-bf16", "int8")))
    monkeypatch.setattr(quantize.kernels, "fast_bfloat16", lambda: True)
    assert default_mode(name) == "int8-bf16"
    monkeypatch.setattr(quantize.kernels, "fast_bfloat16", lambda: False)
    assert default_mode(name) == "int8"  # the first default this machine runs
    assert default_mode(name, device="cuda") == "none"
    assert default_mode(name, dtype=torch.bfloat16) == "none"
    assert default_mode("/some/local/model") == "none"  # never measured: float32 unless asked
    monkeypatch.setattr(quantize, "_kernel_error", lambda: "no C compiler found")
    assert default_mode(name) == "none"  # a default that cannot run here falls back; only an explicit ask is refused


def test_a_q8_default_is_taken_only_where_it_was_measured_faster(monkeypatch):
    from dataclasses import replace

    import autopatch.models as models
    import autopatch.quantize as quantize
    from autopatch.quantize import default_mode

    name = "gemma-3-270m"
    monkeypatch.setitem(models.EMBEDDED_MODELS, name,
                        replace(models.EMBEDDED_MODELS[name], cpu_quantize=("int4-bf16", "int4-q8", "int4")))
    monkeypatch.setattr(quantize, "_kernel_error", lambda: None)
    monkeypatch.setattr(quantize.kernels, "fast_bfloat16", lambda: False)
    monkeypatch.setattr(quantize.kernels, "avx512", lambda: False)
    assert default_mode(name) == "int4-q8"  # AVX2 only: the int8-activation kernels
    monkeypatch.setattr(quantize.kernels, "avx512", lambda: True)
    assert default_mode(name) == "int4"  # AVX-512: never timed against int4 there, so not the default
    assert quantize.check_mode("int4-q8").name == "int4-q8"  # though it runs when asked
    monkeypatch.setattr(quantize.kernels, "fast_bfloat16", lambda: True)
    assert default_mode(name) == "int4-bf16"


def test_the_shipped_defaults_on_an_avx2_only_cpu(monkeypatch):
    import autopatch.quantize as quantize
    from autopatch.quantize import default_mode

    monkeypatch.setattr(quantize, "_kernel_error", lambda: None)
    monkeypatch.setattr(quantize.kernels, "fast_bfloat16", lambda: False)
    monkeypatch.setattr(quantize.kernels, "avx512", lambda: False)
    assert {name: default_mode(name) for name in ("gemma-3-270m", "qwen2.5-coder-0.5b-instruct",
                                                  "qwen2.5-coder-1.5b-instruct")} == {
        "gemma-3-270m": "int4-q8", "qwen2.5-coder-0.5b-instruct": "int8",
        "qwen2.5-coder-1.5b-instruct": "int4-q8-floatdown"}  # as measured: docs/quantization.md, "The default"
    assert default_mode("qwen2.5-coder-1.5b-instruct", dtype="bfloat16") == "none"  # off float32: as asked


def test_releasing_the_openmp_pool_leaves_torch_and_the_kernels_working():
    from autopatch.kernels import release_openmp_pool

    q, scales = quantize_groups(torch.randn(8, 64))
    x = torch.randn(3, 64)
    before = w8_matmul(x, pack(q), pack_scales(scales), None)
    assert isinstance(release_openmp_pool(), bool)  # True where torch runs on libgomp (CI's and this machine's)
    assert torch.equal(w8_matmul(x, pack(q), pack_scales(scales), None), before)  # the pool comes back by itself
    assert torch.allclose(x @ x.t(), (x.double() @ x.double().t()).float(), atol=1e-4)


# bfloat16 prefill (int8-bf16, int4-bf16). Tolerance: against float32 operands, bfloat16 rounds each operand and
# each product to 8 bits of mantissa, so outputs of order 1 move by up to a few hundredths; exact where stated.

def _bf16_here(monkeypatch) -> None:
    """Let the bfloat16 modes run on any CPU (on one without bfloat16 units they are only slower, not wrong)."""
    import autopatch.kernels as kernels

    monkeypatch.setattr(kernels, "fast_bfloat16", lambda: True)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_bf16_dequant_is_torchs_rounding_of_the_float32_weight_bit_for_bit(bits):
    from autopatch.kernels import _build, dequantize_affine4, dequantize_groups

    lib, _ = _build()
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(40, 96, generator=g) * 0.05
    if bits == 8:
        q, s = quantize_groups(weight)
        packed, scales, want = pack(q), pack_scales(s), dequantize_groups(q, s)
    else:
        q4, a, b = quantize_affine4(weight)
        packed, scales, want = pack4(q4), pack4_scales(a, b), dequantize_affine4(q4, a, b)
    for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, "_bf16")):
        out = torch.empty(40, 96, dtype=dtype)
        getattr(lib, f"autopatch_w{bits}_dequant{suffix}")(96, packed.data_ptr(), scales.data_ptr(), 0, 40,
                                                           out.data_ptr())
        assert torch.equal(out, want.to(dtype))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_bf16_prefill_multiplies_bfloat16_operands_and_a_decode_step_stays_float32(bits):
    g = torch.Generator().manual_seed(10 + bits)
    weight, bias = torch.randn(70, 64, generator=g) * 0.1, torch.randn(70, generator=g)
    if bits == 8:
        from autopatch.kernels import dequantize_groups

        q, s = quantize_groups(weight)
        args, dense, matmul = (pack(q), pack_scales(s)), dequantize_groups(q, s), w8_matmul
    else:
        from autopatch.kernels import dequantize_affine4

        q4, a, b = quantize_affine4(weight)
        args, dense, matmul = (pack4(q4), pack4_scales(a, b)), dequantize_affine4(q4, a, b), w4_matmul
    prefill = torch.randn(60, 64, generator=g)  # above GEMM_ROWS: torch's GEMM
    got = matmul(prefill, *args, bias, n=70, prefill=torch.bfloat16)
    want = (prefill.bfloat16() @ dense.bfloat16().t()).float() + bias
    assert torch.allclose(got, want, atol=2e-2)
    assert not torch.allclose(got, prefill @ dense.t() + bias, atol=1e-5)  # bfloat16 did change the product
    step = prefill[:3].contiguous()  # a decode step: autopatch's float32 kernel, whatever the prefill dtype
    assert torch.equal(matmul(step, *args, bias, n=70, prefill=torch.bfloat16), matmul(step, *args, bias, n=70))
    with pytest.raises(ValueError, match="prefill must be one of"):
        matmul(prefill, *args, bias, n=70, prefill=torch.float16)


def test_bf16_modes_are_refused_on_a_cpu_without_bfloat16_units(monkeypatch):
    import autopatch.kernels as kernels

    monkeypatch.setattr(kernels, "fast_bfloat16", lambda: False)
    with pytest.raises(ConfigError, match=r"'int4-bf16' cannot run here: this CPU has no bfloat16 matrix units.*"
                                          r"work on this machine: none, int8, int4, int4-all, int8-q8, int4-q8, int4-q8-floatdown, int8-dynamic"):
        check_mode("int4-bf16")
    assert "int8-bf16" not in available_modes() and "int4" in available_modes()


@pytest.mark.parametrize("mode,weights", [("int8-bf16", "int8"), ("int4-bf16", "int4")])
def test_a_bf16_mode_reads_the_cache_of_its_weights_and_only_its_prefill_differs(monkeypatch, tmp_path, mode, weights):
    import autopatch.quantize_cache as quantize_cache

    _bf16_here(monkeypatch)
    monkeypatch.setenv("AUTOPATCH_CACHE", str(tmp_path))

    def model():
        fresh = tiny_model("qwen2")
        _on_a_4bit_grid(fresh)
        return fresh

    plain = model()
    quantize_model(plain, weights, cache_key="tiny-qwen2")
    calls = []
    for cls in QUANT_MODES[mode].layers:
        monkeypatch.setattr(cls, "from_linear", classmethod(lambda c, linear: calls.append(1)))
    fast = model()
    assert quantize_model(fast, mode, cache_key="tiny-qwen2") > 0
    assert calls == [] and not quantize_cache.cache_paths("tiny-qwen2", mode)[0].exists()  # int4's own cache
    assert model_quantization(fast) == mode and model_quantization(plain) == weights
    packed = [m for m in fast.modules() if isinstance(m, (WeightOnlyInt8Linear, WeightOnlyInt4Linear))]
    head = fast.get_output_embeddings()
    assert packed and all(m.prefill == (torch.float32 if m is head else torch.bfloat16) for m in packed)
    assert isinstance(head, (WeightOnlyInt8Linear, WeightOnlyInt4Linear))  # the head's logits keep float32
    short, long = torch.randint(3, 90, (1, 7)), torch.randint(3, 90, (1, 60))
    with torch.no_grad():
        assert torch.equal(fast(short).logits, plain(short).logits)  # 7 rows: the float32 kernel, bit for bit
        fast_long, plain_long = fast(long).logits, plain(long).logits
    assert not torch.equal(fast_long, plain_long) and torch.allclose(fast_long, plain_long, atol=5e-2)



@pytest.mark.parametrize("bits", [8, 4])
def test_a_bf16_gemm_rows_result_does_not_depend_on_the_rows_beside_it(bits):
    """With blocks=True the bfloat16 GEMM multiplies fixed blocks of kernels.GEMM_BLOCK rows: a row comes out the same alone, at
    any position and beside any rows (torch's GEMM alone picks its kernel by the row count; at this shape, the 1.5B's
    value projection, 12 rows of 300 came out different in one call of their own before the blocks)."""
    g = torch.Generator().manual_seed(30 + bits)
    weight = torch.randn(256, 1536, generator=g) * 0.05
    if bits == 8:
        q, s = quantize_groups(weight)
        args, matmul = (pack(q), pack_scales(s)), w8_matmul
    else:
        q4, a, b = quantize_affine4(weight)
        args, matmul = (pack4(q4), pack4_scales(a, b)), w4_matmul
    rows = torch.randn(300, 1536, generator=g)
    whole = matmul(rows, *args, None, n=256, prefill=torch.bfloat16, gemm=True, blocks=True)
    for start, count in ((0, 1), (5, 7), (3, 12), (40, 60), (130, 170)):
        part = matmul(rows[start : start + count].contiguous(), *args, None, n=256, prefill=torch.bfloat16, gemm=True,
                      blocks=True)
        assert torch.equal(part, whole[start : start + count])
    assert not torch.equal(whole[:7], matmul(rows[:7].contiguous(), *args, None, n=256))  # 7 rows: the kernel's own


@pytest.mark.parametrize("mode", ["int4-bf16", "int4-q8"])
def test_a_prompt_gets_the_same_logits_alone_and_in_a_padded_batch_once_invariant(monkeypatch, mode):
    """autopatch.invariance.set_batch_invariant (the row-invariant attention; under a bfloat16 prefill fixed GEMM
    blocks too, the int8-activation kernels round each row alone anyway): a prompt's next-token logits do not
    depend on its batch."""
    _bf16_here(monkeypatch)
    model = tiny_model("qwen2")
    model.set_attn_implementation("sdpa")
    _on_a_4bit_grid(model)
    quantize_model(model, mode)
    assert model.config._attn_implementation == "sdpa"  # batch-dependent, and faster, unless asked
    assert set_batch_invariant(model) and model.config._attn_implementation == "autopatch_rows"
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 90, (length,), generator=g) for length in (9, 30, 4)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat((torch.zeros(width - len(p), dtype=torch.long), p)) for p in prompts])
    mask = torch.stack([torch.cat((torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)))
                        for p in prompts])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        for row, prompt in enumerate(prompts):
            assert torch.equal(model(input_ids=prompt[None], logits_to_keep=1).logits[0, -1], batched[row])
    assert not set_batch_invariant(model, on=False) and model.config._attn_implementation == "sdpa"
    apply_mode(model, QUANT_MODES["int4"])
    assert not set_batch_invariant(model)  # float32 activations: nothing to make invariant


def test_batch_invariance_is_all_or_nothing_on_a_model_with_eager_attention(monkeypatch):
    """Attention that cannot go per row (eager, kept for attention weights) leaves the GEMM blocks off too."""
    _bf16_here(monkeypatch)
    model = tiny_model("qwen2")
    _on_a_4bit_grid(model)
    quantize_model(model, "int4-bf16")
    assert model.config._attn_implementation == "eager"
    assert not set_batch_invariant(model)
    packed = [m for m in model.modules() if isinstance(m, (WeightOnlyInt8Linear, WeightOnlyInt4Linear))]
    assert packed and not any(m.invariant for m in packed) and model.config._attn_implementation == "eager"
