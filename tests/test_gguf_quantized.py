"""The whole-model quantized cache that a quantized first load from GGUF writes: read back exactly, refused when
tampered with (autopatch.gguf_quantized). The GGUF side runs on the real Gemma in tests/test_gemma_e2e.py."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from autopatch.gguf_quantized import _load
from autopatch.quantize import check_mode, quantizable_linears, quantize_model
from autopatch.quantize_cache import cache_paths, write_cache
from tests.tiny_models import byte_tokenizer, tiny_model


def _cached_tiny(tmp_path, monkeypatch, arch="qwen2"):
    """A tiny model quantized to int8 in memory, written as a whole-model cache folder; ``(model, folder, key)``."""
    monkeypatch.setenv("AUTOPATCH_QUANTIZED_CACHE", str(tmp_path / "quantized"))
    model, tok = tiny_model(arch), byte_tokenizer()
    mode = check_mode("int8")
    names = quantizable_linears(model, mode)
    quantize_model(model, mode)
    layers = {name: model.get_submodule(name) for name in names}
    floats = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in names)}

    def files(folder):
        model.config.save_pretrained(folder)
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
        tok.save_pretrained(folder)

    write_cache("tiny-key", mode.name, layers, floats=floats, files=files)
    return model, cache_paths("tiny-key", mode.name)[0].parent, "tiny-key"


def test_a_whole_model_cache_reads_back_the_same_model(tmp_path, monkeypatch):
    model, folder, key = _cached_tiny(tmp_path, monkeypatch)
    loaded = _load(folder, check_mode("int8"), key)
    assert loaded is not None
    again, tok = loaded
    ours, theirs = again.state_dict(), model.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    # tiny_model runs eager attention, a model built from its saved config the default kernel: equal to float noise
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert not again.training and tok.decode(tok("abc").input_ids, skip_special_tokens=True) == "abc"


def test_a_bf16_mode_reads_the_whole_model_cache_of_its_weights(tmp_path, monkeypatch):
    import autopatch.kernels as kernels

    monkeypatch.setattr(kernels, "fast_bfloat16", lambda: True)
    model, folder, key = _cached_tiny(tmp_path, monkeypatch)  # written as int8
    loaded = _load(folder, check_mode("int8-bf16"), key)
    assert loaded is not None
    ours, theirs = loaded[0].state_dict(), model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_tampered_whole_model_cache_is_refused_and_removed(tmp_path, monkeypatch):
    _, folder, key = _cached_tiny(tmp_path, monkeypatch)
    weights = folder / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert _load(folder, check_mode("int8"), key) is None  # its checksum fails: rebuilt by the caller, never used
    assert not folder.exists()
    assert _load(folder, check_mode("int8"), key) is None  # absent: the caller builds it


def test_a_cache_of_layers_only_is_not_taken_for_a_whole_model(tmp_path, monkeypatch):
    model, folder, key = _cached_tiny(tmp_path, monkeypatch)
    mode = check_mode("int8")
    names = quantizable_linears(tiny_model("qwen2"), mode)
    write_cache("layers-only", mode.name, {n: model.get_submodule(n) for n in names},
                files=lambda f: model.config.save_pretrained(f))
    assert _load(cache_paths("layers-only", mode.name)[0].parent, mode, "layers-only") is None


def test_writing_a_cache_removes_the_same_models_caches_in_older_formats_only(tmp_path, monkeypatch):
    from autopatch.quantize_cache import CACHE_FORMAT

    root = tmp_path / "quantized"
    kept = [root / f"tiny-key-int8-v{CACHE_FORMAT + 1}", root / "tiny-key-int4-v1", root / "other-key-int8-v1",
            root / "tiny-key-int8-dynamic-v1"]
    stale = [root / f"tiny-key-int8-v{version}" for version in range(1, CACHE_FORMAT)]
    for folder in kept + stale:
        folder.mkdir(parents=True)
        (folder / "weights.safetensors").write_bytes(b"old")
    _, folder, _ = _cached_tiny(tmp_path, monkeypatch)
    assert folder.is_dir() and folder.name == f"tiny-key-int8-v{CACHE_FORMAT}"
    assert all(f.is_dir() for f in kept) and not any(f.exists() for f in stale)


def test_reading_back_the_cache_this_process_just_wrote_does_not_hash_it_again(tmp_path, monkeypatch):
    import autopatch.quantize_cache as quantize_cache

    hashed = []
    real = quantize_cache.sha256_of
    monkeypatch.setattr(quantize_cache, "sha256_of", lambda path: hashed.append(path.name) or real(path))
    _, folder, key = _cached_tiny(tmp_path, monkeypatch)
    assert hashed == ["weights.safetensors"]  # once, to write the manifest
    assert _load(folder, check_mode("int8"), key) is not None and len(hashed) == 1  # the first load: not again
    monkeypatch.setattr(quantize_cache, "_written", {})  # another process: it checks the file itself
    assert _load(folder, check_mode("int8"), key) is not None and len(hashed) == 2
