"""Phrase structure helpers: noun-phrase starts, noun and verb groups, span ends, clause subjects.

Every helper takes the token list and token indices (end exclusive); none builds
a candidate itself (that is :mod:`autopatch.locate.rules`).
"""

from __future__ import annotations

from collections.abc import Sequence

from autopatch.locate.lexicon import (
    ADVERBS,
    AGENT_NOUNS,
    AUX,
    BASE_VERBS,
    BE,
    DETS,
    DO,
    HAVE,
    MODAL,
    OF_COMPOUNDS,
    PARTICLES,
    PREPS,
    PURE_PARTICIPLES,
    REL,
    ROLE_NOUNS,
    ROLE_VERBS,
    WH,
    WH_DETS,
    looks_ing,
    verbish,
)
from autopatch.locate.tokens import (
    Tok,
    is_base_verb,
    is_cap,
    is_function,
    is_participle,
    is_verb,
    is_word,
    question_end_index,
)

# ---------------------------------------------------------------------------
# Noun phrases and groups


def np_start(toks: Sequence[Tok], head: int) -> int | None:
    """Start (determiner or first modifier) of the noun phrase headed by ``head``.

    None when a wh-determiner governs it ("What character in ..."): that noun
    phrase is what the question asks for, not the bridge.
    """
    i = head
    while i > 0 and head - i <= 4:
        prev = toks[i - 1]
        if prev.low == "of" and i >= 2 and f"{toks[i - 2].low} of {toks[i].low}" in OF_COMPOUNDS:
            i -= 2  # "the body of water where ..."
            continue
        if prev.low in WH_DETS:
            return None
        if prev.low in DETS:
            return i - 1
        if is_cap(prev) and i - 1 > 0:  # part of a name modifier ("the It'll Be Me singer")
            i -= 1
            continue
        if (
            prev.low in PREPS | AUX | WH | REL | {"and", "or", "'s", "'"}
            or not is_word(prev)
            or (is_verb(prev) and prev.low not in ROLE_NOUNS and not _nounish_context(toks, i - 1))
        ):
            return i
        i -= 1
    return i if head - i <= 4 else None


def is_noun_like(toks: Sequence[Tok], i: int) -> bool:
    """A lower-case content word that can head a noun phrase here."""
    tok = toks[i]
    if not is_word(tok) or is_function(tok) or is_cap(tok) or tok.low.endswith("ly"):
        return False
    return not is_verb(tok) or tok.low in ROLE_NOUNS or _nounish_context(toks, i)


def _nounish_context(toks: Sequence[Tok], i: int) -> bool:
    """A verb-looking word used as a noun ("the award", "a border", "his work")."""
    if i == 0:
        return False
    prev = toks[i - 1]
    return prev.low in DETS or prev.low in {"'s", "'"} or prev.low in PREPS


def opens_np(prev: Tok) -> bool:
    return prev.low in PREPS | AUX | WH | REL or prev.text == "," or is_verb(prev)


def group_head(toks: Sequence[Tok], start: int, end: int) -> str:
    """Head word of a noun group: the last word, or the word before "of" ("place of birth")."""
    lows = [t.low for t in toks[start:end]]
    return lows[lows.index("of") - 1] if "of" in lows[1:] else lows[-1]


def group_text(toks: Sequence[Tok], start: int, end: int) -> str:
    return " ".join(t.text for t in toks[start:end])


def head_group(toks: Sequence[Tok], start: int, stop: int) -> int:
    """End of the lower-case noun group starting at ``start`` ("employer", "place of birth")."""
    j = start
    while j < stop and is_word(toks[j]) and not is_function(toks[j]) and not is_cap(toks[j]):
        if j > start and is_verb(toks[j]) and toks[j].low not in ROLE_NOUNS:
            break
        j += 1
    # "place of birth", "country of origin": a single bare noun after "of" closes the group
    if (
        j > start
        and j + 1 < stop
        and toks[j].low == "of"
        and is_word(toks[j + 1])
        and not is_function(toks[j + 1])
        and not is_cap(toks[j + 1])
        and not is_verb(toks[j + 1])
        and (j + 2 >= stop or is_function(toks[j + 2]) or is_verb(toks[j + 2]))
    ):
        j += 2
    return j



def plain_words(toks: Sequence[Tok], a: int, b: int) -> bool:
    """Tokens [a, b) are lower-case content words, maybe joined by "and" (a common-noun
    subject: "miso soup", "fish and chips", "banana split", "surströmming")."""
    if b <= a or toks[a].low == "and" or toks[b - 1].low == "and":
        return False
    return all(
        t.low == "and" or (is_word(t) and not is_cap(t) and not is_function(t) and t.low not in AUX | ROLE_NOUNS)
        for t in toks[a:b]
    )


# ---------------------------------------------------------------------------
# Verb groups


def verb_groups(toks: Sequence[Tok], start: int, stop: int) -> list[tuple[int, int]]:
    """(start, end) of verb groups: auxiliaries/adverbs followed by at most one main verb."""
    groups: list[tuple[int, int]] = []
    i = start
    while i < stop:
        tok = toks[i]
        if is_cap(tok) or not is_word(tok):
            i += 1
            continue
        # the word after a subject relative is its verb even if unlisted ("that comprises")
        after_rel = (
            i > 0
            and toks[i - 1].low in {"that", "which", "who"}
            and not is_function(tok)
            and tok.low.endswith(("s", "ed"))
        )
        adverb = tok.low.endswith("ly") and i + 1 < stop and verbish(toks[i + 1].low)  # "originally comes"
        if tok.low in AUX or after_rel or adverb or (verbish(tok.low) and not _nounish_context(toks, i)):
            j = i
            saw_main = False
            while j < stop and not is_cap(toks[j]):
                low = toks[j].low
                after_aux = j > i and toks[j - 1].low in AUX and not is_function(toks[j]) and is_word(toks[j])
                if (low in AUX and not saw_main) or low in ADVERBS or (low.endswith("ly") and not saw_main):
                    j += 1
                elif (verbish(low) or (j == i and after_rel) or after_aux) and not saw_main:
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



def wh_before(toks: Sequence[Tok], i: int) -> bool:
    return any(t.low in WH for t in toks[:i])


def finite_verb_at(toks: Sequence[Tok], i: int) -> bool:
    """A verb group that can head a clause ("is part of", "belong to", "plays for"), not a bare participle."""
    tok = toks[i]
    if is_cap(tok):
        return False
    if tok.low in AUX:
        return True
    if tok.low.endswith("ing") or tok.low in PURE_PARTICIPLES:
        return False
    return verbish(tok.low)


# ---------------------------------------------------------------------------
# Span ends: where the outer question takes over


def _outer_tail_start(toks: Sequence[Tok], lo: int, end: int) -> int:
    """Start of the outer predicate closing an inverted question ("... located", "... a member of")."""
    for k in range(max(lo, 1), end):
        progressive = looks_ing(toks[k].low) and k + 1 < end and toks[k + 1].low in PREPS  # "talking about"
        if (is_participle(toks[k]) or progressive) and toks[k].low not in AGENT_NOUNS:
            before = toks[k - 1].low
            if before == "being":  # "is ... being released"
                return k - 1
            if before not in BE | HAVE:  # "where X is located" keeps its own participle
                return k - 1 if toks[k - 1].text == "," else k
    # "... a member of", "... a tributary of", ", a member of"
    k = end
    while k > lo and toks[k - 1].low in PREPS:
        k -= 1
    m = k
    while m > lo and is_word(toks[m - 1]) and not is_function(toks[m - 1]) and not is_cap(toks[m - 1]) and k - m < 3:
        m -= 1
    if lo < m < k and toks[m - 1].text in {"a", "an"} and toks[m - 2].low not in BE:
        start = m - 1
        return start - 1 if toks[start - 1].text == "," else start
    # "... part of" without an article, after a complete subject ("X's employer part of")
    if k < end and k - 1 > lo and toks[k - 1].low in {"part", "member"} and toks[k - 2].low not in BE | DETS:
        return k - 1
    return end


def frame_of(toks: Sequence[Tok], span_start: int) -> str:
    """How the outer question wraps a span starting at ``span_start``.

    "do": the span is the subject after do-support ("When did [span] die?");
    "be": the subject after an inverted be ("Where was [span] born?");
    "fronted": the span opens a declarative question ("[span] is in which county?");
    "final": anything else (the span runs to the end of the question).
    """
    before = toks[:span_start]
    if not any(t.low in WH for t in before):
        return "fronted"
    if not any(is_verb(t) for t in before):
        return "fronted"  # inside the subject: "What piece by [span] is used as ...?"
    for x, tok in enumerate(before):
        if tok.low in AUX and any(t.low in WH for t in before[:x]):
            if any(is_verb(t) and t.low not in AUX for t in before[x + 1 :]):
                return "final"  # "What currency is used in [span]": a verb came before the span
            if tok.low in DO:
                return "do"
            if tok.low in BE:
                return "be"
            return "final"
    return "final"


def span_end_index(toks: Sequence[Tok], span_start: int, inner: int, own_verb: bool) -> int:
    """Right edge of a span that starts at ``span_start``; its own material begins at ``inner``.

    ``own_verb``: the span contains a clause with its own verb group, which the
    outer predicate must not be confused with.
    """
    end = question_end_index(toks)
    for k in range(inner, end - 1):  # "According to [span], what is ..."
        if toks[k].text == "," and toks[k + 1].low in WH:
            end = k
            break
    groups = verb_groups(toks, inner, end)
    if own_verb and groups:
        end = _clause_stop(toks, groups[0][1], end)
    frm = groups[0][1] if own_verb and groups else inner  # where the outer predicate may start
    frame = frame_of(toks, span_start)
    if frame == "do":
        return _do_frame_end(toks, inner, frm, end, own_verb)
    if frame == "be":
        tail = _outer_tail_start(toks, max(frm, inner), end)
        # "Who is [the show Hawkgirl is from] by?": the last of two stranded prepositions is outer
        if own_verb and tail - 2 > frm and toks[tail - 1].low in PREPS and toks[tail - 2].low in PREPS:
            tail -= 1
        return tail
    if frame == "fronted":
        rest = groups[1:] if own_verb else groups
        return rest[0][0] if rest else end
    if role_verb_before(toks, span_start):
        return _role_frame_end(toks, span_start, frm, end)
    return end


def _clause_stop(toks: Sequence[Tok], after_verb: int, end: int) -> int:
    """A clause ends at a new conjunct ("..., and the rest of") or a comma after its verb."""
    for k in range(after_verb, end - 1):
        if toks[k].low == "and" and toks[k + 1].low in DETS and (toks[k - 1].text == "," or is_verb(toks[k - 1])):
            return k - 1 if toks[k - 1].text == "," else k
        if toks[k].text == "," and not is_cap(toks[k + 1]):
            return k
    return end


def _do_frame_end(toks: Sequence[Tok], inner: int, frm: int, end: int, own_verb: bool) -> int:
    """After do-support the outer verb is the first bare verb past the span's own verb group."""
    for k in range(max(frm, inner + 1 if own_verb else inner), end):
        prev = toks[k - 1]
        # "the team that X is a member of [win] the FA Cup": a stranded preposition
        nxt = toks[k + 1] if k + 1 < end else None
        stranded = prev.low in PREPS and prev.low != "to" and (
            nxt is None or nxt.low in PREPS | DETS | PARTICLES | {"each", "every", "all"} or is_cap(nxt)
        )
        # a capitalised last word can still be the verb ("... The Blind Girl Die?")
        bare = is_base_verb(toks[k]) or (k == end - 1 and toks[k].low in BASE_VERBS)
        if bare and (stranded or prev.low not in DETS | PREPS | MODAL | DO | {"'s", "to"}):
            return k
    # Do-support needs a verb after its subject: if none is known, the last word
    # (before trailing particles) is it ("... the 1943 Copa del Generalissimo achieve?").
    k = end
    while k - 1 > frm and toks[k - 1].low in PREPS | PARTICLES:
        k -= 1
    last = toks[k - 1] if k - 1 >= max(frm, inner) else None
    if (
        last is not None
        and is_word(last)
        and not is_function(last)
        and last.low not in ROLE_NOUNS
        and not last.text[0].isdigit()
        and (not is_cap(last) or last.low in BASE_VERBS)
    ):
        return k - 1
    return end


def _role_frame_end(toks: Sequence[Tok], span_start: int, frm: int, end: int) -> int:
    """"Who played [the character that took the sword] in Once Upon a Time?": the work a
    role is played in attaches to the outer verb, unless the span has its own role verb."""
    for k in range(end - 2, frm - 1, -1):
        if (
            toks[k].low in {"in", "on"}
            and not any(is_verb(t) or t.text[0].isdigit() for t in toks[k + 1 : end])
            and not any(t.low in ROLE_VERBS for t in toks[span_start:k])
        ):
            return k
    return end



def role_verb_before(toks: Sequence[Tok], span_start: int) -> bool:
    return span_start > 0 and toks[span_start - 1].low in ROLE_VERBS


# ---------------------------------------------------------------------------
# Clause subjects


def _lower_subject(toks: Sequence[Tok], clause_at: int, hi: int) -> tuple[int, int] | None:
    """Subject of a clause without a name: the noun phrase next to the clause verb."""
    if clause_at < hi and toks[clause_at].low in PREPS and clause_at + 1 < hi and toks[clause_at + 1].low in REL:
        clause_at += 1
    if clause_at < hi and toks[clause_at].low in REL:
        clause_at += 1
    groups = verb_groups(toks, clause_at, hi)
    if groups:
        g0, g1 = groups[0]
        if g0 > clause_at:  # "where sushi comes from": the phrase before the verb
            a, b = clause_at, g0
        else:  # "who sang holding out for a hero": the phrase after it
            a, b = g1, hi
    else:
        a, b = clause_at, hi
    while a < b and (toks[a].low in DETS | REL | PREPS or not is_word(toks[a])):
        a += 1
    while b > a and (is_function(toks[b - 1]) and toks[b - 1].text not in {'"', "”"}):
        b -= 1
    return (a, b) if b > a else None


def clause_subject(toks: Sequence[Tok], lo: int, hi: int, runs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
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
        toks[k].text == "," or toks[k].low in REL | PREPS | PARTICLES or is_verb(toks[k]) or toks[k].low.endswith("ly")
    ):
        k += 1
    return a, k
