"""Tokenization and token-level predicates: words, names (entity runs), quotes, verbs."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from autopatch.locate.lexicon import (
    AUX,
    BASE_VERBS,
    CONNECTORS,
    DETS,
    IRREGULAR_PARTS,
    NOT_NAME_START,
    PARTICIPLE_EXTRA,
    PREPS,
    QUOTES,
    REL,
    SINGLE_QUOTES,
    VERB_FORMS,
    WH,
    looks_past,
    verbish,
)

# Words keep inner hyphens/dots/apostrophes ("Hsiao-wen", "U.S", "O'Neal") but a
# possessive "'s" is its own token so that "Seether's" -> "Seether" + "'s".
_TOKEN_RE = re.compile(
    r"(?:[A-Z]\.)+(?=\s)|(?:St|Mt|Ft|Jr|Sr|Dr|Mr|Mrs|Ms)\.(?=\s)"  # "M. King Hubbert", "St. Matthew"
    r"|\w+(?:[-–.&]\w+)*(?:['’](?![sS]\b)\w+)*|['’][sS]\b|\S"
)


@dataclass(frozen=True)
class Tok:
    text: str
    start: int
    end: int
    low: str  # lower-cased, accents stripped, curly quotes straightened


def _norm(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return stripped.lower().replace("’", "'").replace("–", "-").replace("—", "-")


def tokenize(text: str) -> list[Tok]:
    return [Tok(m.group(), m.start(), m.end(), _norm(m.group())) for m in _TOKEN_RE.finditer(text)]


def is_word(tok: Tok) -> bool:
    return tok.text[0].isalnum()


def is_cap(tok: Tok) -> bool:
    """Capitalised, a number, or camel-cased ("iPhone")."""
    return tok.text[0].isdigit() or any(ch.isupper() for ch in tok.text)


def question_end_index(toks: Sequence[Tok]) -> int:
    end = len(toks)
    while end > 0 and toks[end - 1].text in {"?", ".", "!"}:
        end -= 1
    return end


# ---------------------------------------------------------------------------
# Word classes


def is_verb(tok: Tok) -> bool:
    return not is_cap(tok) and (tok.low in AUX or verbish(tok.low))


def is_base_verb(tok: Tok) -> bool:
    return tok.low in BASE_VERBS and not is_cap(tok)


def is_participle(tok: Tok) -> bool:
    if is_cap(tok):
        return False
    return tok.low in PARTICIPLE_EXTRA or looks_past(tok.low) or (
        tok.low in VERB_FORMS and (tok.low.endswith(("ed", "en", "wn")) or tok.low in IRREGULAR_PARTS)
    )


def is_function(tok: Tok) -> bool:
    return (
        tok.low in DETS
        or tok.low in WH
        or tok.low in AUX
        or tok.low in PREPS
        or tok.low in REL
        or tok.low in {"and", "or", "'s", "'", "not"}
        or not is_word(tok)
    )


# ---------------------------------------------------------------------------
# Entities (subjects) in text


def entity_runs(toks: Sequence[Tok]) -> list[tuple[int, int]]:
    """Maximal runs of capitalised words (joined by "of", "the", "and", "-", ...) and quoted titles."""
    runs: list[tuple[int, int]] = []
    n = len(toks)
    i = 0
    while i < n:
        tok = toks[i]
        if tok.text in QUOTES:
            close = next((k for k in range(i + 1, n) if toks[k].text in QUOTES), None)
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
        if is_word(tok) and is_cap(tok) and not (i == 0 and tok.low in NOT_NAME_START and tok.low != "the"):
            if i == 0 and tok.low == "the" and not (i + 1 < n and is_cap(toks[i + 1])):
                i += 1
                continue
            j = i + 1
            while j < n:
                if is_word(toks[j]) and is_cap(toks[j]):
                    j += 1
                    continue
                # connectors only count when a capitalised word follows them
                k = j
                while k < n and toks[k].low in CONNECTORS and k - j < 3:
                    k += 1
                joins = k > j and k < n and is_word(toks[k]) and is_cap(toks[k]) and toks[k].low not in WH
                # "Rebellion of 1857" but not "Satyagraha on 4th"
                if joins and toks[k].text[0].isdigit() and toks[j].low not in {"of", "-", ":"}:
                    joins = False
                if joins:
                    j = k
                    continue
                if toks[j].text == "," and j + 1 < n and is_cap(toks[j + 1]) and toks[j + 1].low not in WH:
                    j += 1
                    continue
                # "The Good, the Bad and the Ugly"
                if toks[j].text == "," and j + 2 < n and toks[j + 1].text == "the" and is_cap(toks[j + 2]):
                    j += 2
                    continue
                if toks[j].text == "(":  # "Country Girl (Shake It for Me)"
                    close = next((k for k in range(j + 1, min(n, j + 9)) if toks[k].text == ")"), None)
                    if close is not None and any(is_cap(t) for t in toks[j + 1 : close]):
                        j = close + 1
                        continue
                break
            # "McDonald's is ...", "the home country of McDonald's?": an "'s" owning nothing is the name's
            if j < n and toks[j].low == "'s" and (
                j + 1 == n or not is_word(toks[j + 1]) or toks[j + 1].low in AUX | PREPS | WH
            ):
                j += 1
            runs.append((i, j))
            i = j
            continue
        i += 1
    return runs


def _opens_single_quote(toks: Sequence[Tok], i: int) -> bool:
    tok = toks[i]
    return (
        tok.text in {"'", "‘"}
        and (i == 0 or toks[i - 1].end < tok.start)
        and i + 1 < len(toks)
        and toks[i + 1].start == tok.end
        and is_word(toks[i + 1])
    )


def _closes_single_quote(toks: Sequence[Tok], k: int) -> bool:
    tok = toks[k]
    return (
        tok.text in {"'", "’"}
        and toks[k - 1].end == tok.start
        and (k + 1 == len(toks) or toks[k + 1].start > tok.end or not is_word(toks[k + 1]))
    )


def anchor_bounds(toks: Sequence[Tok], a: int, b: int) -> tuple[int, int]:
    """Token bounds of a name including its quotes, if quoted."""
    quotes = QUOTES | SINGLE_QUOTES
    if a > 0 and b < len(toks) and toks[a - 1].text in quotes and toks[b].text in quotes:
        return a - 1, b + 1
    return a, b
