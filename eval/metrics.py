"""Answer scoring for closed-book QA: normalization, EM/F1/contains, extraction, statistics.

Example:
    >>> from eval.metrics import extract_answer, exact_match, f1_score, contains
    >>> pred = extract_answer(" Rome.\\nQ: What is the capital of Spain?")
    >>> pred
    'Rome'
    >>> exact_match(pred, ["Rome", "Roma"]), f1_score("the city of Rome", ["Rome"])
    (True, 0.5)
    >>> contains("I think it is Rome, Italy.", ["Rome"])
    True

Normalization (:func:`normalize_answer`) is the SQuAD one: lowercase, remove
punctuation, drop the articles "a", "an", "the", collapse whitespace. Golds
that normalize to the empty string never match anything.

Answer extraction rule (:func:`extract_answer`), applied to the raw text a
model generated after the prompt:

1. If ``cot=True`` (chain-of-thought methods):

   a. a line of the form "Answer: X" (the chat CoT format's last line;
      case-insensitive, "Final answer:" too): the answer is X of the LAST such
      line, up to a sentence end;
   b. else, if the text contains "the answer is" (the base-model
      demonstrations' "So the answer is X.", and Kojima's stage-2 trigger
      "Therefore, the answer is"), the answer is the text after the LAST
      occurrence, up to the next newline or period (a leading ":" is dropped);
   c. else, if the last sentence states "... is X" (a chat model that answers
      its reasoning in one sentence: "The capital of the country where the
      Uffizi is located is Rome."), the answer is X after the last "is",
      "are", "was" or "were";
   d. otherwise continue with step 2 on the whole text.
2. Leading whitespace (including blank lines) is skipped; the answer is the
   text up to the first newline, trimmed.
3. A leading "A:" or "Answer:" (case-insensitive) is stripped.
4. If the line goes on with a new "Q:" (the model starts the next few-shot
   question on the same line), the line is cut at the first sentence end
   (".", "!" or "?" followed by whitespace) or at the "Q:", whichever comes
   first.
5. Surrounding whitespace and a trailing "." are removed.

Statistics: :func:`bootstrap_ci` (deterministic percentile bootstrap of a
mean) and :func:`mcnemar` (exact two-sided McNemar test on paired
correctness, computed with :func:`math.comb`; no scipy needed).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from autopatch.errors import ConfigError

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "contains",
    "extract_answer",
    "bootstrap_ci",
    "mcnemar",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^[ \t*#]*(?:final\s+)?answer[ \t*]*:[ \t*]*(.*)$", re.IGNORECASE | re.MULTILINE)
_ANSWER_PREFIX = re.compile(r"^(?:answer|a)\s*:\s*", re.IGNORECASE)
_NEXT_Q = re.compile(r"\bQ\s*:")
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def normalize_answer(s: str) -> str:
    """``normalize_answer("The  Eiffel-Tower!") == "eiffeltower"`` (SQuAD normalization).

    Lowercase, remove ASCII punctuation, drop the articles a/an/the as whole
    words, collapse runs of whitespace to one space and trim.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _gold_list(golds: str | Iterable[str]) -> list[str]:
    """Normalized, non-empty golds (a single string counts as one gold)."""
    items = [golds] if isinstance(golds, str) else list(golds)
    normed = (normalize_answer(g) for g in items)
    return [g for g in normed if g]


def exact_match(pred: str, golds: str | Iterable[str]) -> bool:
    """``exact_match("the Rome", ["Rome"]) is True``: normalized prediction equals some gold."""
    p = normalize_answer(pred)
    return any(p == g for g in _gold_list(golds))


def _token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: str | Iterable[str]) -> float:
    """``f1_score("New York City", ["New York"]) == 0.8``: SQuAD token F1, best over golds.

    Returns 0.0 when there is no non-empty gold or the prediction is empty.
    """
    pred_tokens = normalize_answer(pred).split()
    if not pred_tokens:
        return 0.0
    return max((_token_f1(pred_tokens, g.split()) for g in _gold_list(golds)), default=0.0)


def contains(continuation: str, golds: str | Iterable[str]) -> bool:
    """``contains("It is Rome, of course", ["Rome"]) is True``: some gold occurs as whole words.

    Both sides are normalized; a gold matches when its token sequence appears
    contiguously in the continuation's tokens ("rome" is not found in
    "romeo"). An empty gold never matches.
    """
    padded = f" {normalize_answer(continuation)} "
    return any(f" {g} " in padded for g in _gold_list(golds))


def _strip_answer(text: str) -> str:
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


_COPULA = re.compile(r"\b(?:is|are|was|were)\s+", re.IGNORECASE)


def _extract_copula(continuation: str) -> str | None:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", continuation.strip()) if s.strip()]
    if not sentences:
        return None
    last = sentences[-1]
    found = list(_COPULA.finditer(last))
    return _strip_answer(last[found[-1].end():]) if found else None


def _extract_cot(continuation: str) -> str | None:
    lines = [m.group(1) for m in _ANSWER_LINE.finditer(continuation) if m.group(1).strip(" *")]
    if lines:
        line = lines[-1].strip(" *")
        end = _SENTENCE_END.search(line)
        return _strip_answer(line[: end.start()] if end else line)
    matches = list(_ANSWER_IS.finditer(continuation))
    if not matches:
        return _extract_copula(continuation)
    tail = continuation[matches[-1].end() :]
    tail = tail.lstrip(" \t:")
    cut = min((i for i in (tail.find("\n"), tail.find(".")) if i >= 0), default=len(tail))
    return _strip_answer(tail[:cut])


def extract_answer(continuation: str, *, cot: bool = False) -> str:
    """``extract_answer(" Answer: Paris\\nQ: ...") == "Paris"`` (the rule is in the module docstring).

    With ``cot=True``: ``extract_answer("Rome is in Italy. So the answer is Rome.", cot=True) == "Rome"``.
    """
    if cot:
        found = _extract_cot(continuation)
        if found is not None:
            return found
    text = continuation.lstrip()
    line = text.split("\n", 1)[0].strip()
    line = _ANSWER_PREFIX.sub("", line, count=1)
    next_q = _NEXT_Q.search(line)
    if next_q is not None:
        end = _SENTENCE_END.search(line, 0, next_q.start())
        line = line[: end.start() if end is not None else next_q.start()]
    return _strip_answer(line)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """``bootstrap_ci([1, 0, 1, 1]) -> (low, high)``: percentile bootstrap CI of the mean.

    Deterministic for a given ``seed`` (numpy ``default_rng``). Booleans are
    fine (the mean is then an accuracy). Raises ``ValueError`` on an empty
    input or an ``alpha`` outside (0, 1).
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError("bootstrap_ci needs a non-empty 1-D sequence of values")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    means = arr[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, float | int]:
    """``mcnemar(base_ok, patched_ok)["p_value"]``: exact two-sided McNemar test.

    ``b_fixed`` counts items system A got wrong and B right, ``b_broken`` the
    reverse. Under the null both directions are equally likely, so with
    ``n = b_fixed + b_broken`` discordant pairs the p-value is
    ``min(1, 2 * P[Binomial(n, 1/2) <= min(b_fixed, b_broken)])``;
    ``statistic`` is that minimum. With no discordant pair the p-value is 1.
    """
    if len(a_correct) != len(b_correct):
        raise ConfigError(f"paired inputs differ in length: {len(a_correct)} vs {len(b_correct)}")
    fixed = sum(1 for a, b in zip(a_correct, b_correct) if not a and b)
    broken = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    n = fixed + broken
    k = min(fixed, broken)
    if n == 0:
        p_value = 1.0
    else:
        tail = sum(math.comb(n, i) for i in range(k + 1))
        # Exact integer arithmetic: 2**n overflows floats only for the division, which Python rounds correctly.
        p_value = min(1.0, 2 * tail / 2**n)
    return {"b_fixed": fixed, "b_broken": broken, "statistic": k, "p_value": p_value}


_NEXT_TURN = re.compile(r"\n\s*\n|\nQ\s*:")


def answer_region(continuation: str) -> str:
    """The continuation up to where the model starts a new few-shot turn (a blank line or ``\\nQ:``).

    ``contains`` is measured here, so a gold string in a question the model
    invents afterwards does not count.
    """
    match = _NEXT_TURN.search(continuation.lstrip())
    text = continuation.lstrip()
    return text[: match.start()] if match else text


def score_continuation(continuation: str, golds: Iterable[str], *, cot: bool = False) -> dict[str, float | str]:
    """``{"answer", "em", "f1", "contains"}`` for one continuation under the one extraction rule.

    Example:
        >>> score_continuation(" Rome\\n\\nQ: What is the capital of Spain?\\nA: Madrid", ["Rome"])
        {'answer': 'Rome', 'em': 1.0, 'f1': 1.0, 'contains': 1.0}
    """
    golds = list(golds)
    answer = extract_answer(continuation, cot=cot)
    region = continuation if cot else answer_region(continuation)
    return {
        "answer": answer,
        "em": float(exact_match(answer, golds)),
        "f1": float(f1_score(answer, golds)),
        "contains": float(contains(region, golds)),
    }
