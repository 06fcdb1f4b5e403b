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
Every locator raises :class:`UnlocatableQuestion` rather than guess: also for
one-hop questions ("What is the capital of France?") and for questions whose
bridge has no phrase of its own ("In which borough was X born?").

``Location.method`` is ``"decomposition"`` or ``"parser:<rule>"`` (rules:
possessive, entity_role, r_of_e, r_prep_e, relative, reduced_relative,
zero_relative, headless_relative); ``relation`` is the step-1 relation or the
span's head noun. ``python -m eval.locator_coverage`` measures both locators.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher
from functools import lru_cache
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
_TOKEN_RE = re.compile(
    r"(?:[A-Z]\.)+(?=\s)|(?:St|Mt|Ft|Jr|Sr|Dr|Mr|Mrs|Ms)\.(?=\s)"  # "M. King Hubbert", "St. Matthew"
    r"|\w+(?:[-–.&]\w+)*(?:['’](?![sS]\b)\w+)*|['’][sS]\b|\S"
)


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
_BE = frozenset("is was are were be been being am isn't wasn't aren't weren't".split())
_DO = frozenset("do does did don't doesn't didn't".split())
_HAVE = frozenset("has have had hasn't haven't hadn't".split())
_MODAL = frozenset("can could will would shall should may might must can't won't couldn't wouldn't".split())
_AUX = _BE | _DO | _HAVE | _MODAL
_PREPS = frozenset(
    "of in on at by for from with to into onto about after before during since under over "
    "between through near within across against among along behind beyond toward towards "
    "upon via per like as than around outside inside throughout".split()
)
_REL = frozenset("that which who whom whose where when".split())
_ADVERBS = frozenset("also not never first originally once still later now currently formerly".split())
_CONNECTORS = frozenset(
    "of the and or de del della di da du des la le les von van der den y in on for at a an to & - : with "
    "'s ' el al bin ibn".split()
)
# Question-initial capitalised words that are not part of a name.
_NOT_NAME_START = _WH | _AUX | _PREPS | _DETS | frozenset(
    "according along besides since this that there".split()
)

# Nouns that denote an entity through its relation to another one. Agent and
# kin nouns license "the E <noun>" ("the Green performer"); all of them license
# "the <noun> from/in E" ("the actor from Terminator").
_AGENT_NOUNS = frozenset(
    """
    performer singer artist band group author writer novelist poet composer lyricist songwriter director
    producer screenwriter creator designer developer inventor founder cofounder co-founder owner
    operator manufacturer maker publisher distributor employer successor predecessor star actor actress
    member player winner champion participant narrator host presenter coach manager captain illustrator
    editor translator architect sculptor painter photographer engineer builder sponsor broadcaster
    frontman vocalist guitarist drummer bassist pianist rapper leader president ceo chairman
    spokesperson occupant
    """.split()
)
_KIN_NOUNS = frozenset(
    """
    spouse wife husband father mother son daughter child children brother sister sibling siblings
    parent parents grandfather grandmother grandson granddaughter uncle aunt cousin nephew niece
    partner girlfriend boyfriend
    """.split()
)
_ROLE_NOUNS = _AGENT_NOUNS | _KIN_NOUNS | frozenset(
    """
    person man woman guy people individual figure character voice team club league cast crew
    company firm organization organisation agency party label network studio school university
    college country nation state city town place
    """.split()
)

# Base forms of common verbs; inflected forms are generated below.
_BASE_VERBS = frozenset(
    """
    act add affect agree air allow announce appear apply approve arrive ask attack attend award base be
    bear beat become begin believe belong border break bring broadcast build buy call capture carry
    cause cease change choose claim close coach come compete compose conquer consider contain continue
    control cost create cross cut debut declare defeat defend depict describe design destroy develop die
    direct discover distribute divide do draft draw drink drive drop earn eat educate elect employ end
    enter erupt establish expand explain fail fall feature feel fight fill find finish flood flow fly
    follow form found fund gain get give go govern graduate grow happen have head hear help hire hit
    hold host house illustrate include increase influence inherit introduce invade invent involve issue
    join keep kill know land last launch lead learn leave lend let lie like live locate lose love make
    manage manufacture marry mean meet merge move name need nominate note occupy occur open operate
    order originate own paint participate pass pay perform pick place plan play portray possess precede
    premiere prepare present produce promote propose protect prove provide publish purchase put raise
    rank reach read receive record reduce refer reign release remain replace represent require retire
    return reveal rule run say score see seek sell send serve set settle share sign sing sink sit speak
    spend split stand star start stay stop study succeed suffer supply support surrender take talk teach
    tell think throw train travel try turn understand unite use visit vote want win work write adopt
    exist rise voice sponsor achieve acquire admit arrest assassinate assume ban bomb borrow burn
    celebrate collapse collect comprise conclude confirm construct convert crown decide defect deny
    discuss dissolve donate emigrate encourage enact escape evolve exile hate hide identify ignore
    impeach import improve inspire invite kidnap lay lease migrate murder negotiate observe obtain offer
    oppose outlive overthrow pardon pray predict prefer prevent print process pronounce protest punish
    qualify quit rebuild recognize recruit regain reject rely remove rename repeal rescue resign resist
    respond restore retain revolt ride ring sail save search seize separate shoot smoke solve steal
    strike submit suggest surpass surround survive suspend swim tour trade transfer translate treat
    trust vanish wear wed withdraw worship
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
    "nominated signed released married established formed elected drafted honored "
    "honoured employed published produced written made".split()
)


def _looks_past(low: str) -> bool:
    """Unlisted past forms ("volunteered", "authored"); short or "-eed" words are mostly nouns."""
    return len(low) >= 6 and low.endswith("ed") and not low.endswith("eed") and low not in _NOT_PAST


_NOT_PAST = frozenset("hundred kindred shed".split())


def _looks_ing(low: str) -> bool:
    """Unlisted present participles ("encompassing", "suspending"), not "-ing" nouns."""
    return len(low) >= 6 and low.endswith("ing") and low not in _ING_NOUNS


_ING_NOUNS = frozenset(
    """
    thing things something nothing anything everything king kingdom building buildings wedding ring
    morning evening ceiling painting paintings meeting spring string wing during according including
    clothing darling earring offspring pudding sibling siblings viking setting ending beginning
    recording recordings opening training housing landing feeling writing teaching singing
    """.split()
)


def _verbish(low: str) -> bool:
    return low in _VERB_FORMS or low in _PARTICIPLE_EXTRA or _looks_past(low) or _looks_ing(low)


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
        if tok.text in _QUOTES:
            close = next((k for k in range(i + 1, n) if toks[k].text in _QUOTES), None)
            if close is not None and close > i + 1:
                runs.append((i + 1, close))
                i = close + 1
                continue
        if _opens_single_quote(toks, i):
            close = next((k for k in range(i + 2, min(n, i + 15)) if _closes_single_quote(toks, k)), None)
            if close is not None:
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
                joins = k > j and k < n and _is_word(toks[k]) and _is_cap(toks[k]) and toks[k].low not in _WH
                # "Rebellion of 1857" but not "Satyagraha on 4th"
                if joins and toks[k].text[0].isdigit() and toks[j].low not in {"of", "-", ":"}:
                    joins = False
                if joins:
                    j = k
                    continue
                if toks[j].text == "," and j + 1 < n and _is_cap(toks[j + 1]) and toks[j + 1].low not in _WH:
                    j += 1
                    continue
                # "The Good, the Bad and the Ugly"
                if toks[j].text == "," and j + 2 < n and toks[j + 1].text == "the" and _is_cap(toks[j + 2]):
                    j += 2
                    continue
                if toks[j].text == "(":  # "Country Girl (Shake It for Me)"
                    close = next((k for k in range(j + 1, min(n, j + 9)) if toks[k].text == ")"), None)
                    if close is not None and any(_is_cap(t) for t in toks[j + 1 : close]):
                        j = close + 1
                        continue
                break
            # "McDonald's is ...", "the home country of McDonald's?": an "'s" owning nothing is the name's
            if j < n and toks[j].low == "'s" and (
                j + 1 == n or not _is_word(toks[j + 1]) or toks[j + 1].low in _AUX | _PREPS | _WH
            ):
                j += 1
            runs.append((i, j))
            i = j
            continue
        i += 1
    return runs


def _opens_single_quote(toks: Sequence[_Tok], i: int) -> bool:
    tok = toks[i]
    return (
        tok.text in {"'", "‘"}
        and (i == 0 or toks[i - 1].end < tok.start)
        and i + 1 < len(toks)
        and toks[i + 1].start == tok.end
        and _is_word(toks[i + 1])
    )


def _closes_single_quote(toks: Sequence[_Tok], k: int) -> bool:
    tok = toks[k]
    return (
        tok.text in {"'", "’"}
        and toks[k - 1].end == tok.start
        and (k + 1 == len(toks) or toks[k + 1].start > tok.end or not _is_word(toks[k + 1]))
    )


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


def _np_start(toks: Sequence[_Tok], head: int) -> int | None:
    """Start (determiner or first modifier) of the noun phrase headed by ``head``.

    None when a wh-determiner governs it ("What character in ..."): that noun
    phrase is what the question asks for, not the bridge.
    """
    i = head
    while i > 0 and head - i <= 4:
        prev = toks[i - 1]
        if prev.low == "of" and i >= 2 and f"{toks[i - 2].low} of {toks[i].low}" in _OF_COMPOUNDS:
            i -= 2  # "the body of water where ..."
            continue
        if prev.low in _WH_DETS:
            return None
        if prev.low in _DETS:
            return i - 1
        if _is_cap(prev) and i - 1 > 0:  # part of a name modifier ("the It'll Be Me singer")
            i -= 1
            continue
        if (
            prev.low in _PREPS | _AUX | _WH | _REL | {"and", "or", "'s", "'"}
            or not _is_word(prev)
            or (_is_verb(prev) and prev.low not in _ROLE_NOUNS and not _nounish_context(toks, i - 1))
        ):
            return i
        i -= 1
    return i if head - i <= 4 else None


def _is_noun_like(toks: Sequence[_Tok], i: int) -> bool:
    """A lower-case content word that can head a noun phrase here."""
    tok = toks[i]
    if not _is_word(tok) or _is_function(tok) or _is_cap(tok) or tok.low.endswith("ly"):
        return False
    return not _is_verb(tok) or tok.low in _ROLE_NOUNS or _nounish_context(toks, i)


# Nouns for a value of the entity rather than another entity ("the population
# of ...", "the total area of ..."): they never head a bridge phrase.
_ATTRIBUTE_NOUNS = frozenset(
    """
    name names population age height length width depth size date year years day month time number
    percentage percent amount price cost value total rank ranking enrollment distance season episode
    result end beginning start part type kind sort form version history meaning origin death birth
    """.split()
)


_WH_DETS = frozenset("what which whose how".split())
_OF_COMPOUNDS = frozenset(
    {"body of water", "place of birth", "place of death", "country of origin", "country of citizenship",
     "head of state", "head of government", "member of parliament", "place of worship", "point of origin"}
)
_PARTICLES = frozenset("out up down off away back over".split())


def _head_group(toks: Sequence[_Tok], start: int, stop: int) -> int:
    """End of the lower-case noun group starting at ``start`` ("employer", "place of birth")."""
    j = start
    while j < stop and _is_word(toks[j]) and not _is_function(toks[j]) and not _is_cap(toks[j]):
        if j > start and _is_verb(toks[j]) and toks[j].low not in _ROLE_NOUNS:
            break
        j += 1
    # "place of birth", "country of origin": a single bare noun after "of" closes the group
    if (
        j > start
        and j + 1 < stop
        and toks[j].low == "of"
        and _is_word(toks[j + 1])
        and not _is_function(toks[j + 1])
        and not _is_cap(toks[j + 1])
        and not _is_verb(toks[j + 1])
        and (j + 2 >= stop or _is_function(toks[j + 2]) or _is_verb(toks[j + 2]))
    ):
        j += 2
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
        # the word after a subject relative is its verb even if unlisted ("that comprises")
        after_rel = (
            i > 0
            and toks[i - 1].low in {"that", "which", "who"}
            and not _is_function(tok)
            and tok.low.endswith(("s", "ed"))
        )
        adverb = tok.low.endswith("ly") and i + 1 < stop and _verbish(toks[i + 1].low)  # "originally comes"
        if tok.low in _AUX or after_rel or adverb or (_verbish(tok.low) and not _nounish_context(toks, i)):
            j = i
            saw_main = False
            while j < stop and not _is_cap(toks[j]):
                low = toks[j].low
                after_aux = j > i and toks[j - 1].low in _AUX and not _is_function(toks[j]) and _is_word(toks[j])
                if low in _AUX and not saw_main:
                    j += 1
                elif low in _ADVERBS or (low.endswith("ly") and not saw_main):
                    j += 1
                elif (_verbish(low) or (j == i and after_rel) or after_aux) and not saw_main:
                    # an unlisted word right after an auxiliary is its verb ("didn't discuss")
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
    return prev.low in _DETS or prev.low in {"'s", "'"} or prev.low in _PREPS


def _outer_tail_start(toks: Sequence[_Tok], lo: int, end: int) -> int:
    """Start of the outer predicate closing an inverted question ("... located", "... a member of")."""
    for k in range(max(lo, 1), end):
        progressive = _looks_ing(toks[k].low) and k + 1 < end and toks[k + 1].low in _PREPS  # "talking about"
        if (_is_participle(toks[k]) or progressive) and toks[k].low not in _AGENT_NOUNS:
            before = toks[k - 1].low
            if before == "being":  # "is ... being released"
                return k - 1
            if before not in _BE | _HAVE:  # "where X is located" keeps its own participle
                return k - 1 if toks[k - 1].text == "," else k
    # "... a member of", "... a tributary of", ", a member of"
    k = end
    while k > lo and toks[k - 1].low in _PREPS:
        k -= 1
    m = k
    while m > lo and _is_word(toks[m - 1]) and not _is_function(toks[m - 1]) and not _is_cap(toks[m - 1]) and k - m < 3:
        m -= 1
    if lo < m < k and toks[m - 1].text in {"a", "an"} and toks[m - 2].low not in _BE:
        start = m - 1
        return start - 1 if toks[start - 1].text == "," else start
    # "... part of" without an article, after a complete subject ("X's employer part of")
    if k < end and k - 1 > lo and toks[k - 1].low in {"part", "member"} and toks[k - 2].low not in _BE | _DETS:
        return k - 1
    return end


def _frame(toks: Sequence[_Tok], span_start: int) -> str:
    """How the outer question wraps a span starting at ``span_start``.

    "do": the span is the subject after do-support ("When did [span] die?");
    "be": the subject after an inverted be ("Where was [span] born?");
    "fronted": the span opens a declarative question ("[span] is in which county?");
    "final": anything else (the span runs to the end of the question).
    """
    before = toks[:span_start]
    if not any(t.low in _WH for t in before):
        return "fronted"
    if not any(_is_verb(t) for t in before):
        return "fronted"  # inside the subject: "What piece by [span] is used as ...?"
    for x, tok in enumerate(before):
        if tok.low in _AUX and any(t.low in _WH for t in before[:x]):
            if any(_is_verb(t) and t.low not in _AUX for t in before[x + 1 :]):
                return "final"  # "What currency is used in [span]": a verb came before the span
            if tok.low in _DO:
                return "do"
            if tok.low in _BE:
                return "be"
            return "final"
    return "final"


def _span_end(toks: Sequence[_Tok], span_start: int, inner: int, own_verb: bool) -> int:
    """Right edge of a span that starts at ``span_start``; its own material begins at ``inner``.

    ``own_verb``: the span contains a clause with its own verb group, which the
    outer predicate must not be confused with.
    """
    end = _question_end(toks)
    for k in range(inner, end - 1):  # "According to [span], what is ..."
        if toks[k].text == "," and toks[k + 1].low in _WH:
            end = k
            break
    groups = _verb_groups(toks, inner, end)
    if own_verb and groups:
        end = _clause_stop(toks, groups[0][1], end)
    frm = groups[0][1] if own_verb and groups else inner  # where the outer predicate may start
    frame = _frame(toks, span_start)
    if frame == "do":
        return _do_frame_end(toks, inner, frm, end, own_verb)
    if frame == "be":
        tail = _outer_tail_start(toks, max(frm, inner), end)
        # "Who is [the show Hawkgirl is from] by?": the last of two stranded prepositions is outer
        if own_verb and tail - 2 > frm and toks[tail - 1].low in _PREPS and toks[tail - 2].low in _PREPS:
            tail -= 1
        return tail
    if frame == "fronted":
        rest = groups[1:] if own_verb else groups
        return rest[0][0] if rest else end
    if _role_verb_before(toks, span_start):
        return _role_frame_end(toks, span_start, frm, end)
    return end


def _clause_stop(toks: Sequence[_Tok], after_verb: int, end: int) -> int:
    """A clause ends at a new conjunct ("..., and the rest of") or a comma after its verb."""
    for k in range(after_verb, end - 1):
        if toks[k].low == "and" and toks[k + 1].low in _DETS and (toks[k - 1].text == "," or _is_verb(toks[k - 1])):
            return k - 1 if toks[k - 1].text == "," else k
        if toks[k].text == "," and not _is_cap(toks[k + 1]):
            return k
    return end


def _do_frame_end(toks: Sequence[_Tok], inner: int, frm: int, end: int, own_verb: bool) -> int:
    """After do-support the outer verb is the first bare verb past the span's own verb group."""
    for k in range(max(frm, inner + 1 if own_verb else inner), end):
        prev = toks[k - 1]
        # "the team that X is a member of [win] the FA Cup": a stranded preposition
        nxt = toks[k + 1] if k + 1 < end else None
        stranded = prev.low in _PREPS and prev.low != "to" and (
            nxt is None or nxt.low in _PREPS | _DETS | _PARTICLES | {"each", "every", "all"} or _is_cap(nxt)
        )
        # a capitalised last word can still be the verb ("... The Blind Girl Die?")
        bare = _is_base_verb(toks[k]) or (k == end - 1 and toks[k].low in _BASE_VERBS)
        if bare and (stranded or prev.low not in _DETS | _PREPS | _MODAL | _DO | {"'s", "to"}):
            return k
    # Do-support needs a verb after its subject: if none is known, the last word
    # (before trailing particles) is it ("... the 1943 Copa del Generalissimo achieve?").
    k = end
    while k - 1 > frm and toks[k - 1].low in _PREPS | _PARTICLES:
        k -= 1
    last = toks[k - 1] if k - 1 >= max(frm, inner) else None
    if (
        last is not None
        and _is_word(last)
        and not _is_function(last)
        and last.low not in _ROLE_NOUNS
        and not last.text[0].isdigit()
        and (not _is_cap(last) or last.low in _BASE_VERBS)
    ):
        return k - 1
    return end


def _role_frame_end(toks: Sequence[_Tok], span_start: int, frm: int, end: int) -> int:
    """"Who played [the character that took the sword] in Once Upon a Time?": the work a
    role is played in attaches to the outer verb, unless the span has its own role verb."""
    for k in range(end - 2, frm - 1, -1):
        if (
            toks[k].low in {"in", "on"}
            and not any(_is_verb(t) or t.text[0].isdigit() for t in toks[k + 1 : end])
            and not any(t.low in _ROLE_VERBS for t in toks[span_start:k])
        ):
            return k
    return end


_ROLE_VERBS = frozenset("play plays played playing portray portrays portrayed voice voices voiced".split())


def _role_verb_before(toks: Sequence[_Tok], span_start: int) -> bool:
    return span_start > 0 and toks[span_start - 1].low in _ROLE_VERBS


def _lower_subject(toks: Sequence[_Tok], clause_at: int, hi: int) -> tuple[int, int] | None:
    """Subject of a clause without a name: the noun phrase next to the clause verb."""
    if clause_at < hi and toks[clause_at].low in _PREPS and clause_at + 1 < hi and toks[clause_at + 1].low in _REL:
        clause_at += 1
    if clause_at < hi and toks[clause_at].low in _REL:
        clause_at += 1
    groups = _verb_groups(toks, clause_at, hi)
    if groups:
        g0, g1 = groups[0]
        if g0 > clause_at:  # "where sushi comes from": the phrase before the verb
            a, b = clause_at, g0
        else:  # "who sang holding out for a hero": the phrase after it
            a, b = g1, hi
    else:
        a, b = clause_at, hi
    while a < b and (toks[a].low in _DETS | _REL | _PREPS or not _is_word(toks[a])):
        a += 1
    while b > a and (_is_function(toks[b - 1]) and toks[b - 1].text not in {'"', "”"}):
        b -= 1
    return (a, b) if b > a else None


def _clause_subject(toks: Sequence[_Tok], lo: int, hi: int, runs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The longest name inside tokens [lo, hi); else the noun phrase next to the clause verb,
    cut before its modifiers ("sushi [comes from]", "a hero [in shrek 2]")."""
    inside = [r for r in runs if lo <= r[0] and r[1] <= hi]
    if inside:
        return max(inside, key=lambda r: (r[1] - r[0], -r[0]))
    phrase = _lower_subject(toks, lo, hi)
    if phrase is None:
        return None
    a, b = phrase
    k = a + 1
    while k < b and not (
        toks[k].text == "," or toks[k].low in _REL | _PREPS | _PARTICLES or _is_verb(toks[k]) or toks[k].low.endswith("ly")
    ):
        k += 1
    return a, k


def _anchor_bounds(toks: Sequence[_Tok], a: int, b: int) -> tuple[int, int]:
    """Token bounds of a name including its quotes, if quoted."""
    quotes = _QUOTES | _SINGLE_QUOTES
    if a > 0 and b < len(toks) and toks[a - 1].text in quotes and toks[b].text in quotes:
        return a - 1, b + 1
    return a, b


_QUOTES = frozenset({'"', "“", "”"})
_SINGLE_QUOTES = frozenset({"'", "‘", "’"})


def _name_candidates(toks: Sequence[_Tok], n: int, a: int, b: int) -> list[_Cand]:
    """Candidates built tightly around the name at tokens [a, b) (first matching shape wins)."""
    qa, qb = _anchor_bounds(toks, a, b)
    det_start = qa - 1 if qa > 0 and toks[qa - 1].low in _DETS else qa
    for rule in (_possessive, _entity_role, _relation_prep_name):
        cand = rule(toks, n, a, b, qa, qb, det_start)
        if cand is not None:
            return [cand]
    return []


def _possessive(toks: Sequence[_Tok], n: int, a: int, b: int, qa: int, qb: int, det_start: int) -> _Cand | None:
    """"[the] E's N", "E' N", "[the] E album's band"."""
    j = qb
    while j < n and j - qb < 2 and _is_word(toks[j]) and not _is_function(toks[j]) and not _is_cap(toks[j]):
        j += 1
    if not (j < n and (toks[j].low == "'s" or (toks[j].low == "'" and toks[j - 1].low.endswith("s")))):
        return None
    head_end = min(_head_group(toks, j + 1, n), max(j + 2, _span_end(toks, det_start, j + 1, own_verb=False)))
    if head_end > j + 1 and _group_head(toks, j + 1, head_end) not in _ATTRIBUTE_NOUNS:
        return _Cand(det_start, head_end, (a, b), _group_text(toks, j + 1, head_end), "possessive", 1)
    return None


def _entity_role(toks: Sequence[_Tok], n: int, a: int, b: int, qa: int, qb: int, det_start: int) -> _Cand | None:
    """"the Green performer", "The Unwinding author": a name modifying an agent or kin noun."""
    head_end = _head_group(toks, qb, n)
    if head_end > qb and toks[head_end - 1].low in _AGENT_NOUNS | _KIN_NOUNS:
        if det_start < qa or qa == 0 or toks[qa - 1].low in _PREPS | _AUX | _WH or _is_verb(toks[qa - 1]):
            return _Cand(det_start, head_end, (a, b), toks[head_end - 1].low, "entity_role", 1)
    return None


def _relation_prep_name(toks: Sequence[_Tok], n: int, a: int, b: int, qa: int, qb: int, det_start: int) -> _Cand | None:
    """"the R of E" (any noun R) and "the R from/in/on/with E" (a role noun R), also with a
    type noun before the name: "the maker of the card game Uno"."""
    k = qa
    while k > 0 and qa - k < 4 and _is_word(toks[k - 1]) and not _is_cap(toks[k - 1]) and not _is_function(toks[k - 1]) and (
        not _is_verb(toks[k - 1]) or toks[k - 1].low.endswith("ing")  # "the messaging app WeChat"
    ):
        k -= 1
    # (not before a finite verb: "the organization Julio Maglione is ..." is a zero relative)
    finite_after = qb < n and _is_verb(toks[qb]) and toks[qb].low not in _BASE_VERBS
    if k < qa and k > 0 and toks[k - 1].low in _DETS and not finite_after:
        det_start = k - 1
    if not (det_start >= 2 and toks[det_start - 1].low in _PREPS):
        return None
    prep = toks[det_start - 1].low
    head = det_start - 2
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
    full = _span_end(toks, start, qb, own_verb=False)
    # "the performer of Je dis aime", "the operator of the Jurmo class landing craft":
    # plain words up to the outer predicate still belong to the name
    tail = toks[qb:full]
    if 0 < len(tail) <= 5 and all(_is_word(t) and not _is_function(t) for t in tail) and not _is_verb(tail[-1]):
        end = b = full
    # "the country with Paris as its capital"
    if end + 2 <= n and toks[end].low == "as":
        m = end + 1 + (toks[end + 1].low in _DETS)
        if m < n and _is_noun_like(toks, m) and (m + 1 == n or _is_function(toks[m + 1])):
            end = m + 1
    relation = f"{toks[head - 2].low} of {tok.low}" if compound else tok.low
    return _Cand(start, end, (a, b), relation, rule, 2)


def _opens_np(prev: _Tok) -> bool:
    return prev.low in _PREPS | _AUX | _WH | _REL or prev.text == "," or _is_verb(prev)


def _group_head(toks: Sequence[_Tok], start: int, end: int) -> str:
    """Head word of a noun group: the last word, or the word before "of" ("place of birth")."""
    lows = [t.low for t in toks[start:end]]
    return lows[lows.index("of") - 1] if "of" in lows[1:] else lows[-1]


def _group_text(toks: Sequence[_Tok], start: int, end: int) -> str:
    return " ".join(t.text for t in toks[start:end])


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


_HEADLESS = frozenset("who where what whom".split())
_TIME_NOUNS = frozenset("war conflict battle time period era age year day decade century season reign".split())


def _plain_words(toks: Sequence[_Tok], a: int, b: int) -> bool:
    """Tokens [a, b) are lower-case content words, maybe joined by "and" (a common-noun
    subject: "miso soup", "fish and chips", "banana split", "surströmming")."""
    if b <= a or toks[a].low == "and" or toks[b - 1].low == "and":
        return False
    return all(
        t.low == "and" or (_is_word(t) and not _is_cap(t) and not _is_function(t) and t.low not in _AUX | _ROLE_NOUNS)
        for t in toks[a:b]
    )


def _common_noun_candidates(toks: Sequence[_Tok], n: int) -> list[_Cand]:
    """Subjects that are not names: "sushi's country of origin", "the country of origin of sashimi"."""
    cands: list[_Cand] = []
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


def _wh_before(toks: Sequence[_Tok], i: int) -> bool:
    return any(t.low in _WH for t in toks[:i])


def _finite_verb_at(toks: Sequence[_Tok], i: int) -> bool:
    """A verb group that can head a clause ("is part of", "belong to", "plays for"), not a bare participle."""
    tok = toks[i]
    if _is_cap(tok):
        return False
    if tok.low in _AUX:
        return True
    if tok.low.endswith("ing") or tok.low in _PURE_PARTICIPLES:
        return False
    return _verbish(tok.low)


_PURE_PARTICIPLES = frozenset(
    "born borne sung written known given taken seen spoken shown drawn driven eaten fallen flown grown "
    "risen thrown chosen broken begun done gone been".split()
)


def _candidates(toks: Sequence[_Tok], keep_trivial: bool = False) -> list[_Cand]:
    n = _question_end(toks)
    runs = [(a, b) for a, b in _entity_runs(toks) if b <= n]
    # "What date did the creator of The Blind Girl Die?": a capitalised final verb
    # after do-support is not part of the title
    if runs and runs[-1][1] == n and runs[-1][1] - runs[-1][0] > 1 and toks[n - 1].low in _BASE_VERBS:
        if any(t.low in _DO for t in toks[: runs[-1][0]]):
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


# "What is the name of ___?", "What is ___ called?" only restate the bridge.
_EMPTY_WORDS = frozenset({"'s", "s", "name", "called"})


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
    text = step.get("question") if isinstance(step, Mapping) else getattr(step, "question", None)
    if not isinstance(text, str):
        raise TypeError(
            f"a decomposition step must be a string, a mapping with a 'question' string or an object "
            f"with a .question string; got {step!r}"
        )
    return text


def _check_question(question: Any) -> None:
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")


_STOP_FOR_ALIGN = _DETS | _PREPS | _AUX | _WH | frozenset({"?", ".", ",", "'s", "and", "or"})


@lru_cache(maxsize=65536)
def _sim(a: str, b: str) -> float:
    """Similarity of two normalised words: 1 equal, 0.9 same lemma/stem, ~0.7-0.9 spelling variants, else 0."""
    if a == b:
        return 1.0
    base_a, base_b = _VERB_FORMS.get(a), _VERB_FORMS.get(b)
    if base_a is not None and base_a == base_b:
        return 0.9
    if len(a) >= 4 and len(b) >= 4:
        if a.rstrip("s") == b.rstrip("s") or a[:5] == b[:5] and min(len(a), len(b)) >= 6:
            return 0.9
        matcher = SequenceMatcher(None, a, b)
        if matcher.real_quick_ratio() >= 0.75 and matcher.quick_ratio() >= 0.75:
            ratio = matcher.ratio()
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
        if not _is_word(q_toks[a]):
            continue
        for b in range(a + 1, min(hi, a + len(p) + 3) + 1):
            if not _is_word(q_toks[b - 1]):
                continue
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
    name_ends = {end for _, end in _entity_runs(toks)}
    while b > a and (
        (not _is_word(toks[b - 1]) and toks[b - 1].text not in {'"', "”"} and b not in name_ends)
        or toks[b - 1].low in _DETS | _AUX | {"and", "or"}
        or (toks[b - 1].low == "'s" and b not in name_ends)  # but "McDonald's"
        # "did [the author of X] die": a bare verb after do-support is the outer verb
        or (b - a > 1 and a > 0 and toks[a - 1].low in _DO and _is_base_verb(toks[b - 1]))
        # "is [the maker of X] based" when step 2 says "headquartered": the outer participle
        or (
            b - a > 1
            and a > 0
            and toks[a - 1].low in _BE
            and _is_participle(toks[b - 1])
            and toks[b - 2].low not in _BE | _HAVE
        )
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
        x, y = best[2], best[3]
        # "the Philly cheesesteak": plain words after the name that step 1 also has
        while y < b and _is_word(q_toks[y]) and not _is_function(q_toks[y]) and not _is_verb(q_toks[y]) and q_toks[y].low in s1:
            y += 1
        return x, y
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
    """Like :func:`locate_from_decomposition`, also saying how the span was found.

    "align": step 2 is a question and the words around its ``#1`` line up with
    the question (the span is what fills the gap), independent of the parser.
    "anchor:<rule>": step 2 is ``"#1 >> relation"`` or did not line up, so the
    parser's phrase rules pick the phrase around the step-1 subject.
    """
    _check_question(question)
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
            if b > a and quality >= 0.5 and _clause_complete(toks, a, b):
                subj = _subject_for_span(toks, a, b, entity, ent_hit, step1)
                if subj is not None:
                    second = _proper_question(step2.replace("#1", SLOT))
                    if relation is None:  # question-form step 1: the head noun of the phrase, if the parser has it
                        relation = next((c.head for c in _candidates(toks) if (c.start, c.end) == (a, b)), None)
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


def _clause_complete(toks: Sequence[_Tok], a: int, b: int) -> bool:
    """A span with a relative word must also hold that clause's verb ("the country where
    Meteora [is located]" when step 2 repeats "located" outside the slot)."""
    rel = next((k for k in range(a + 1, b) if toks[k].low in _REL and _is_noun_like(toks, k - 1)), None)
    return rel is None or bool(_verb_groups(toks, rel + 1, b))


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
