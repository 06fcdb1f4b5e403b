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

A two-hop question names an intermediate "bridge" entity only through a phrase
(the *span*, e.g. "the country where the Colosseum is located") built around a
*subject* ("Colosseum"). Replacing the span by :data:`SLOT` gives the
*second-hop* question ("What is the capital of ___?").

Two locators:

* :func:`locate_from_decomposition` uses a MuSiQue-style decomposition
  (step 1 ``"Entity >> relation"`` or a question, step 2 mentioning ``#1``):
  step 2 is aligned token by token against the question; the part of the
  question that lines up with ``#1`` is the span.
* :func:`locate_from_text` is a rule-based parser (regular word lists and a
  few heuristics, no ML) for the common English shapes: possessives
  ("Hamlet's author"), entity + role noun ("the Green performer"), "the R of E",
  "the R from/in E", relative clauses ("the country where ... is located",
  "the company that makes ..."), reduced relatives ("the university related
  to E", "the county containing E") and zero relatives ("the team E plays for").

:func:`locate` tries the decomposition first and falls back to the parser.
Every locator raises :class:`UnlocatableQuestion` rather than guess.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher
from typing import Any

from autopatch.errors import AutopatchError

__all__ = [
    "SLOT",
    "Location",
    "UnlocatableQuestion",
    "locate",
    "locate_from_decomposition",
    "locate_from_text",
    "decomposition_route",
]

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
            raise ValueError(f"span offsets {self.span_start}:{self.span_end} do not give {self.span!r}")
        if q[self.subject_start : self.subject_end] != self.subject:
            raise ValueError(f"subject offsets do not give {self.subject!r}")
        if not (self.span_start <= self.subject_start < self.subject_end <= self.span_end):
            raise ValueError(f"subject {self.subject!r} is not inside span {self.span!r}")
        if self.second_hop.count(SLOT) != 1:
            raise ValueError(f"second_hop must contain {SLOT!r} exactly once: {self.second_hop!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Location:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def fill(self, bridge: str) -> str:
        """The second-hop question with the slot replaced by ``bridge``."""
        return self.second_hop.replace(SLOT, bridge, 1)


# ---------------------------------------------------------------------------
# Tokens

# Words keep inner hyphens/dots/apostrophes ("Hsiao-wen", "U.S", "O'Neal") but a
# possessive "'s" is its own token so that "Seether's" -> "Seether" + "'s".
_TOKEN_RE = re.compile(r"\w+(?:[-–.&]\w+)*(?:['’](?![sS]\b)\w+)*|['’][sS]\b|\S")


@dataclass(frozen=True)
class _Tok:
    text: str
    start: int
    end: int
    low: str  # lower-cased, accents stripped, curly quotes straightened


def _norm(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return stripped.lower().replace("’", "'").replace("–", "-").replace("—", "-")


def _tokenize(text: str) -> list[_Tok]:
    return [_Tok(m.group(), m.start(), m.end(), _norm(m.group())) for m in _TOKEN_RE.finditer(text)]


def _is_word(tok: _Tok) -> bool:
    return tok.text[0].isalnum()


def _is_cap(tok: _Tok) -> bool:
    """Capitalised, a number, or camel-cased ("iPhone")."""
    return tok.text[0].isdigit() or any(ch.isupper() for ch in tok.text)


# ---------------------------------------------------------------------------
# Word lists

_DETS = frozenset("the a an this these those its his her their our my your".split())
_WH = frozenset("what who whom whose which when where why how".split())
_BE = frozenset("is was are were be been being am".split())
_DO = frozenset("do does did".split())
_HAVE = frozenset("has have had".split())
_MODAL = frozenset("can could will would shall should may might must".split())
_AUX = _BE | _DO | _HAVE | _MODAL
_PREPS = frozenset(
    "of in on at by for from with to into onto about after before during since under over "
    "between through near within across against among along behind beyond toward towards "
    "upon via per like as than around outside inside throughout".split()
)
_REL = frozenset("that which who whom whose where when".split())
_ADVERBS = frozenset("also not never first originally once still later now currently formerly".split())
_CONNECTORS = frozenset(
    "of the and de del della di da du des la le les von van der den y in on for at a an to & - : with "
    "'s ' el al bin ibn".split()
)
# Question-initial capitalised words that are not part of a name.
_NOT_NAME_START = _WH | _AUX | _PREPS | _DETS | frozenset(
    "according along besides since this that there".split()
)

# Nouns that denote an entity through a relation to another one; used to
# recognise "the E <role>" and "the <role> from E" (the other shapes do not
# need to know the head noun).
_ROLE_NOUNS = frozenset(
    """
    performer singer artist band group author writer novelist poet composer lyricist songwriter
    director producer screenwriter creator designer developer inventor founder cofounder co-founder
    owner operator manufacturer maker publisher distributor employer spouse wife husband father
    mother son daughter child children brother sister sibling parent grandfather grandmother uncle
    aunt cousin nephew niece successor predecessor star actor actress member player team club league
    country nation state city town village capital county province region district borough
    municipality place birthplace hometown location headquarters headquarter university college school
    company firm organization organisation agency party label network river lake mountain island
    continent language currency leader president king queen ruler emperor head ceo chairman winner
    champion participant narrator character voice host presenter coach manager captain mascot
    illustrator editor translator architect sculptor painter photographer engineer scientist
    physicist founder creator spokesperson owner occupant builder sponsor broadcaster studio
    cast crew frontman vocalist guitarist drummer bassist pianist rapper
    """.split()
)

# Base forms of common verbs; inflected forms are generated below.
_BASE_VERBS = frozenset(
    """
    act add affect agree air allow announce appear apply approve arrive ask attack attend award base
    be bear beat become begin believe belong border break bring broadcast build buy call capture
    carry cause cease change choose claim close coach come compete compose conquer consider contain
    continue control cost create cross cut debut declare defeat defend depict describe design destroy
    develop die direct discover distribute divide do draft draw drink drive drop earn eat educate
    elect employ end enter erupt establish expand explain fail fall feature feel fight fill find
    finish flood flow fly follow form found fund gain get give go govern graduate grow happen have
    head hear help hire hit hold host house illustrate include increase influence inherit introduce
    invade invent involve issue join keep kill know land last launch lead learn leave lend let lie
    like live locate lose love make manage manufacture marry mean meet merge move name need nominate
    note occupy occur open operate order originate own paint participate pass pay perform pick place
    plan play portray possess precede premiere prepare present produce promote propose protect prove
    provide publish purchase put raise rank reach read receive record reduce refer reign release
    remain replace represent require retire return reveal rule run say score see seek sell send serve
    set settle share sign sing sink sit speak spend split stand star start stay stop study succeed
    suffer supply support surrender take talk teach tell think throw train travel try turn understand
    unite use visit vote want win work write adopt exist flow rise voice sponsor broadcast originate
    """.split()
)
_IRREGULAR = {
    "be": "was were been is are am",
    "bear": "bore born borne",
    "beat": "beaten",
    "become": "became",
    "begin": "began begun",
    "break": "broke broken",
    "bring": "brought",
    "build": "built",
    "buy": "bought",
    "choose": "chose chosen",
    "come": "came",
    "do": "did done does",
    "draw": "drew drawn",
    "drink": "drank drunk",
    "drive": "drove driven",
    "eat": "ate eaten",
    "fall": "fell fallen",
    "feel": "felt",
    "fight": "fought",
    "find": "found",
    "fly": "flew flown flies",
    "get": "got gotten",
    "give": "gave given",
    "go": "went gone goes",
    "grow": "grew grown",
    "have": "had has",
    "hear": "heard",
    "hold": "held",
    "keep": "kept",
    "know": "knew known",
    "lead": "led",
    "leave": "left",
    "lend": "lent",
    "lie": "lay lain",
    "lose": "lost",
    "make": "made",
    "mean": "meant",
    "meet": "met",
    "pay": "paid",
    "read": "read",
    "rise": "rose risen",
    "run": "ran",
    "say": "said",
    "see": "saw seen",
    "seek": "sought",
    "sell": "sold",
    "send": "sent",
    "sing": "sang sung",
    "sink": "sank sunk",
    "sit": "sat",
    "speak": "spoke spoken",
    "spend": "spent",
    "stand": "stood",
    "take": "took taken",
    "teach": "taught",
    "tell": "told",
    "think": "thought",
    "throw": "threw thrown",
    "understand": "understood",
    "win": "won",
    "write": "wrote written",
}


def _inflections(base: str) -> set[str]:
    forms = set(_IRREGULAR.get(base, "").split())
    if base.endswith("e"):
        forms |= {base + "s", base + "d", base[:-1] + "ing"}
    elif base.endswith("y") and base[-2:-1] not in "aeiou":
        forms |= {base[:-1] + "ies", base[:-1] + "ied", base + "ing"}
    else:
        suffix_s = "es" if base.endswith(("s", "sh", "ch", "x", "z", "o")) else "s"
        forms |= {base + suffix_s, base + "ed", base + "ing"}
        if re.fullmatch(r"[^aeiou]*[aeiou][bdgklmnprt]", base):  # stop -> stopped
            forms |= {base + base[-1] + "ed", base + base[-1] + "ing"}
    return forms


_VERB_FORMS: dict[str, str] = {}  # form -> base
for _base in _BASE_VERBS:
    for _form in _inflections(_base):
        _VERB_FORMS.setdefault(_form, _base)
for _base in _BASE_VERBS:
    _VERB_FORMS[_base] = _base
_PARTICIPLE_EXTRA = frozenset(
    "born located based headquartered situated named known called founded educated buried crowned "
    "nominated signed released married situated established formed elected drafted honored "
    "honoured employed published produced written made".split()
)


def _looks_past(low: str) -> bool:
    """Unlisted past forms ("volunteered", "authored"); short or "-eed" words are mostly nouns."""
    return len(low) >= 6 and low.endswith("ed") and not low.endswith("eed") and low not in _NOT_PAST


_NOT_PAST = frozenset("hundred kindred shed".split())


def _verbish(low: str) -> bool:
    return low in _VERB_FORMS or low in _PARTICIPLE_EXTRA or _looks_past(low)


def _is_verb(tok: _Tok) -> bool:
    return not _is_cap(tok) and (tok.low in _AUX or _verbish(tok.low))


def _is_base_verb(tok: _Tok) -> bool:
    return tok.low in _BASE_VERBS and not _is_cap(tok)


def _is_participle(tok: _Tok) -> bool:
    if _is_cap(tok):
        return False
    return tok.low in _PARTICIPLE_EXTRA or _looks_past(tok.low) or (
        tok.low in _VERB_FORMS and (tok.low.endswith(("ed", "en", "wn")) or tok.low in _IRREGULAR_PARTS)
    )


_IRREGULAR_PARTS = frozenset(w for forms in _IRREGULAR.values() for w in forms.split()) - _AUX


def _is_function(tok: _Tok) -> bool:
    return (
        tok.low in _DETS
        or tok.low in _WH
        or tok.low in _AUX
        or tok.low in _PREPS
        or tok.low in _REL
        or tok.low in {"and", "or", "'s", "'", "not"}
        or not _is_word(tok)
    )


# ---------------------------------------------------------------------------
# Entities (subjects) in text


def _entity_runs(toks: Sequence[_Tok]) -> list[tuple[int, int]]:
    """Maximal runs of capitalised words (joined by "of", "the", "and", "-", ...) and quoted titles."""
    runs: list[tuple[int, int]] = []
    n = len(toks)
    i = 0
    while i < n:
        tok = toks[i]
        if tok.text in {'"', "“", "”"}:
            close = next((k for k in range(i + 1, n) if toks[k].text in {'"', "”", "“"}), None)
            if close is not None and close > i + 1:
                runs.append((i + 1, close))
                i = close + 1
                continue
        if _is_word(tok) and _is_cap(tok) and not (i == 0 and tok.low in _NOT_NAME_START and tok.low != "the"):
            if i == 0 and tok.low == "the" and not (i + 1 < n and _is_cap(toks[i + 1])):
                i += 1
                continue
            j = i + 1
            while j < n:
                if _is_word(toks[j]) and _is_cap(toks[j]):
                    j += 1
                    continue
                # connectors only count when a capitalised word follows them
                k = j
                while k < n and toks[k].low in _CONNECTORS and k - j < 3:
                    k += 1
                if k > j and k < n and _is_word(toks[k]) and _is_cap(toks[k]) and toks[k].low not in _WH:
                    j = k
                    continue
                if toks[j].text == "," and j + 1 < n and _is_cap(toks[j + 1]) and toks[j + 1].low not in _WH:
                    j += 1
                    continue
                break
            runs.append((i, j))
            i = j
            continue
        i += 1
    return runs


# ---------------------------------------------------------------------------
# Parser


@dataclass(frozen=True)
class _Cand:
    start: int  # token indices, end exclusive
    end: int
    subj: tuple[int, int]
    head: str | None
    rule: str
    rank: int  # lower wins among candidates that are not nested


def _question_end(toks: Sequence[_Tok]) -> int:
    end = len(toks)
    while end > 0 and toks[end - 1].text in {"?", ".", "!"}:
        end -= 1
    return end


def _np_start(toks: Sequence[_Tok], head: int, floor: int = 0) -> int:
    """Index of the determiner (or first modifier) of the noun phrase whose head is ``head``."""
    i = head
    while i - 1 >= floor:
        prev = toks[i - 1]
        if prev.low in _DETS:
            return i - 1
        if prev.low in _PREPS or prev.low in _AUX or prev.low in _WH or prev.low in _REL or not _is_word(prev):
            return i
        if prev.low in {"and", "or"} or (_is_verb(prev) and prev.low not in _ROLE_NOUNS and i - 1 != 0):
            return i
        i -= 1
    return i


def _head_group(toks: Sequence[_Tok], start: int, stop: int) -> int:
    """End of the noun group starting at ``start`` (lower-case nouns, maybe "'s" + nouns)."""
    j = start
    while j < stop and _is_word(toks[j]) and not _is_function(toks[j]) and not _is_cap(toks[j]):
        if j > start and _is_verb(toks[j]) and toks[j].low not in _ROLE_NOUNS:
            break
        j += 1
    return j


def _verb_groups(toks: Sequence[_Tok], start: int, stop: int) -> list[tuple[int, int]]:
    """(start, end) of verb groups: auxiliaries/adverbs followed by at most one main verb."""
    groups: list[tuple[int, int]] = []
    i = start
    while i < stop:
        tok = toks[i]
        if _is_cap(tok) or not _is_word(tok):
            i += 1
            continue
        if tok.low in _AUX or (_verbish(tok.low) and not _nounish_context(toks, i)):
            j = i
            saw_main = False
            while j < stop and not _is_cap(toks[j]):
                low = toks[j].low
                if low in _AUX and not saw_main:
                    j += 1
                elif low in _ADVERBS:
                    j += 1
                elif _verbish(low) and not saw_main:
                    saw_main = True
                    j += 1
                else:
                    break
            groups.append((i, j))
            i = j
            continue
        i += 1
    return groups


def _nounish_context(toks: Sequence[_Tok], i: int) -> bool:
    """A verb-looking word used as a noun ("the award", "a border", "his work")."""
    if i == 0:
        return False
    prev = toks[i - 1]
    return prev.low in _DETS or prev.low in {"'s", "'"} or prev.low in _PREPS or (
        prev.low not in _VERB_FORMS and not _is_function(prev) and not _is_cap(prev) and toks[i].low.endswith("s")
    )


def _outer_tail_start(toks: Sequence[_Tok], lo: int, end: int) -> int:
    """Start of a trailing outer predicate after an inverted "is/was" ("... located", "... a member of")."""
    j = end
    while j > lo and toks[j - 1].low in _PREPS | {"the", "world"}:
        j -= 1
    if j > lo and _is_participle(toks[j - 1]) and toks[j - 2].low not in _BE | _HAVE | {"being"}:
        k = j - 1
        if k > lo and toks[k - 1].text == ",":
            k -= 1
        return k
    # "... a member of", "... a tributary of", ", a member of"
    k = end
    while k > lo and toks[k - 1].low in _PREPS:
        k -= 1
    m = k
    while m > lo and _is_word(toks[m - 1]) and not _is_function(toks[m - 1]) and k - m < 3:
        m -= 1
    if m < k and m > lo and toks[m - 1].low in {"a", "an"} and toks[m - 2].low not in _BE:
        start = m - 1
        if start > lo and toks[start - 1].text == ",":
            start -= 1
        return start
    return end


def _clause_end(toks: Sequence[_Tok], span_start: int, clause_at: int) -> int:
    """Right edge of a span whose head noun is followed by a clause starting at ``clause_at``."""
    end = _question_end(toks)
    # ", what is ..." / ", who ..." ends the span
    for k in range(clause_at, end - 1):
        if toks[k].text == "," and toks[k + 1].low in _WH:
            end = k
            break
    before = toks[span_start - 1].low if span_start > 0 else None
    groups = _verb_groups(toks, clause_at, end)
    if before in _DO:
        # "When did [the person who ended ...] die?": the outer verb is the first bare
        # verb after the clause's own verb group.
        own_end = groups[0][1] if groups else clause_at
        for k in range(max(own_end, clause_at + 1), end):
            prev = toks[k - 1]
            stranded = prev.low in _PREPS and k >= 2 and _is_verb(toks[k - 2])
            if _is_base_verb(toks[k]) and (stranded or prev.low not in _DETS | _PREPS | _MODAL | _DO | {"'s", "to"}):
                return k
        return end
    if before in _BE and _starts_with_question_word(toks, span_start):
        return _outer_tail_start(toks, clause_at + 1, end)
    if not _starts_with_question_word(toks, span_start):
        # a fronted span: "The city where WOCA is located [is in which part of Florida]?"
        if len(groups) >= 2:
            return groups[1][0]
    return end


def _starts_with_question_word(toks: Sequence[_Tok], span_start: int) -> bool:
    return any(t.low in _WH for t in toks[:span_start])


def _subject_in(toks: Sequence[_Tok], lo: int, hi: int, runs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The last named entity inside tokens [lo, hi), else the first content phrase after the clause verb."""
    inside = [(a, b) for a, b in runs if a >= lo and b <= hi]
    if inside:
        return max(inside, key=lambda r: (r[1] - r[0] >= 1, r[0]))
    return None


def _lower_subject(toks: Sequence[_Tok], clause_at: int, hi: int) -> tuple[int, int] | None:
    """Subject of a clause without capitalised words: the noun phrase next to the clause verb."""
    groups = _verb_groups(toks, clause_at, hi)
    if groups:
        g0, g1 = groups[0]
        if g0 > clause_at:  # "where sushi comes from": the phrase before the verb
            a, b = clause_at, g0
        else:  # "who sang holding out for a hero": the phrase after it
            a, b = g1, hi
    else:
        a, b = clause_at, hi
    while a < b and (toks[a].low in _DETS or toks[a].low in _REL or toks[a].low in _PREPS):
        a += 1
    while b > a and _is_function(toks[b - 1]):
        b -= 1
    return (a, b) if b > a else None


def _candidates(toks: Sequence[_Tok]) -> list[_Cand]:
    n = _question_end(toks)
    runs = [(a, b) for a, b in _entity_runs(toks) if b <= n]
    cands: list[_Cand] = []

    for a, b in runs:
        # possessive: "[the] E's N", "E' N", also "[the] E album's band"
        j = b
        while j < n and _is_word(toks[j]) and not _is_function(toks[j]) and not _is_cap(toks[j]) and j - b < 2:
            j += 1
        if j < n and toks[j].low in {"'s", "'"} and (j > b or toks[j].low == "'s" or toks[a].low.endswith("s")):
            head_end = _head_group(toks, j + 1, n)
            if head_end > j + 1:
                start = a - 1 if a > 0 and toks[a - 1].low in _DETS else a
                cands.append(_Cand(start, head_end, (a, b), toks[head_end - 1].low, "possessive", 1))
                continue
        # entity + role noun: "the Green performer", "The Unwinding author"
        head_end = _head_group(toks, b, n)
        if head_end > b and any(toks[k].low in _ROLE_NOUNS for k in range(b, head_end)):
            start = a - 1 if a > 0 and toks[a - 1].low in _DETS else a
            if start < a or a == 0 or toks[a - 1].low in _PREPS | _AUX | _WH or toks[a].low == "the":
                cands.append(_Cand(start, head_end, (a, b), toks[head_end - 1].low, "entity_role", 1))
                continue
        # "the R of E", "the R from/in/on/by E"
        k = a - 1 if a > 0 and toks[a - 1].low in _DETS else a
        if k >= 2 and toks[k - 1].low in _PREPS:
            prep = toks[k - 1].low
            head = k - 2
            if _is_word(toks[head]) and not _is_function(toks[head]) and not _is_cap(toks[head]):
                if prep == "of" or (toks[head].low in _ROLE_NOUNS and prep in {"from", "in", "on", "for", "at", "with", "behind"}):
                    start = _np_start(toks, head)
                    if start < head + 1 and (toks[start].low in _DETS or start == 0 or toks[start - 1].low in _PREPS | _AUX | _WH | _REL | {","} or _is_verb(toks[start - 1])):
                        rule = "r_of_e" if prep == "of" else "r_prep_e"
                        cands.append(_Cand(start, b, (a, b), toks[head].low, rule, 2))

    # relative clauses, reduced relatives and zero relatives
    for i in range(1, n):
        tok = toks[i]
        prev = toks[i - 1]
        if not (_is_word(prev) and not _is_function(prev) and not _is_cap(prev)):
            continue
        head = i - 1
        start = _np_start(toks, head)
        if not (toks[start].low in _DETS or start == 0):
            continue
        if start < i - 4:
            continue
        rule = None
        clause_at = i
        if tok.low in _REL and tok.low not in {"when"}:
            rule = "relative"
        elif tok.low in _PREPS and i + 1 < n and toks[i + 1].low in {"which", "whom", "whose"}:
            rule = "relative"  # "the place in which ...", "the person after whom ..."
        elif _is_verb(tok) and tok.low not in _AUX and (tok.low.endswith(("ing", "ed")) or tok.low in _IRREGULAR_PARTS):
            if i + 1 < n and (toks[i + 1].low in _PREPS | _DETS or _is_cap(toks[i + 1])):
                rule = "reduced_relative"
        elif _is_cap(tok) and toks[head].low in _ROLE_NOUNS:
            # zero relative: "the organization Julio Maglione is a member of"
            run = next((r for r in runs if r[0] == i), None)
            if run and run[1] < n and _is_verb(toks[run[1]]):
                rule = "zero_relative"
        if rule is None:
            continue
        end = _clause_end(toks, start, clause_at)
        if end <= clause_at:
            continue
        subj = _subject_in(toks, clause_at, end, runs) or _lower_subject(toks, clause_at, end)
        if subj is None:
            continue
        cands.append(_Cand(start, end, subj, toks[head].low, rule, 3))
    return [c for c in cands if _second_hop_has_content(toks, c.start, c.end)]


def _second_hop_has_content(toks: Sequence[_Tok], start: int, end: int) -> bool:
    """Reject spans that leave nothing to ask ("What is ___?", "Who was ___?")."""
    rest = list(toks[:start]) + list(toks[end:])
    return any(_is_word(t) and not (t.low in _WH | _AUX | _DETS | _PREPS or t.low in {"'s", "s"}) for t in rest)


def _choose(cands: Sequence[_Cand]) -> _Cand | None:
    if not cands:
        return None
    # A clause span that contains a tighter candidate describes the bridge more
    # fully ("the actor who is a cast member of Love in Pawn"), so the outermost
    # candidate wins; otherwise rank, then the later position.
    def contains(x: _Cand, y: _Cand) -> bool:
        return x.start <= y.start and y.end <= x.end and (x.start, x.end) != (y.start, y.end)

    outer = [c for c in cands if not any(contains(o, c) for o in cands)]
    return min(outer, key=lambda c: (c.rank, -c.start))


def _relation_name(head: str | None) -> str | None:
    return head


def locate_from_text(question: str) -> Location:
    """Rule-based first-hop locator; raises :class:`UnlocatableQuestion` when no rule fires."""
    toks = _tokenize(question)
    if not toks:
        raise UnlocatableQuestion(question, "empty question")
    cand = _choose(_candidates(toks))
    if cand is None:
        raise UnlocatableQuestion(question, "no relational phrase (entity + relation) found")
    return _make_location(question, toks, cand.start, cand.end, cand.subj, None, _relation_name(cand.head), f"parser:{cand.rule}")


def _make_location(
    question: str,
    toks: Sequence[_Tok],
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


# ---------------------------------------------------------------------------
# Decomposition


def _step_text(step: Any) -> str:
    if isinstance(step, str):
        return step
    if isinstance(step, Mapping):
        return str(step["question"])
    return str(step.question)


_STOP_FOR_ALIGN = _DETS | _PREPS | _AUX | _WH | frozenset({"?", ".", ",", "'s", "and", "or"})


def _sim(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if len(a) >= 4 and len(b) >= 4:
        if a.rstrip("s") == b.rstrip("s") or a[:5] == b[:5] and min(len(a), len(b)) >= 6:
            return 0.9
        ratio = SequenceMatcher(None, a, b).ratio()
        if ratio >= 0.75:
            return ratio * 0.9
    return 0.0


_GAP = 0.3
_EDGE = 0.1


def _weight(low: str) -> float:
    return 0.5 if low in _STOP_FOR_ALIGN else 1.0


def _align_scores(q: Sequence[str], p: Sequence[str]) -> list[float]:
    """score[a] = best alignment of all of ``p`` ending exactly at q[:a] (leading q tokens free)."""
    n, m = len(q), len(p)
    neg = float("-inf")
    # j = 0: nothing of p aligned yet; question words before the alignment cost a
    # little, so that the span (which is free) absorbs unaligned words next to it.
    prev = [-_EDGE * i for i in range(n + 1)]
    for j in range(1, m + 1):
        cur = [neg] * (n + 1)
        cur[0] = prev[0] - _GAP * 0.5
        for i in range(1, n + 1):
            s = _sim(q[i - 1], p[j - 1])
            best = prev[i] - _GAP * 0.5  # skip p token
            if s > 0:
                best = max(best, prev[i - 1] + s * _weight(p[j - 1]))
            best = max(best, cur[i - 1] - _GAP)  # skip q token
            cur[i] = best
        prev = cur
    return prev


def _align_span(q_toks: Sequence[_Tok], step2: str) -> tuple[int, int, float] | None:
    """Token span of the question that lines up with "#1" in ``step2`` and the match quality."""
    s_toks = _tokenize(step2.replace("#1", " HASHONE "))
    idx = [k for k, t in enumerate(s_toks) if t.text == "HASHONE"]
    if len(idx) != 1:
        return None
    h = idx[0]
    q = [t.low for t in q_toks]
    pre = [t.low for t in s_toks[:h]]
    suf = [t.low for t in s_toks[h + 1 :] if t.text not in {"?", "."}]
    qn = _question_end(q_toks)
    q = q[:qn]
    p_scores = _align_scores(q, pre)
    s_scores = _align_scores(q[::-1], suf[::-1])  # s_scores[r] : suffix aligned to last r tokens
    best: tuple[float, int, int] | None = None
    for a in range(0, qn):
        for b in range(a + 1, qn + 1):
            score = p_scores[a] + s_scores[qn - b]
            key = (score, -(b - a))
            if best is None or key > (best[0], -(best[2] - best[1])):
                best = (score, a, b)
    if best is None:
        return None
    total = sum(_weight(t) for t in pre + suf)
    quality = best[0] / total if total else 1.0
    return best[1], best[2], quality


def _find_phrase(q_toks: Sequence[_Tok], phrase: str, lo: int = 0, hi: int | None = None) -> tuple[int, int, float] | None:
    """Best fuzzy occurrence of ``phrase`` in question tokens [lo, hi) as (start, end, score)."""
    hi = len(q_toks) if hi is None else hi
    p = [t.low for t in _tokenize(phrase) if _is_word(t) or t.text in {"&"}]
    if not p:
        return None
    best: tuple[int, int, float] | None = None
    for a in range(lo, hi):
        for b in range(a + 1, min(hi, a + len(p) + 3) + 1):
            window = [t.low for t in q_toks[a:b] if _is_word(t) or t.text in {"&"}]
            if not window:
                continue
            score = _seq_sim(window, p)
            if best is None or score > best[2] + 1e-9:
                best = (a, b, score)
    return best


def _seq_sim(x: Sequence[str], y: Sequence[str]) -> float:
    """Token-level fuzzy F1 between two token lists."""
    used: set[int] = set()
    total = 0.0
    for a in x:
        best_k, best_s = -1, 0.0
        for k, b in enumerate(y):
            if k in used:
                continue
            s = _sim(a, b)
            if s > best_s:
                best_k, best_s = k, s
        if best_k >= 0:
            used.add(best_k)
            total += best_s
    return 2 * total / (len(x) + len(y))


def _parse_step1(step1: str) -> tuple[str | None, str | None]:
    if ">>" in step1:
        entity, relation = (part.strip() for part in step1.split(">>", 1))
        return entity or None, relation or None
    return None, None


def _trim_span(toks: Sequence[_Tok], a: int, b: int) -> tuple[int, int]:
    """Cut an aligned span to a noun phrase: no leading verb/preposition, no dangling edges."""
    while a < b:
        tok = toks[a]
        if not _is_word(tok) and tok.text not in {'"', "“"}:
            a += 1
        elif tok.low in _PREPS | _AUX | {"and", "or"} or (_is_verb(tok) and tok.low not in _ROLE_NOUNS and b - a > 1):
            a += 1
        elif tok.low in _REL and a > 0 and not _is_function(toks[a - 1]) and not _is_verb(toks[a - 1]):
            # "the city [where X's spouse] was born": the relative word hangs off a noun outside
            a += 1
        else:
            break
    while b > a and (
        (not _is_word(toks[b - 1]) and toks[b - 1].text not in {'"', "”"})
        or toks[b - 1].low in _DETS | _AUX | {"and", "or", "'s"}
    ):
        b -= 1
    return a, b


def _subject_from_question_step(q_toks: Sequence[_Tok], step1: str, a: int, b: int) -> tuple[int, int] | None:
    """Subject of a question-form step 1: the part of the span that step 1 also mentions."""
    s1 = [t.low for t in _tokenize(step1) if _is_word(t)]
    best: tuple[float, int, int, int] | None = None
    for x, y in _entity_runs(q_toks):
        if not (a <= x and y <= b):
            continue
        words = [t.low for t in q_toks[x:y] if _is_word(t) and t.low not in _CONNECTORS]
        if not words:
            continue
        found = sum(max((_sim(w, v) for v in s1), default=0.0) for w in words) / len(words)
        key = (found, y - x, x, y)
        if found >= 0.5 and (best is None or key > best):
            best = key
    if best is not None:
        return best[2], best[3]
    # No shared name: the longest run of words shared with step 1, outside the head noun.
    head_end = a
    while head_end < b and not (q_toks[head_end].low in _REL or _is_verb(q_toks[head_end]) or q_toks[head_end].low in _PREPS):
        head_end += 1
    best_run: tuple[int, int] | None = None
    for x in range(head_end, b):
        for y in range(x + 1, b + 1):
            if _is_function(q_toks[x]) or _is_function(q_toks[y - 1]) or _is_verb(q_toks[x]):
                continue
            if _contains_seq(s1, [t.low for t in q_toks[x:y]]) and (best_run is None or y - x > best_run[1] - best_run[0]):
                best_run = (x, y)
    return best_run


def _contains_seq(hay: Sequence[str], needle: Sequence[str]) -> bool:
    m = len(needle)
    return any(list(hay[i : i + m]) == list(needle) for i in range(len(hay) - m + 1))


def _proper_question(text: str) -> str:
    text = re.sub(r"\s+([?.,!])", r"\1", text.strip())
    text = re.sub(r"\s+(['’]s)\b", r"\1", text)
    text = re.sub(r"\s+", " ", text)
    text = text.rstrip(".").rstrip()
    if not text.endswith("?"):
        text += "?"
    return text[0].upper() + text[1:]


def decomposition_route(question: str, decomposition: Sequence[Any]) -> tuple[Location, str]:
    """Like :func:`locate_from_decomposition`, also saying how: "align" (step 2 aligned) or "anchor"."""
    steps = [_step_text(s) for s in decomposition]
    if len(steps) != 2:
        raise UnlocatableQuestion(question, f"decomposition has {len(steps)} steps, only two-hop is supported")
    step1, step2 = steps
    if "#1" not in step2:
        raise UnlocatableQuestion(question, "step 2 of the decomposition does not mention #1")
    toks = _tokenize(question)
    if not toks:
        raise UnlocatableQuestion(question, "empty question")
    entity, relation = _parse_step1(step1)
    ent_hit = _find_phrase(toks, entity) if entity else None
    if ent_hit and ent_hit[2] < 0.5:
        ent_hit = None

    if ">>" not in step2:
        aligned = _align_span(toks, step2)
        if aligned is not None:
            a, b, quality = aligned
            a, b = _trim_span(toks, a, b)
            if b > a and quality >= 0.5:
                subj = _subject_for_span(toks, a, b, entity, ent_hit, step1)
                if subj is not None:
                    second = _proper_question(step2.replace("#1", SLOT))
                    loc = _make_location(question, toks, a, b, subj, second, relation, "decomposition")
                    return loc, "align"
    # Step 2 is "#1 >> relation" or did not align: find the phrase around the subject.
    if entity is not None:
        if ent_hit is None:
            raise UnlocatableQuestion(question, f"the step-1 entity {entity!r} does not occur in the question")
        anchor = (ent_hit[0], ent_hit[1])
    else:
        anchor = None
    cands = _candidates(toks)
    if anchor is not None:
        cands = [c for c in cands if c.start <= anchor[0] and anchor[1] <= c.end]
        cands = [
            _Cand(c.start, c.end, anchor, c.head, c.rule, c.rank) for c in cands
        ]
    else:
        # question-form step 1: the candidate sharing most words with it
        step_words = {t.low for t in _tokenize(step1) if not _is_function(t)}
        scored = []
        for c in cands:
            words = {t.low for t in toks[c.start : c.end] if not _is_function(t)}
            overlap = len(words & step_words) / max(1, len(words))
            if overlap >= 0.3:
                scored.append(c)
        cands = scored
    cand = _choose(cands)
    if cand is None:
        raise UnlocatableQuestion(question, "no phrase of the question lines up with step 1 of the decomposition")
    subj = cand.subj
    if anchor is None:
        subj = _subject_from_question_step(toks, step1, cand.start, cand.end) or cand.subj
    loc = _make_location(question, toks, cand.start, cand.end, subj, None, relation or cand.head, "decomposition")
    return loc, "anchor:" + cand.rule


def _subject_for_span(
    toks: Sequence[_Tok],
    a: int,
    b: int,
    entity: str | None,
    ent_hit: tuple[int, int, float] | None,
    step1: str,
) -> tuple[int, int] | None:
    if entity is not None:
        if ent_hit is not None and a <= ent_hit[0] and ent_hit[1] <= b:
            return ent_hit[0], ent_hit[1]
        hit = _find_phrase(toks, entity, a, b)
        if hit and hit[2] >= 0.5:
            return hit[0], hit[1]
        return None
    return _subject_from_question_step(toks, step1, a, b)


def locate_from_decomposition(question: str, decomposition: Sequence[Any]) -> Location:
    """First-hop span from a MuSiQue-style decomposition (step 1, then step 2 with ``#1``)."""
    return decomposition_route(question, decomposition)[0]


def locate(question: str, decomposition: Sequence[Any] | None = None) -> Location:
    """Decomposition first when given, else (or when it fails) the text parser."""
    if decomposition:
        try:
            return locate_from_decomposition(question, decomposition)
        except UnlocatableQuestion as first:
            try:
                return locate_from_text(question)
            except UnlocatableQuestion as second:
                raise UnlocatableQuestion(question, f"{first.why}; and the text parser: {second.why}") from None
    return locate_from_text(question)
