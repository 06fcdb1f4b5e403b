"""Decomposition locator: align step 2 of a MuSiQue-style decomposition against the question.

:func:`decomposition_route` finds the span that lines up with ``#1`` in step 2
("align") or, failing that, the parser candidate around the step-1 subject
("anchor:<rule>").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from difflib import SequenceMatcher
from functools import lru_cache
from typing import Any

from autopatch.errors import InputError
from autopatch.locate.lexicon import (
    AUX,
    BE,
    CONNECTORS,
    DETS,
    DO,
    HAVE,
    PREPS,
    REL,
    ROLE_NOUNS,
    STOP_FOR_ALIGN,
    VERB_FORMS,
)
from autopatch.locate.location import (
    SLOT,
    Location,
    UnlocatableQuestion,
    check_question,
    make_location,
)
from autopatch.locate.phrases import is_noun_like, verb_groups
from autopatch.locate.rules import Cand, choose_candidate, find_candidates
from autopatch.locate.tokens import (
    Tok,
    entity_runs,
    is_base_verb,
    is_function,
    is_participle,
    is_verb,
    is_word,
    question_end_index,
    tokenize,
)


def _step_text(step: Any) -> str:
    if isinstance(step, str):
        return step
    text = step.get("question") if isinstance(step, Mapping) else getattr(step, "question", None)
    if not isinstance(text, str):
        raise InputError(
            f"a decomposition step must be a string, a mapping with a 'question' string or an object "
            f"with a .question string; got {step!r}"
        )
    return text


@lru_cache(maxsize=65536)
def _sim(a: str, b: str) -> float:
    """Similarity of two normalised words: 1 equal, 0.9 same lemma/stem, ~0.7-0.9 spelling variants, else 0."""
    if a == b:
        return 1.0
    base_a, base_b = VERB_FORMS.get(a), VERB_FORMS.get(b)
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
    return 0.5 if low in STOP_FOR_ALIGN else 1.0


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


def _align_span(q_toks: Sequence[Tok], step2: str) -> tuple[int, int, float] | None:
    """Token span of the question that lines up with "#1" in ``step2`` and the match quality."""
    s_toks = tokenize(step2.replace("#1", " HASHONE "))
    idx = [k for k, t in enumerate(s_toks) if t.text == "HASHONE"]
    if len(idx) != 1:
        return None
    h = idx[0]
    q = [t.low for t in q_toks]
    pre = [t.low for t in s_toks[:h]]
    suf = [t.low for t in s_toks[h + 1 :] if t.text not in {"?", "."}]
    qn = question_end_index(q_toks)
    q = q[:qn]
    p_scores = _align_scores(q, pre)
    s_scores = _align_scores(q[::-1], suf[::-1])  # s_scores[r] : suffix aligned to last r tokens
    best: tuple[float, int, int] | None = None
    for a in range(qn):
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


def _find_phrase(q_toks: Sequence[Tok], phrase: str, lo: int = 0, hi: int | None = None) -> tuple[int, int, float] | None:
    """Best fuzzy occurrence of ``phrase`` in question tokens [lo, hi) as (start, end, score)."""
    hi = len(q_toks) if hi is None else hi
    p = [t.low for t in tokenize(phrase) if is_word(t) or t.text in {"&"}]
    if not p:
        return None
    best: tuple[int, int, float] | None = None
    for a in range(lo, hi):
        if not is_word(q_toks[a]):
            continue
        for b in range(a + 1, min(hi, a + len(p) + 3) + 1):
            if not is_word(q_toks[b - 1]):
                continue
            window = [t.low for t in q_toks[a:b] if is_word(t) or t.text in {"&"}]
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


def _trim_span(toks: Sequence[Tok], a: int, b: int) -> tuple[int, int]:
    """Cut an aligned span to a noun phrase: no leading verb/preposition, no dangling edges."""
    while a < b:
        tok = toks[a]
        if (
            (not is_word(tok) and tok.text not in {'"', "“"})
            or tok.low in PREPS | AUX | {"and", "or"}
            or (is_verb(tok) and tok.low not in ROLE_NOUNS and b - a > 1)
        ):
            a += 1
        elif tok.low in REL and a > 0 and not is_function(toks[a - 1]) and not is_verb(toks[a - 1]):
            # "the city [where X's spouse] was born": the relative word hangs off a noun outside
            a += 1
        else:
            break
    name_ends = {end for _, end in entity_runs(toks)}
    while b > a and (
        (not is_word(toks[b - 1]) and toks[b - 1].text not in {'"', "”"} and b not in name_ends)
        or toks[b - 1].low in DETS | AUX | {"and", "or"}
        or (toks[b - 1].low == "'s" and b not in name_ends)  # but "McDonald's"
        # "did [the author of X] die": a bare verb after do-support is the outer verb
        or (b - a > 1 and a > 0 and toks[a - 1].low in DO and is_base_verb(toks[b - 1]))
        # "is [the maker of X] based" when step 2 says "headquartered": the outer participle
        or (
            b - a > 1
            and a > 0
            and toks[a - 1].low in BE
            and is_participle(toks[b - 1])
            and toks[b - 2].low not in BE | HAVE
        )
    ):
        b -= 1
    return a, b


def _subject_from_question_step(q_toks: Sequence[Tok], step1: str, a: int, b: int) -> tuple[int, int] | None:
    """Subject of a question-form step 1: the part of the span that step 1 also mentions."""
    s1 = [t.low for t in tokenize(step1) if is_word(t)]
    best: tuple[float, int, int, int] | None = None
    for x, y in entity_runs(q_toks):
        if not (a <= x and y <= b):
            continue
        words = [t.low for t in q_toks[x:y] if is_word(t) and t.low not in CONNECTORS]
        if not words:
            continue
        found = sum(max((_sim(w, v) for v in s1), default=0.0) for w in words) / len(words)
        key = (found, y - x, x, y)
        if found >= 0.5 and (best is None or key > best):
            best = key
    if best is not None:
        x, y = best[2], best[3]
        # "the Philly cheesesteak": plain words after the name that step 1 also has
        while y < b and is_word(q_toks[y]) and not is_function(q_toks[y]) and not is_verb(q_toks[y]) and q_toks[y].low in s1:
            y += 1
        return x, y
    # No shared name: the longest run of words shared with step 1, outside the head noun.
    head_end = a
    while head_end < b and not (q_toks[head_end].low in REL or is_verb(q_toks[head_end]) or q_toks[head_end].low in PREPS):
        head_end += 1
    best_run: tuple[int, int] | None = None
    for x in range(head_end, b):
        for y in range(x + 1, b + 1):
            if is_function(q_toks[x]) or is_function(q_toks[y - 1]) or is_verb(q_toks[x]):
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
    check_question(question)
    steps = [_step_text(s) for s in decomposition]
    if len(steps) != 2:
        raise UnlocatableQuestion(question, f"decomposition has {len(steps)} steps, only two-hop is supported")
    step1, step2 = steps
    if "#1" not in step2:
        raise UnlocatableQuestion(question, "step 2 of the decomposition does not mention #1")
    toks = tokenize(question)
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
                        relation = next((c.head for c in find_candidates(toks) if (c.start, c.end) == (a, b)), None)
                    loc = make_location(question, toks, a, b, subj, second, relation, "decomposition")
                    return loc, "align"
    # Step 2 is "#1 >> relation" or did not align: find the phrase around the subject.
    if entity is not None:
        if ent_hit is None:
            raise UnlocatableQuestion(question, f"the step-1 entity {entity!r} does not occur in the question")
        anchor = (ent_hit[0], ent_hit[1])
    else:
        anchor = None
    cands = find_candidates(toks)
    if anchor is not None:
        cands = [c for c in cands if c.start <= anchor[0] and anchor[1] <= c.end]
        cands = [
            Cand(c.start, c.end, anchor, c.head, c.rule, c.rank) for c in cands
        ]
    else:
        # question-form step 1: the candidate sharing most words with it
        step_words = {t.low for t in tokenize(step1) if not is_function(t)}
        scored = []
        for c in cands:
            words = {t.low for t in toks[c.start : c.end] if not is_function(t)}
            overlap = len(words & step_words) / max(1, len(words))
            if overlap >= 0.3:
                scored.append(c)
        cands = scored
    cand = choose_candidate(cands)
    if cand is None:
        raise UnlocatableQuestion(question, "no phrase of the question lines up with step 1 of the decomposition")
    subj = cand.subj
    if anchor is None:
        subj = _subject_from_question_step(toks, step1, cand.start, cand.end) or cand.subj
    loc = make_location(question, toks, cand.start, cand.end, subj, None, relation or cand.head, "decomposition")
    return loc, "anchor:" + cand.rule


def _clause_complete(toks: Sequence[Tok], a: int, b: int) -> bool:
    """A span with a relative word must also hold that clause's verb ("the country where
    Meteora [is located]" when step 2 repeats "located" outside the slot)."""
    rel = next((k for k in range(a + 1, b) if toks[k].low in REL and is_noun_like(toks, k - 1)), None)
    return rel is None or bool(verb_groups(toks, rel + 1, b))


def _subject_for_span(
    toks: Sequence[Tok],
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
