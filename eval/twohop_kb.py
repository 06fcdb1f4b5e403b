"""The two-hop knowledge base: loading ``twohop_kb.json``, gold answers, and the subject split.

Example:
    >>> from eval.twohop_kb import load_kb, subject_split
    >>> kb = load_kb()
    >>> sorted(kb)[:3]                                               # doctest: +SKIP
    ['companies', 'continents', 'countries']
    >>> subject_split("landmark:colosseum") in ("train", "dev", "test")
    True

Part of :mod:`eval.twohop` (which re-exports the public names); the templates
live in :mod:`eval.twohop_templates`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from eval.records import DatasetError

__all__ = ["SPLITS", "KB_PATH", "Entity", "Answer", "load_kb", "subject_split"]

SPLITS = ("train", "dev", "test")
KB_PATH = Path(__file__).resolve().parent / "data" / "twohop_kb.json"

Entity = Mapping[str, Any]


@dataclass(frozen=True)
class Answer:
    """A gold answer: the canonical string and its accepted aliases."""

    text: str
    aliases: tuple[str, ...] = ()


# --------------------------------------------------------------------------- KB


@lru_cache(maxsize=4)
def _load_kb_cached(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the twohop knowledge base ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{Path(path).name} line {err.lineno}: invalid JSON ({err.msg})") from None


def load_kb(path: str | Path | None = None) -> dict[str, Any]:
    """``kb = load_kb()``: the parsed ``twohop_kb.json`` (cached; treat it as read-only)."""
    return _load_kb_cached(str(path or KB_PATH))


def _sha_int(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def subject_split(subject_key: str) -> str:
    """``subject_split("landmark:colosseum") in SPLITS``: 60/20/20 by sha256 of the subject key."""
    bucket = _sha_int(subject_key) % 100
    return "train" if bucket < 60 else "dev" if bucket < 80 else "test"


def _dedup(items: Iterator[str] | list[str] | tuple[str, ...], exclude: str = "") -> tuple[str, ...]:
    return tuple(x for x in dict.fromkeys(items) if x and x != exclude)


def _country_answer(country: Entity) -> Answer:
    return Answer(country["name"], _dedup(country.get("aliases", []), country["name"]))


def _index(items: list[Entity]) -> dict[str, Entity]:
    return {e["id"]: e for e in items}


def _country_bridge(country: Entity, region: str | None) -> Answer:
    base = _country_answer(country)
    return Answer(base.text, _dedup([*base.aliases, *([region] if region else [])], base.text))
