"""Locate the first hop inside a two-hop question (pure text, no model).

Example:
    >>> from autopatch.locate import locate
    >>> loc = locate("What is the capital of the country where the Colosseum is located?")
    >>> loc.span, loc.subject, loc.second_hop
    ('the country where the Colosseum is located', 'Colosseum', 'What is the capital of ___?')
    >>> loc.fill("Italy")
    'What is the capital of Italy?'
    >>> steps = [{"question": "Green >> performer"}, {"question": "Who is the spouse of #1?"}]
    >>> loc = locate("Who is the spouse of the Green performer?", steps)
    >>> loc.span, loc.subject, loc.relation, loc.method
    ('the Green performer', 'Green', 'performer', 'decomposition')

A two-hop question names its "bridge" entity only through a phrase (the
*span*) built around a *subject*; replacing the span by :data:`SLOT` gives the
*second-hop* question. :func:`locate_from_decomposition` aligns step 2 of a
MuSiQue-style decomposition (``#1``) against the question;
:func:`locate_from_text` is a rule-based parser (possessive, entity_role,
r_of_e, r_prep_e, relative, reduced_relative, zero_relative,
headless_relative). :func:`locate` tries the decomposition first, then the
parser. All raise :class:`UnlocatableQuestion` rather than guess (also for
one-hop questions), and :func:`locate` also for first hops that are not the
model's to answer (the user's own facts, context the request does not hold,
long-form requests: ``reach``). ``python -m eval.locator_coverage`` measures both.

Modules, bottom up: ``lexicon`` (word lists, verb forms), ``tokens``
(tokenizer, word classes, names), ``location`` (:class:`Location`, errors),
``phrases`` (noun/verb groups, span ends), ``rules`` (parser candidates,
:func:`locate_from_text`), ``align`` (decomposition alignment), ``reach`` (what is left alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autopatch.locate.align import decomposition_route, locate_from_decomposition
from autopatch.locate.location import (
    SLOT,
    SUPPORTED_SHAPES,
    Location,
    UnlocatableQuestion,
)
from autopatch.locate.reach import check_reach
from autopatch.locate.rules import locate_from_text

__all__ = [
    "SLOT",
    "SUPPORTED_SHAPES",
    "Location",
    "UnlocatableQuestion",
    "decomposition_route",
    "locate",
    "locate_from_decomposition",
    "locate_from_text",
]


MAX_QUESTION_CHARS = 1000  # longer "questions" are left alone: no two-hop question is this long, and parse time grows


def locate(question: str, decomposition: Sequence[Any] | None = None) -> Location:
    """Decomposition first when given, else (or when it fails) the text parser.

    Questions over :data:`MAX_QUESTION_CHARS` characters are refused at once (``UnlocatableQuestion``), so a
    huge prompt never holds the worker in the parser; the row is then answered unpatched, with the reason.
    """
    if len(question) > MAX_QUESTION_CHARS:
        raise UnlocatableQuestion(question[:80] + "...", f"the question is {len(question)} characters, over the "
                                  f"{MAX_QUESTION_CHARS} the locator reads; left unpatched")
    if decomposition:
        try:
            return check_reach(locate_from_decomposition(question, decomposition))
        except UnlocatableQuestion as first:
            try:
                return check_reach(locate_from_text(question))
            except UnlocatableQuestion as second:
                raise UnlocatableQuestion(question, f"{first.why}; and the text parser: {second.why}") from None
    return check_reach(locate_from_text(question))
