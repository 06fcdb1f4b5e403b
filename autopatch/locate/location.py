"""The result type of the locator, its error, and the slot marker.

:class:`Location` holds character offsets into the question; :class:`UnlocatableQuestion`
is raised (never a guess) when no first-hop span can be found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from autopatch.errors import AutopatchError, InputError, PatchError

if TYPE_CHECKING:
    from autopatch.locate.tokens import Tok

SLOT = "___"

SUPPORTED_SHAPES = (
    "supported two-hop shapes: possessive (\"the Eiffel Tower's country\"), "
    "entity + role noun (\"the Green performer\"), \"the R of E\" "
    "(\"the author of Hamlet\"), \"the R from/in/on E\" (\"the actor from Terminator\"), "
    "relative clause (\"the country where the Colosseum is located\", "
    "\"the company that makes the iPhone\", \"the country whose capital is Lima\"), "
    "reduced relative (\"the university related to E\", \"the county containing E\"), "
    "zero relative (\"the team E plays for\"); or pass a decomposition "
    "[\"E >> relation\" or a question, a step-2 question using #1]"
)


class UnlocatableQuestion(AutopatchError, ValueError):
    """No first-hop span could be found; the message says why and what is supported."""

    def __init__(self, question: str, why: str) -> None:
        super().__init__(f"cannot locate the first hop in {question!r}: {why}; {SUPPORTED_SHAPES}")
        self.question = question
        self.why = why


@dataclass(frozen=True)
class Location:
    """Where the first hop sits in a question; offsets are character offsets, end exclusive."""

    question: str
    span: str
    span_start: int
    span_end: int
    subject: str
    subject_start: int
    subject_end: int
    second_hop: str
    relation: str | None
    method: str

    def __post_init__(self) -> None:
        q = self.question
        if q[self.span_start : self.span_end] != self.span:
            raise PatchError(f"span offsets {self.span_start}:{self.span_end} do not give {self.span!r}")
        if q[self.subject_start : self.subject_end] != self.subject:
            raise PatchError(f"subject offsets do not give {self.subject!r}")
        if not (self.span_start <= self.subject_start < self.subject_end <= self.span_end):
            raise PatchError(f"subject {self.subject!r} is not inside span {self.span!r}")
        if self.second_hop.count(SLOT) != 1:
            raise PatchError(f"second_hop must contain {SLOT!r} exactly once: {self.second_hop!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Location:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def fill(self, bridge: str) -> str:
        """The second-hop question with the slot replaced by ``bridge``."""
        return self.second_hop.replace(SLOT, bridge, 1)

    def first_hop(self, subject: str = SLOT) -> str:
        """The first-hop span asked as a question, ``subject`` where its subject was: "What is the country where
        ___ is located?" (the slot, for a patch) or, with ``loc.subject``, the question in words (``decompose``)."""
        q = self.question
        return f"What is {q[self.span_start:self.subject_start]}{subject}{q[self.subject_end:self.span_end]}?"


def check_question(question: Any) -> None:
    if not isinstance(question, str):
        raise InputError(f"question must be a string, got {type(question).__name__}")


def make_location(
    question: str,
    toks: Sequence[Tok],
    start: int,
    end: int,
    subj: tuple[int, int],
    second_hop: str | None,
    relation: str | None,
    method: str,
) -> Location:
    s0, s1 = toks[start].start, toks[end - 1].end
    b0, b1 = toks[subj[0]].start, toks[subj[1] - 1].end
    if second_hop is None:
        second_hop = question[:s0] + SLOT + question[s1:]
        if s0 == 0 and question[s1:].strip():
            second_hop = SLOT + question[s1:]
    return Location(
        question=question,
        span=question[s0:s1],
        span_start=s0,
        span_end=s1,
        subject=question[b0:b1],
        subject_start=b0,
        subject_end=b1,
        second_hop=second_hop,
        relation=relation,
        method=method,
    )
