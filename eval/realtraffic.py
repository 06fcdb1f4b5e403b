"""Real-traffic datasets: what a chat endpoint sees besides two-hop questions, and two-hop questions by hand.

Example:
    >>> from eval.datasets import load_dataset_by_name
    >>> harm = load_dataset_by_name("harm", split="test")          # chat requests and single-hop questions
    >>> {r.meta["kind"] for r in harm} >= {"code", "chat", "single-hop"}
    True
    >>> hand = load_dataset_by_name("handwritten", split="calib")  # compositional, in forms the generator lacks

* ``harm`` (do no harm): the hand-written requests of ``data/harm_prompts.jsonl``
  (instructions, code, chat, multi-turn conversations, arithmetic, summaries,
  translation: sent as chat ``messages``, rendered as a chat endpoint renders
  them; single-hop questions whose noun phrases carry relative clauses
  (``relative``): asked in the run's query format, with golds), plus
  ``single-hop``: the human-written first sub-questions of MuSiQue-Ans 2-hop
  records, with their golds. A single-hop question takes the split of the
  MuSiQue record it comes from, so none leaks into the other split's 2-hop
  questions.
* ``handwritten``: ``data/handwritten_twohop.jsonl``, compositional questions
  written by hand (superlatives, possessives, nested phrases, dates and
  numbers as bridges), with gold decompositions in MuSiQue's schema.

Both split calib/test by MuSiQue's id-hash rule. Provenance and licence:
``data/REALTRAFFIC.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

from eval.dataset_registry import DatasetSpec, register_dataset
from eval.datasets import (
    MUSIQUE_SPLITS,
    Selection,
    check_split,
    filter_records,
    load_jsonl,
    load_musique,
    musique_split,
)
from eval.records import DatasetError, DecompStep, QARecord

DATA = Path(__file__).resolve().parent / "data"
HARM_FILE = DATA / "harm_prompts.jsonl"
HANDWRITTEN_FILE = DATA / "handwritten_twohop.jsonl"
SINGLE_HOP_PER_SPLIT = 80
QA_KINDS = ("relative",)  # questions asked in the run's query format (so EM means what it means on two-hop sets)


def _load_kept(path: Path) -> list[QARecord]:
    if not path.is_file():
        raise DatasetError(f"the bundled file {path} is missing (a broken install?); reinstall autopatch")
    return load_jsonl(path)


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def harm_records() -> list[QARecord]:
    """The do-no-harm set, both splits (``meta``: ``split``, ``kind``, ``source``)."""
    out = []
    for rec in _load_kept(HARM_FILE):
        kind = str(rec.meta.get("kind") or "")
        if not kind:
            raise DatasetError(f"{HARM_FILE.name}: record {rec.id!r} has no meta.kind")
        messages = None if kind in QA_KINDS else rec.messages
        out.append(dataclasses.replace(rec, messages=messages,
                                       meta={**rec.meta, "split": musique_split(rec.id), "source": "harm_prompts"}))
    seen: set[str] = set()
    singles: dict[str, list[QARecord]] = {"calib": [], "test": []}
    for rec in sorted(load_musique(hops=2), key=lambda r: _hash(r.id)):
        step = rec.question_decomposition[0]
        text = step.question.strip()
        if step.is_relation or text.lower() in seen or not step.answer.strip():
            continue  # "Entity >> relation" steps are not questions a person asks
        split = musique_split(rec.id)
        if len(singles[split]) >= SINGLE_HOP_PER_SPLIT:
            continue
        seen.add(text.lower())
        singles[split].append(QARecord(
            id=f"{rec.id}#1", question=text, question_decomposition=(DecompStep(text, step.answer, step.id),),
            answer=step.answer, meta={"split": split, "kind": "single-hop", "source": "musique", "parent": rec.id}))
    return out + singles["calib"] + singles["test"]


def handwritten_records() -> list[QARecord]:
    """The hand-written two-hop questions, both splits (``meta``: ``split``, ``kind`` = the question's form)."""
    return [dataclasses.replace(r, meta={**r.meta, "split": musique_split(r.id), "kind": r.meta.get("form"),
                                          "source": "handwritten"})
            for r in _load_kept(HANDWRITTEN_FILE)]


def _selector(name: str, records: Callable[[], list[QARecord]]):
    def select(split: str | None, hops: int | None) -> tuple[list[QARecord], Selection]:
        check_split(split, MUSIQUE_SPLITS, name)
        return filter_records(records(), name, split, hops, split_rule="the MuSiQue id-hash rule")
    return select


register_dataset(DatasetSpec("harm", "do-no-harm requests", _selector("harm", harm_records), default_hops=0))
register_dataset(DatasetSpec("handwritten", "hand-written two-hop", _selector("handwritten", handwritten_records)))
