"""The record types of every dataset (MuSiQue-Ans schema) and their strict parser.

Example:
    >>> from eval.records import QARecord
    >>> rec = QARecord.from_dict({"id": "q1", "question": "What is the capital of the country where the Colosseum is?",
    ...                           "question_decomposition": [{"question": "Where is the Colosseum?", "answer": "Italy"},
    ...                                                      {"question": "What is the capital of #1?", "answer": "Rome"}],
    ...                           "answer": "Rome"})
    >>> rec.hops, rec.golds
    (2, ('Rome',))

:mod:`eval.datasets` (the loaders) and :mod:`eval.twohop` (the generator)
both build on these types; ``eval.datasets`` re-exports them, so
``from eval.datasets import QARecord`` keeps working.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autopatch.errors import AutopatchError

__all__ = ["DatasetError", "DecompStep", "QARecord"]


class DatasetError(AutopatchError, ValueError):
    """A dataset cannot be found, loaded or parsed; the message says where and why.

    Example: ``DatasetError("musique.jsonl line 17: field 'answer' must be a string, got int")``.
    """


@dataclass(frozen=True)
class DecompStep:
    """``DecompStep("What is the capital of #1?", "Rome")``: one single-hop step of a decomposition."""

    question: str
    answer: str
    id: int | str | None = None
    paragraph_support_idx: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``step.to_dict() == {"id": None, "question": ..., "answer": ..., "paragraph_support_idx": None}``."""
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "paragraph_support_idx": self.paragraph_support_idx,
        }

    @property
    def is_relation(self) -> bool:
        """A MuSiQue ``"Entity >> relation"`` step: a lookup, not a question a person asks."""
        return ">>" in self.question

    def as_question(self) -> str:
        """The step as a question: ``"Green >> performer"`` -> ``"What is the performer of Green?"``; a question
        step as written."""
        if not self.is_relation:
            return self.question
        entity, relation = (part.strip() for part in self.question.split(">>", 1))
        return f"What is the {relation} of {entity}?"

    def filled(self, bridge: str) -> DecompStep:
        """This step with the previous step's answer in place of ``#1``."""
        return dataclasses.replace(self, question=self.question.replace("#1", bridge))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "step") -> DecompStep:
        """``DecompStep.from_dict({"question": "Green >> performer", "answer": "Steve Hillage"})``."""
        return _parse_step(obj, where)


@dataclass(frozen=True)
class QARecord:
    """``rec = QARecord.from_dict(json_obj)``; ``rec.golds``, ``rec.hops``, ``rec.to_dict()``.

    ``meta`` carries extra information (split, relation chain, subject,
    spans); it is excluded from hashing so records stay hashable.
    """

    id: str
    question: str
    question_decomposition: tuple[DecompStep, ...]
    answer: str
    answer_aliases: tuple[str, ...] = ()
    answerable: bool = True
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    # A chat request as a client sends it (``{"role", "content"}`` turns ending with the user's); ``question`` is then
    # its last user turn. ``None``: the question alone, rendered in the run's query format.
    messages: tuple[Mapping[str, str], ...] | None = field(default=None, hash=False)

    @property
    def hops(self) -> int:
        """``rec.hops == len(rec.question_decomposition)``."""
        return len(self.question_decomposition)

    @property
    def golds(self) -> tuple[str, ...]:
        """``rec.golds == ("Rome", "Roma")``: the answer then its aliases, deduplicated, in order."""
        return tuple(dict.fromkeys(g for g in (self.answer, *self.answer_aliases) if g))

    def to_dict(self) -> dict[str, Any]:
        """``QARecord.from_dict(rec.to_dict()) == rec``; ``meta`` is written only when non-empty."""
        out: dict[str, Any] = {
            "id": self.id,
            "question": self.question,
            "question_decomposition": [s.to_dict() for s in self.question_decomposition],
            "answer": self.answer,
            "answer_aliases": list(self.answer_aliases),
            "answerable": self.answerable,
        }
        if self.meta:
            out["meta"] = dict(self.meta)
        if self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "record") -> QARecord:
        """``QARecord.from_dict(json.loads(line), where="dev.jsonl line 3")``; raises :class:`DatasetError`."""
        return _parse_record(obj, where)


# --------------------------------------------------------------------------- parsing


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need_str(obj: Mapping[str, Any], key: str, where: str, *, non_empty: bool = False) -> str:
    if key not in obj:
        raise DatasetError(f"{where}: missing required field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{key}' must be a string, got {_type_name(value)}")
    if non_empty and not value.strip():
        raise DatasetError(f"{where}: field '{key}' must be a non-empty string")
    return value


def _parse_step(obj: Any, where: str) -> DecompStep:
    if not isinstance(obj, Mapping):
        raise DatasetError(f"{where}: must be an object, got {_type_name(obj)}")
    question = _need_str(obj, "question", where, non_empty=True)
    answer = _need_str(obj, "answer", where)
    step_id = obj.get("id")
    if step_id is not None and not (_is_int(step_id) or isinstance(step_id, str)):
        raise DatasetError(f"{where}: field 'id' must be an int, a string or null, got {_type_name(step_id)}")
    support = obj.get("paragraph_support_idx")
    if support is not None and not _is_int(support):
        raise DatasetError(
            f"{where}: field 'paragraph_support_idx' must be an int or null, got {_type_name(support)}"
        )
    return DecompStep(question=question, answer=answer, id=step_id, paragraph_support_idx=support)


def _parse_record(obj: Any, where: str) -> QARecord:
    if not isinstance(obj, Mapping):
        raise DatasetError(f"{where}: a record must be a JSON object, got {_type_name(obj)}")
    rec_id = _need_str(obj, "id", where, non_empty=True)
    question = _need_str(obj, "question", where, non_empty=True)
    answer = _need_str(obj, "answer", where)

    messages = _parse_messages(obj["messages"], where) if obj.get("messages") is not None else None
    if "question_decomposition" not in obj and messages is None:
        raise DatasetError(f"{where}: missing required field 'question_decomposition'")
    decomp = obj.get("question_decomposition", [])
    if not isinstance(decomp, list):
        raise DatasetError(
            f"{where}: field 'question_decomposition' must be a list, got {_type_name(decomp)}"
        )
    if not decomp and messages is None:  # a chat request (messages) need not be a composed question
        raise DatasetError(f"{where}: field 'question_decomposition' must be a non-empty list")
    steps = tuple(_parse_step(s, f"{where}: field 'question_decomposition'[{i}]") for i, s in enumerate(decomp))

    aliases = obj.get("answer_aliases", [])
    if aliases is None:
        aliases = []
    if not isinstance(aliases, list):
        raise DatasetError(f"{where}: field 'answer_aliases' must be a list of strings, got {_type_name(aliases)}")
    for i, alias in enumerate(aliases):
        if not isinstance(alias, str):
            raise DatasetError(
                f"{where}: field 'answer_aliases'[{i}] must be a string, got {_type_name(alias)}"
            )

    answerable = obj.get("answerable", True)
    if not isinstance(answerable, bool):
        raise DatasetError(f"{where}: field 'answerable' must be a boolean, got {_type_name(answerable)}")
    if answerable and not answer.strip():
        raise DatasetError(f"{where}: field 'answer' must be non-empty for an answerable record")

    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise DatasetError(f"{where}: field 'meta' must be an object, got {_type_name(meta)}")

    return QARecord(
        id=rec_id,
        question=question,
        question_decomposition=steps,
        answer=answer,
        answer_aliases=tuple(aliases),
        answerable=answerable,
        meta=dict(meta),
        messages=messages,
    )


_ROLES = ("system", "developer", "user", "assistant")


def _parse_messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    """Chat turns: a non-empty list of ``{"role", "content"}`` with text content, ending with a user turn."""
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: field 'messages' must be a non-empty list of turns, got {_type_name(value)}")
    turns = []
    for i, turn in enumerate(value):
        at = f"{where}: field 'messages'[{i}]"
        if not isinstance(turn, Mapping):
            raise DatasetError(f"{at}: must be an object, got {_type_name(turn)}")
        role = _need_str(turn, "role", at)
        if role not in _ROLES:
            raise DatasetError(f"{at}: field 'role' is {role!r}; use one of {', '.join(_ROLES)}")
        turns.append({"role": role, "content": _need_str(turn, "content", at)})
    if turns[-1]["role"] != "user":
        raise DatasetError(f"{where}: field 'messages' must end with a 'user' turn (the request answered), "
                           f"not {turns[-1]['role']!r}")
    return tuple(turns)
