"""Candidate rules for the text parser, and :func:`locate_from_text`.

Each rule proposes a :class:`_Cand` (a token span around a subject); :func:`_choose`
keeps the outermost one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autopatch.locate.lexicon import (
    _AGENT_NOUNS,
    _ATTRIBUTE_NOUNS,
    _AUX,
    _BASE_VERBS,
    _DETS,
    _DO,
    _EMPTY_WORDS,
    _HEADLESS,
    _IRREGULAR_PARTS,
    _KIN_NOUNS,
    _OF_COMPOUNDS,
    _PREPS,
    _REL,
    _ROLE_NOUNS,
    _TIME_NOUNS,
    _WH,
)
from autopatch.locate.location import (
    Location,
    UnlocatableQuestion,
    _check_question,
    _make_location,
)
from autopatch.locate.phrases import (
    _clause_subject,
    _finite_verb_at,
    _frame,
    _group_head,
    _group_text,
    _head_group,
    _is_noun_like,
    _np_start,
    _opens_np,
    _plain_words,
    _role_verb_before,
    _span_end,
    _wh_before,
)
from autopatch.locate.tokens import (
    _anchor_bounds,
    _entity_runs,
    _is_cap,
    _is_function,
    _is_participle,
    _is_verb,
    _is_word,
    _question_end,
    _Tok,
    _tokenize,
)


@dataclass(frozen=True)
class _Cand:
    """A candidate span: tokens [start, end) around the subject tokens ``subj``."""

    start: int  # token indices, end exclusive
    end: int
    subj: tuple[int, int]
    head: str | None
    rule: str
    rank: int  # lower wins among candidates that are not nested


@dataclass(frozen=True)
class NameSpan:
    """A name in the question and the token positions that the name rules build on.

    Every position is an index into ``toks``; ranges are end exclusive.

    * ``question_end``: end of the question proper, before a trailing "?", "." or
      "!"; the rules read no further.
    * ``name_start``, ``name_end``: the name itself (an entity run, quotes
      excluded); it becomes the subject of a candidate.
    * ``quoted_start``, ``quoted_end``: the name with its surrounding quotes when
      it is quoted (``"Hamlet"``), else the same as ``name_start``/``name_end``.
    * ``phrase_start``: where a phrase built on the name begins: the determiner
      right before ``quoted_start`` ("[the] Green performer"), else ``quoted_start``.
    """

    toks: Sequence[_Tok]
    question_end: int
    name_start: int
    name_end: int
    quoted_start: int
    quoted_end: int
    phrase_start: int

    @classmethod
    def around(cls, toks: Sequence[_Tok], question_end: int, name_start: int, name_end: int) -> NameSpan:
        """The positions around the name at tokens [name_start, name_end)."""
        quoted_start, quoted_end = _anchor_bounds(toks, name_start, name_end)
        phrase_start = quoted_start - 1 if quoted_start > 0 and toks[quoted_start - 1].low in _DETS else quoted_start
        return cls(toks, question_end, name_start, name_end, quoted_start, quoted_end, phrase_start)

    @property
    def name(self) -> tuple[int, int]:
        return self.name_start, self.name_end


def _name_candidates(toks: Sequence[_Tok], n: int, a: int, b: int) -> list[_Cand]:
    """Candidates built tightly around the name at tokens [a, b) (first matching shape wins)."""
    span = NameSpan.around(toks, n, a, b)
    for rule in (_possessive, _entity_role, _relation_prep_name):
        cand = rule(span)
        if cand is not None:
            return [cand]
    return []


def _possessive(span: NameSpan) -> _Cand | None:
    """"[the] E's N", "E' N", "[the] E album's band"."""
    toks, n = span.toks, span.question_end
    j = span.quoted_end
    while j < n and j - span.quoted_end < 2 and _is_word(toks[j]) and not _is_function(toks[j]) and not _is_cap(toks[j]):
        j += 1
    if not (j < n and (toks[j].low == "'s" or (toks[j].low == "'" and toks[j - 1].low.endswith("s")))):
        return None
    head_end = min(_head_group(toks, j + 1, n), max(j + 2, _span_end(toks, span.phrase_start, j + 1, own_verb=False)))
    if head_end > j + 1 and _group_head(toks, j + 1, head_end) not in _ATTRIBUTE_NOUNS:
        return _Cand(span.phrase_start, head_end, span.name, _group_text(toks, j + 1, head_end), "possessive", 1)
    return None


def _entity_role(span: NameSpan) -> _Cand | None:
    """"the Green performer", "The Unwinding author": a name modifying an agent or kin noun."""
    toks, before = span.toks, span.quoted_start - 1
    head_end = _head_group(toks, span.quoted_end, span.question_end)
    # a role noun after the name, and the name opens a noun phrase (determiner, start, or after a function word/verb)
    if (
        head_end > span.quoted_end
        and toks[head_end - 1].low in _AGENT_NOUNS | _KIN_NOUNS
        and (
            span.phrase_start < span.quoted_start
            or span.quoted_start == 0
            or toks[before].low in _PREPS | _AUX | _WH
            or _is_verb(toks[before])
        )
    ):
        return _Cand(span.phrase_start, head_end, span.name, toks[head_end - 1].low, "entity_role", 1)
    return None


def _relation_prep_name(span: NameSpan) -> _Cand | None:
    """"the R of E" (any noun R) and "the R from/in/on/with E" (a role noun R), also with a
    type noun before the name: "the maker of the card game Uno"."""
    toks, n = span.toks, span.question_end
    qa, qb = span.quoted_start, span.quoted_end
    phrase_start = span.phrase_start
    k = qa
    while k > 0 and qa - k < 4 and _is_word(toks[k - 1]) and not _is_cap(toks[k - 1]) and not _is_function(toks[k - 1]) and (
        not _is_verb(toks[k - 1]) or toks[k - 1].low.endswith("ing")  # "the messaging app WeChat"
    ):
        k -= 1
    # (not before a finite verb: "the organization Julio Maglione is ..." is a zero relative)
    finite_after = qb < n and _is_verb(toks[qb]) and toks[qb].low not in _BASE_VERBS
    if k < qa and k > 0 and toks[k - 1].low in _DETS and not finite_after:
        phrase_start = k - 1
    if not (phrase_start >= 2 and toks[phrase_start - 1].low in _PREPS):
        return None
    prep = toks[phrase_start - 1].low
    head = phrase_start - 2
    tok = toks[head]
    compound = head >= 2 and f"{toks[head - 2].low} of {tok.low}" in _OF_COMPOUNDS  # "country of origin"
    if not _is_noun_like(toks, head) or (tok.low in _ATTRIBUTE_NOUNS and not compound):
        return None
    if prep == "of":
        rule = "r_of_e"
    elif tok.low in _ROLE_NOUNS and prep in {"from", "in", "on", "for", "at", "with", "behind", "by"}:
        rule = "r_prep_e"
    else:
        return None
    start = _np_start(toks, head)
    if start is None or (toks[start].low not in _DETS and start > 0 and not _opens_np(toks[start - 1])):
        return None
    if rule == "r_prep_e" and prep in {"in", "on"} and _role_verb_before(toks, start):
        return None  # "Who played [the X singer] in Walk the Line?": the work belongs to "played"
    end = qb
    subj_end = span.name_end
    full = _span_end(toks, start, qb, own_verb=False)
    # "the performer of Je dis aime", "the operator of the Jurmo class landing craft":
    # plain words up to the outer predicate still belong to the name
    tail = toks[qb:full]
    if 0 < len(tail) <= 5 and all(_is_word(t) and not _is_function(t) for t in tail) and not _is_verb(tail[-1]):
        end = subj_end = full
    # "the country with Paris as its capital"
    if end + 2 <= n and toks[end].low == "as":
        m = end + 1 + (toks[end + 1].low in _DETS)
        if m < n and _is_noun_like(toks, m) and (m + 1 == n or _is_function(toks[m + 1])):
            end = m + 1
    relation = f"{toks[head - 2].low} of {tok.low}" if compound else tok.low
    return _Cand(start, end, (span.name_start, subj_end), relation, rule, 2)


def _clause_candidates(toks: Sequence[_Tok], n: int, runs: Sequence[tuple[int, int]]) -> list[_Cand]:
    """Noun + clause: relative ("the country where ..."), reduced ("the county containing ..."),
    zero relative ("the league the Carolina Hurricanes belong to") and headless ("where X is employed")."""
    cands: list[_Cand] = []
    for i in range(1, n):
        tok = toks[i]
        prev = toks[i - 1]
        prev_is_verb = _is_verb(prev) and prev.low not in _AUX and not _is_noun_like(toks, i - 1)
        if tok.low in _HEADLESS and (prev.low in _PREPS or prev_is_verb) and _wh_before(toks, i - 1):
            # "How many students attend [where X is employed]?"
            end = _span_end(toks, i, i + 1, own_verb=True)
            if end > i + 1:
                subj = _clause_subject(toks, i + 1, end, runs)
                if subj:
                    cands.append(_Cand(i, end, subj, None, "headless_relative", 4))
            continue
        if not _is_noun_like(toks, i - 1) or prev.low in _ATTRIBUTE_NOUNS:
            continue
        head = i - 1
        start = _np_start(toks, head)
        if start is None or not (toks[start].low in _DETS or start == 0 or _opens_np(toks[start - 1])):
            continue
        rule = None
        inner = i
        if tok.low in _REL and (tok.low != "when" or toks[head].low in _TIME_NOUNS):
            rule = "relative"  # "when" only after a time noun: "the war when ..."
        elif tok.low in _PREPS and i + 1 < n and toks[i + 1].low in {"which", "whom", "whose"}:
            rule = "relative"  # "the place in which ...", "the person after whom ..."
        elif _is_verb(tok) and tok.low not in _AUX and (tok.low.endswith(("ing", "ed")) or tok.low in _IRREGULAR_PARTS):
            # "musical notation used in ..." without a determiner is usually a verb phrase
            if i + 1 < n and (toks[i + 1].low in _PREPS | _DETS or _is_cap(toks[i + 1])) and (
                toks[start].low in _DETS or start == 0
            ):
                rule = "reduced_relative"
        elif (_is_cap(tok) or tok.low in _DETS) and toks[start].low in _DETS:
            # zero relative: "the organization [Julio Maglione is a member of]"
            run = next((r for r in runs if r[0] == i or (tok.low in _DETS and r[0] == i + 1)), None)
            # "the film UHF located" is a name plus the outer participle, not a clause
            # after do-support a bare verb is the outer one ("did [the movie X] win ...")
            if run and run[1] < n and _finite_verb_at(toks, run[1]) and not (
                (run[1] + 1 >= n and _is_participle(toks[run[1]]))
                or (toks[run[1]].low in _BASE_VERBS and _frame(toks, start) == "do")
            ):
                rule = "zero_relative"
        if rule is None:
            continue
        end = _span_end(toks, start, inner, own_verb=True)
        if end <= inner + 1:
            continue
        subj = _clause_subject(toks, inner, end, runs)
        if subj is None:
            continue
        cands.append(_Cand(start, end, subj, toks[head].low, rule, 3))
    return cands


def _common_noun_candidates(toks: Sequence[_Tok], n: int) -> list[_Cand]:
    """Subjects that are not names: "sushi's country of origin", "the country of origin of sashimi"."""
    cands: list[_Cand] = []
    start: int | None
    for j in range(1, n - 1):
        if toks[j].low == "'s":
            # possessor: up to three plain words, then a boundary
            a = j
            while a > 0 and j - a < 3 and _plain_words(toks, a - 1, a):
                a -= 1
            if a == j or (a > 0 and not (_opens_np(toks[a - 1]) or toks[a - 1].low in _DETS)):
                continue
            head_end = _head_group(toks, j + 1, n)
            if head_end > j + 1 and toks[j + 1].low in _ROLE_NOUNS and toks[j + 1].low not in _ATTRIBUTE_NOUNS:
                start = a - 1 if a > 0 and toks[a - 1].low in _DETS else a
                head_end = min(head_end, max(j + 2, _span_end(toks, start, j + 1, own_verb=False)))
                cands.append(_Cand(start, head_end, (a, j), _group_text(toks, j + 1, head_end), "possessive", 1))
        elif toks[j].low == "of" and j >= 1:
            head = j - 1
            compound = j >= 3 and f"{toks[j - 3].low} of {toks[j - 1].low}" in _OF_COMPOUNDS
            if not (toks[head].low in _ROLE_NOUNS or compound) or not _is_noun_like(toks, head):
                continue
            start = _np_start(toks, head)
            if start is None or toks[start].low not in _DETS:
                continue
            a = j + 1
            if a < n and toks[a].low in _DETS:
                a += 1
            end = _span_end(toks, start, a, own_verb=False)
            if end - a <= 4 and _plain_words(toks, a, end):
                relation = f"{toks[j - 3].low} of {toks[head].low}" if compound else toks[head].low
                cands.append(_Cand(start, end, (a, end), relation, "r_of_e", 2))
    return cands


def _candidates(toks: Sequence[_Tok], keep_trivial: bool = False) -> list[_Cand]:
    n = _question_end(toks)
    runs = [(a, b) for a, b in _entity_runs(toks) if b <= n]
    # "What date did the creator of The Blind Girl Die?": a capitalised final verb
    # after do-support is not part of the title
    if (
        runs
        and runs[-1][1] == n
        and runs[-1][1] - runs[-1][0] > 1
        and toks[n - 1].low in _BASE_VERBS
        and any(t.low in _DO for t in toks[: runs[-1][0]])
    ):
        runs[-1] = (runs[-1][0], n - 1)
    cands: list[_Cand] = []

    def keep(c: _Cand) -> bool:
        return c.end > c.start and (keep_trivial or _second_hop_has_content(toks, c.start, c.end))

    for a, b in runs:
        found = [c for c in _name_candidates(toks, n, a, b) if keep(c)]
        if not found:
            # "the Chief Judge of the Tebesa Nemine's birthplace": the run swallowed a title
            cuts = [k for k in range(a + 1, b) if toks[k - 1].low == "of" and _is_cap(toks[k])]
            cuts += [k for k in range(a + 2, b) if toks[k - 2].low == "of" and toks[k - 1].low == "the"]
            for k in sorted(cuts, reverse=True)[:1]:
                found = [c for c in _name_candidates(toks, n, k, b) if keep(c)]
        cands.extend(found)
    cands.extend(c for c in _clause_candidates(toks, n, runs) if keep(c))
    cands.extend(c for c in _common_noun_candidates(toks, n) if keep(c))
    return cands


def _second_hop_has_content(toks: Sequence[_Tok], start: int, end: int) -> bool:
    """Reject spans that leave nothing to ask ("What is ___?", "Who was ___?")."""
    rest = list(toks[:start]) + list(toks[end:])
    return any(_is_word(t) and not (t.low in _WH | _AUX | _DETS | _PREPS or t.low in _EMPTY_WORDS) for t in rest)



def _choose(cands: Sequence[_Cand]) -> _Cand | None:
    """The outermost candidate: a clause that contains a tighter one describes the
    bridge more fully ("the actor who is a cast member of Love in Pawn"); among
    candidates that do not nest, the longest, then by rank, then the earlier."""
    if not cands:
        return None

    def contains(x: _Cand, y: _Cand) -> bool:
        return x.start <= y.start and y.end <= x.end and (x.start, x.end) != (y.start, y.end)

    outer = [c for c in cands if not any(contains(o, c) for o in cands)]
    return min(outer, key=lambda c: (-(c.end - c.start), c.rank, c.start))


def locate_from_text(question: str) -> Location:
    """Rule-based first-hop locator; raises :class:`UnlocatableQuestion` when no rule fires."""
    _check_question(question)
    toks = _tokenize(question)
    if not toks:
        raise UnlocatableQuestion(question, "empty question")
    cand = _choose(_candidates(toks))
    if cand is None:
        whole = _choose(_candidates(toks, keep_trivial=True))
        if whole is not None:
            phrase = question[toks[whole.start].start : toks[whole.end - 1].end]
            raise UnlocatableQuestion(
                question, f"the relational phrase {phrase!r} is all the question asks (one hop, no bridge entity)"
            )
        raise UnlocatableQuestion(question, "no relational phrase (entity + relation) found")
    return _make_location(question, toks, cand.start, cand.end, cand.subj, None, cand.head, f"parser:{cand.rule}")
