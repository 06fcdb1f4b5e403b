"""Candidate rules for the text parser, and :func:`locate_from_text`.

Each rule proposes a :class:`Cand` (a token span around a subject); :func:`choose_candidate`
keeps the outermost one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autopatch.locate.lexicon import (
    AGENT_NOUNS,
    ATTRIBUTE_NOUNS,
    AUX,
    BASE_VERBS,
    DETS,
    DO,
    EMPTY_WORDS,
    HEADLESS,
    IRREGULAR_PARTS,
    KIN_NOUNS,
    OF_COMPOUNDS,
    PREPS,
    REL,
    ROLE_NOUNS,
    TIME_NOUNS,
    WH,
)
from autopatch.locate.location import (
    Location,
    UnlocatableQuestion,
    check_question,
    make_location,
)
from autopatch.locate.phrases import (
    clause_subject,
    finite_verb_at,
    frame_of,
    group_head,
    group_text,
    head_group,
    is_noun_like,
    np_start,
    opens_np,
    plain_words,
    role_verb_before,
    span_end_index,
    wh_before,
)
from autopatch.locate.tokens import (
    Tok,
    anchor_bounds,
    entity_runs,
    is_cap,
    is_function,
    is_participle,
    is_verb,
    is_word,
    question_end_index,
    tokenize,
)


@dataclass(frozen=True)
class Cand:
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

    toks: Sequence[Tok]
    question_end: int
    name_start: int
    name_end: int
    quoted_start: int
    quoted_end: int
    phrase_start: int

    @classmethod
    def around(cls, toks: Sequence[Tok], question_end: int, name_start: int, name_end: int) -> NameSpan:
        """The positions around the name at tokens [name_start, name_end)."""
        quoted_start, quoted_end = anchor_bounds(toks, name_start, name_end)
        phrase_start = quoted_start - 1 if quoted_start > 0 and toks[quoted_start - 1].low in DETS else quoted_start
        return cls(toks, question_end, name_start, name_end, quoted_start, quoted_end, phrase_start)

    @property
    def name(self) -> tuple[int, int]:
        return self.name_start, self.name_end


def _name_candidates(toks: Sequence[Tok], n: int, a: int, b: int) -> list[Cand]:
    """Candidates built tightly around the name at tokens [a, b) (first matching shape wins)."""
    span = NameSpan.around(toks, n, a, b)
    for rule in (_possessive, _entity_role, _relation_prep_name):
        cand = rule(span)
        if cand is not None:
            return [cand]
    return []


def _possessive(span: NameSpan) -> Cand | None:
    """"[the] E's N", "E' N", "[the] E album's band"."""
    toks, n = span.toks, span.question_end
    j = span.quoted_end
    while j < n and j - span.quoted_end < 2 and is_word(toks[j]) and not is_function(toks[j]) and not is_cap(toks[j]):
        j += 1
    if not (j < n and (toks[j].low == "'s" or (toks[j].low == "'" and toks[j - 1].low.endswith("s")))):
        return None
    head_end = min(head_group(toks, j + 1, n), max(j + 2, span_end_index(toks, span.phrase_start, j + 1, own_verb=False)))
    if head_end > j + 1 and group_head(toks, j + 1, head_end) not in ATTRIBUTE_NOUNS:
        return Cand(span.phrase_start, head_end, span.name, group_text(toks, j + 1, head_end), "possessive", 1)
    return None


def _entity_role(span: NameSpan) -> Cand | None:
    """"the Green performer", "The Unwinding author": a name modifying an agent or kin noun."""
    toks, before = span.toks, span.quoted_start - 1
    head_end = head_group(toks, span.quoted_end, span.question_end)
    # a role noun after the name, and the name opens a noun phrase (determiner, start, or after a function word/verb)
    if (
        head_end > span.quoted_end
        and toks[head_end - 1].low in AGENT_NOUNS | KIN_NOUNS
        and (
            span.phrase_start < span.quoted_start
            or span.quoted_start == 0
            or toks[before].low in PREPS | AUX | WH
            or is_verb(toks[before])
        )
    ):
        return Cand(span.phrase_start, head_end, span.name, toks[head_end - 1].low, "entity_role", 1)
    return None


def _relation_prep_name(span: NameSpan) -> Cand | None:
    """"the R of E" (any noun R) and "the R from/in/on/with E" (a role noun R), also with a
    type noun before the name: "the maker of the card game Uno"."""
    toks, n = span.toks, span.question_end
    qa, qb = span.quoted_start, span.quoted_end
    phrase_start = span.phrase_start
    k = qa
    while k > 0 and qa - k < 4 and is_word(toks[k - 1]) and not is_cap(toks[k - 1]) and not is_function(toks[k - 1]) and (
        not is_verb(toks[k - 1]) or toks[k - 1].low.endswith("ing")  # "the messaging app WeChat"
    ):
        k -= 1
    # (not before a finite verb: "the organization Julio Maglione is ..." is a zero relative)
    finite_after = qb < n and is_verb(toks[qb]) and toks[qb].low not in BASE_VERBS
    if k < qa and k > 0 and toks[k - 1].low in DETS and not finite_after:
        phrase_start = k - 1
    if not (phrase_start >= 2 and toks[phrase_start - 1].low in PREPS):
        return None
    prep = toks[phrase_start - 1].low
    head = phrase_start - 2
    tok = toks[head]
    compound = head >= 2 and f"{toks[head - 2].low} of {tok.low}" in OF_COMPOUNDS  # "country of origin"
    if not is_noun_like(toks, head) or (tok.low in ATTRIBUTE_NOUNS and not compound):
        return None
    if prep == "of":
        rule = "r_of_e"
    elif tok.low in ROLE_NOUNS and prep in {"from", "in", "on", "for", "at", "with", "behind", "by"}:
        rule = "r_prep_e"
    else:
        return None
    start = np_start(toks, head)
    if start is None or (toks[start].low not in DETS and start > 0 and not opens_np(toks[start - 1])):
        return None
    if rule == "r_prep_e" and prep in {"in", "on"} and role_verb_before(toks, start):
        return None  # "Who played [the X singer] in Walk the Line?": the work belongs to "played"
    end = qb
    subj_end = span.name_end
    full = span_end_index(toks, start, qb, own_verb=False)
    # "the performer of Je dis aime", "the operator of the Jurmo class landing craft":
    # plain words up to the outer predicate still belong to the name
    tail = toks[qb:full]
    if 0 < len(tail) <= 5 and all(is_word(t) and not is_function(t) for t in tail) and not is_verb(tail[-1]):
        end = subj_end = full
    # "the country with Paris as its capital"
    if end + 2 <= n and toks[end].low == "as":
        m = end + 1 + (toks[end + 1].low in DETS)
        if m < n and is_noun_like(toks, m) and (m + 1 == n or is_function(toks[m + 1])):
            end = m + 1
    relation = f"{toks[head - 2].low} of {tok.low}" if compound else tok.low
    return Cand(start, end, (span.name_start, subj_end), relation, rule, 2)


def _clause_candidates(toks: Sequence[Tok], n: int, runs: Sequence[tuple[int, int]]) -> list[Cand]:
    """Noun + clause: relative ("the country where ..."), reduced ("the county containing ..."),
    zero relative ("the league the Carolina Hurricanes belong to") and headless ("where X is employed")."""
    cands: list[Cand] = []
    for i in range(1, n):
        tok = toks[i]
        prev = toks[i - 1]
        prev_is_verb = is_verb(prev) and prev.low not in AUX and not is_noun_like(toks, i - 1)
        if tok.low in HEADLESS and (prev.low in PREPS or prev_is_verb) and wh_before(toks, i - 1):
            # "How many students attend [where X is employed]?"
            end = span_end_index(toks, i, i + 1, own_verb=True)
            if end > i + 1:
                subj = clause_subject(toks, i + 1, end, runs)
                if subj:
                    cands.append(Cand(i, end, subj, None, "headless_relative", 4))
            continue
        if not is_noun_like(toks, i - 1) or prev.low in ATTRIBUTE_NOUNS:
            continue
        head = i - 1
        start = np_start(toks, head)
        if start is None or not (toks[start].low in DETS or start == 0 or opens_np(toks[start - 1])):
            continue
        rule = None
        inner = i
        if tok.low in REL and (tok.low != "when" or toks[head].low in TIME_NOUNS):
            rule = "relative"  # "when" only after a time noun: "the war when ..."
        elif tok.low in PREPS and i + 1 < n and toks[i + 1].low in {"which", "whom", "whose"}:
            rule = "relative"  # "the place in which ...", "the person after whom ..."
        elif is_verb(tok) and tok.low not in AUX and (tok.low.endswith(("ing", "ed")) or tok.low in IRREGULAR_PARTS):
            # "musical notation used in ..." without a determiner is usually a verb phrase
            if i + 1 < n and (toks[i + 1].low in PREPS | DETS or is_cap(toks[i + 1])) and (
                toks[start].low in DETS or start == 0
            ):
                rule = "reduced_relative"
        elif (is_cap(tok) or tok.low in DETS) and toks[start].low in DETS:
            # zero relative: "the organization [Julio Maglione is a member of]"
            run = next((r for r in runs if r[0] == i or (tok.low in DETS and r[0] == i + 1)), None)
            # "the film UHF located" is a name plus the outer participle, not a clause
            # after do-support a bare verb is the outer one ("did [the movie X] win ...")
            if run and run[1] < n and finite_verb_at(toks, run[1]) and not (
                (run[1] + 1 >= n and is_participle(toks[run[1]]))
                or (toks[run[1]].low in BASE_VERBS and frame_of(toks, start) == "do")
            ):
                rule = "zero_relative"
        if rule is None:
            continue
        end = span_end_index(toks, start, inner, own_verb=True)
        if end <= inner + 1:
            continue
        subj = clause_subject(toks, inner, end, runs)
        if subj is None:
            continue
        cands.append(Cand(start, end, subj, toks[head].low, rule, 3))
    return cands


def _common_noun_candidates(toks: Sequence[Tok], n: int) -> list[Cand]:
    """Subjects that are not names: "sushi's country of origin", "the country of origin of sashimi"."""
    cands: list[Cand] = []
    start: int | None
    for j in range(1, n - 1):
        if toks[j].low == "'s":
            # possessor: up to three plain words, then a boundary
            a = j
            while a > 0 and j - a < 3 and plain_words(toks, a - 1, a):
                a -= 1
            if a == j or (a > 0 and not (opens_np(toks[a - 1]) or toks[a - 1].low in DETS)):
                continue
            head_end = head_group(toks, j + 1, n)
            if head_end > j + 1 and toks[j + 1].low in ROLE_NOUNS and toks[j + 1].low not in ATTRIBUTE_NOUNS:
                start = a - 1 if a > 0 and toks[a - 1].low in DETS else a
                head_end = min(head_end, max(j + 2, span_end_index(toks, start, j + 1, own_verb=False)))
                cands.append(Cand(start, head_end, (a, j), group_text(toks, j + 1, head_end), "possessive", 1))
        elif toks[j].low == "of" and j >= 1:
            head = j - 1
            compound = j >= 3 and f"{toks[j - 3].low} of {toks[j - 1].low}" in OF_COMPOUNDS
            if not (toks[head].low in ROLE_NOUNS or compound) or not is_noun_like(toks, head):
                continue
            start = np_start(toks, head)
            if start is None or toks[start].low not in DETS:
                continue
            a = j + 1
            if a < n and toks[a].low in DETS:
                a += 1
            end = span_end_index(toks, start, a, own_verb=False)
            if end - a <= 4 and plain_words(toks, a, end):
                relation = f"{toks[j - 3].low} of {toks[head].low}" if compound else toks[head].low
                cands.append(Cand(start, end, (a, end), relation, "r_of_e", 2))
    return cands


def find_candidates(toks: Sequence[Tok], keep_trivial: bool = False) -> list[Cand]:
    n = question_end_index(toks)
    runs = [(a, b) for a, b in entity_runs(toks) if b <= n]
    # "What date did the creator of The Blind Girl Die?": a capitalised final verb
    # after do-support is not part of the title
    if (
        runs
        and runs[-1][1] == n
        and runs[-1][1] - runs[-1][0] > 1
        and toks[n - 1].low in BASE_VERBS
        and any(t.low in DO for t in toks[: runs[-1][0]])
    ):
        runs[-1] = (runs[-1][0], n - 1)
    cands: list[Cand] = []

    def keep(c: Cand) -> bool:
        return c.end > c.start and (keep_trivial or _second_hop_has_content(toks, c.start, c.end))

    for a, b in runs:
        found = [c for c in _name_candidates(toks, n, a, b) if keep(c)]
        if not found:
            # "the Chief Judge of the Tebesa Nemine's birthplace": the run swallowed a title
            cuts = [k for k in range(a + 1, b) if toks[k - 1].low == "of" and is_cap(toks[k])]
            cuts += [k for k in range(a + 2, b) if toks[k - 2].low == "of" and toks[k - 1].low == "the"]
            for k in sorted(cuts, reverse=True)[:1]:
                found = [c for c in _name_candidates(toks, n, k, b) if keep(c)]
        cands.extend(found)
    cands.extend(c for c in _clause_candidates(toks, n, runs) if keep(c))
    cands.extend(c for c in _common_noun_candidates(toks, n) if keep(c))
    return cands


def _second_hop_has_content(toks: Sequence[Tok], start: int, end: int) -> bool:
    """Reject spans that leave nothing to ask ("What is ___?", "Who was ___?")."""
    rest = list(toks[:start]) + list(toks[end:])
    return any(is_word(t) and not (t.low in WH | AUX | DETS | PREPS or t.low in EMPTY_WORDS) for t in rest)



def choose_candidate(cands: Sequence[Cand]) -> Cand | None:
    """The outermost candidate: a clause that contains a tighter one describes the
    bridge more fully ("the actor who is a cast member of Love in Pawn"); among
    candidates that do not nest, the longest, then by rank, then the earlier."""
    if not cands:
        return None

    def contains(x: Cand, y: Cand) -> bool:
        return x.start <= y.start and y.end <= x.end and (x.start, x.end) != (y.start, y.end)

    outer = [c for c in cands if not any(contains(o, c) for o in cands)]
    return min(outer, key=lambda c: (-(c.end - c.start), c.rank, c.start))


def locate_from_text(question: str) -> Location:
    """Rule-based first-hop locator; raises :class:`UnlocatableQuestion` when no rule fires."""
    check_question(question)
    toks = tokenize(question)
    if not toks:
        raise UnlocatableQuestion(question, "empty question")
    cand = choose_candidate(find_candidates(toks))
    if cand is None:
        whole = choose_candidate(find_candidates(toks, keep_trivial=True))
        if whole is not None:
            phrase = question[toks[whole.start].start : toks[whole.end - 1].end]
            raise UnlocatableQuestion(
                question, f"the relational phrase {phrase!r} is all the question asks (one hop, no bridge entity)"
            )
        raise UnlocatableQuestion(question, "no relational phrase (entity + relation) found")
    return make_location(question, toks, cand.start, cand.end, cand.subj, None, cand.head, f"parser:{cand.rule}")
