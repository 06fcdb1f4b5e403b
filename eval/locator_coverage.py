"""How often the text-only locator finds the first-hop span that a reference gives.

Example:
    $ python -m eval.locator_coverage --reach --out docs/locator_coverage.md
    >>> from eval.locator_coverage import coverage, span_match, token_f1
    >>> span_match("the Green performer", "Green performer."), round(token_f1("the author of X", "author of X Y"), 2)
    (True, 0.86)

Two question sets:

* **MuSiQue-Ans dev, 2-hop** (all 1,252; nothing is fitted on them): the
  reference span is what :func:`autopatch.locate.locate_from_decomposition`
  derives from the gold decomposition. Its "align" route (step 2 aligned
  around ``#1``) is independent of the parser; its "anchor" route (step 2 is
  ``"#1 >> relation"``) reuses the parser's phrase rules around the gold
  subject, so the table also reports the align-only subset.
* **bundled two-hop** (:func:`eval.twohop.generate_twohop`, when present): the
  reference is ``meta["first_hop_span"]`` (and ``meta["subject_span"]`` for
  the subject).

"finds" (exact): the two spans are equal after stripping leading
determiners, punctuation and quotes at both edges (case-insensitive).
"overlap": token F1 between the spans >= 0.8.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from autopatch.locate import (
    Location,
    UnlocatableQuestion,
    decomposition_route,
    locate_from_text,
)

__all__ = ["Case", "Report", "coverage", "span_match", "token_f1", "render_markdown", "main"]

_EDGE_WORDS = frozenset({"the", "a", "an", "this", "that", "these", "those"})
_WORD_RE = re.compile(r"\w+(?:[-.']\w+)*", re.UNICODE)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(text.replace("’", "'"))]


def _core(text: str) -> str:
    """The span without determiners/punctuation at its edges, lower-cased, spaces normalised."""
    words = _words(text)
    while words and words[0] in _EDGE_WORDS:
        words = words[1:]
    return " ".join(words)


def span_match(found: str, reference: str) -> bool:
    """Exact match after stripping determiners and punctuation at the edges."""
    return _core(found) == _core(reference) and bool(_core(reference))


def token_f1(found: str, reference: str) -> float:
    """Bag-of-words F1 between two spans (determiners at the edges ignored)."""
    a, b = _core(found).split(), _core(reference).split()
    if not a or not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Case:
    """One question with an optional reference span/subject and an optional decomposition."""

    question: str
    reference: str | None
    reference_subject: str | None = None
    decomposition: Sequence[Any] | None = None


@dataclass
class Report:
    """Counts for one question set; rates are fractions of ``total`` unless named otherwise."""

    name: str
    total: int = 0
    with_reference: int = 0
    text_located: int = 0
    text_exact: int = 0
    text_overlap: int = 0
    subject_exact: int = 0
    with_subject: int = 0
    decomp_tried: int = 0
    decomp_located: int = 0
    decomp_exact: int = 0  # only where the reference does not come from the decomposition
    decomp_scored: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    align_total: int = 0
    align_exact: int = 0
    align_overlap: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    misses: list[tuple[str, str, str]] = field(default_factory=list)


def _text_location(question: str) -> Location | None:
    try:
        return locate_from_text(question)
    except UnlocatableQuestion:
        return None


def coverage(name: str, cases: Iterable[Case], *, reference_from_decomposition: bool = False) -> Report:
    """Run both locators over ``cases``.

    With ``reference_from_decomposition`` the reference span is the one the
    decomposition locator gives (MuSiQue); otherwise ``Case.reference``.
    """
    rep = Report(name)
    for case in cases:
        rep.total += 1
        ref: str | None = case.reference
        ref_subject = case.reference_subject
        route = None
        dec = None
        if case.decomposition:
            rep.decomp_tried += 1
            try:
                dec, route = decomposition_route(case.question, case.decomposition)
            except UnlocatableQuestion:
                dec = None
            if dec is not None:
                rep.decomp_located += 1
                rep.routes[cast(str, route).split(":")[0]] += 1  # set with dec by decomposition_route
                if reference_from_decomposition:
                    ref, ref_subject = dec.span, dec.subject
        if dec is not None and case.reference is not None and not reference_from_decomposition:
            rep.decomp_scored += 1
            rep.decomp_exact += span_match(dec.span, case.reference)
        found = _text_location(case.question)
        if found is not None:
            rep.text_located += 1
            rep.rules[found.method] += 1
        if ref is None:
            continue
        rep.with_reference += 1
        exact = found is not None and span_match(found.span, ref)
        overlap = found is not None and token_f1(found.span, ref) >= 0.8
        rep.text_exact += exact
        rep.text_overlap += overlap
        if route == "align":
            rep.align_total += 1
            rep.align_exact += exact
            rep.align_overlap += overlap
        if ref_subject:
            rep.with_subject += 1
            rep.subject_exact += found is not None and span_match(found.subject, ref_subject)
        if not exact:
            rep.misses.append((case.question, ref, found.span if found else "(unlocatable)"))
    return rep


def _pct(num: int, den: int) -> str:
    return f"{100.0 * num / den:.1f}% ({num}/{den})" if den else "n/a"


def render_markdown(reports: Sequence[Report], *, show_misses: int = 0) -> str:
    """A markdown table (one column per question set) plus the rule breakdown."""
    rows: list[tuple[str, Callable[[Report], str]]] = [
        ("questions", lambda r: str(r.total)),
        ("decomposition locator succeeds", lambda r: _pct(r.decomp_located, r.decomp_tried)),
        ("… via step-2 alignment / via subject anchor",
         lambda r: f"{r.routes['align']} / {r.routes['anchor']}" if r.decomp_tried else "n/a"),
        ("questions with a reference span", lambda r: str(r.with_reference)),
        ("text locator: exact span, of those with a reference", lambda r: _pct(r.text_exact, r.with_reference)),
        ("text locator: token-F1 ≥ 0.8, of those with a reference", lambda r: _pct(r.text_overlap, r.with_reference)),
        ("text locator: exact span, of all questions", lambda r: _pct(r.text_exact, r.total)),
        ("text locator: exact, align-route references only", lambda r: _pct(r.align_exact, r.align_total)),
        ("text locator: token-F1 ≥ 0.8, align-route references only", lambda r: _pct(r.align_overlap, r.align_total)),
        ("text locator: subject exact (where a reference subject exists)", lambda r: _pct(r.subject_exact, r.with_subject)),
        ("text locator: locates something", lambda r: _pct(r.text_located, r.total)),
        ("text locator: unlocatable", lambda r: _pct(r.total - r.text_located, r.total)),
        ("decomposition locator: unlocatable", lambda r: _pct(r.decomp_tried - r.decomp_located, r.decomp_tried)),
        ("decomposition locator: exact span (independent references only)", lambda r: _pct(r.decomp_exact, r.decomp_scored)),
    ]
    header = "| metric | " + " | ".join(r.name for r in reports) + " |"
    lines = ["# Locator coverage", "", header, "|---|" + "---|" * len(reports)]
    lines += ["| " + label + " | " + " | ".join(fn(r) for r in reports) + " |" for label, fn in rows]
    lines += [
        "",
        "Exact: equal after stripping determiners and punctuation at the edges (case-insensitive).",
        "MuSiQue references come from the gold decomposition (`locate_from_decomposition`); the",
        "align-route subset is independent of the text parser, the anchor route reuses its phrase",
        "rules around the gold subject. Two-hop references are `meta[\"first_hop_span\"]`.",
        "",
        "## Text-parser rules that fired",
        "",
        "| rule | " + " | ".join(r.name for r in reports) + " |",
        "|---|" + "---|" * len(reports),
    ]
    rules = sorted({k for r in reports for k in r.rules})
    lines += ["| " + k + " | " + " | ".join(str(r.rules.get(k, 0)) for r in reports) + " |" for k in rules]
    if show_misses:
        for r in reports:
            lines += ["", f"## First {show_misses} misses: {r.name}", ""]
            lines += [f"- {q!r}: reference {ref!r}, found {got!r}" for q, ref, got in r.misses[:show_misses]]
    return "\n".join(lines) + "\n"


def _get(rec: Any, key: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        return rec.get(key, default)
    return getattr(rec, key, default)


def _span_text(question: str, value: Any) -> str | None:
    """A meta span given as text, as [start, end] offsets, or as {"text"/"start"/"end"}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        if "text" in value:
            return str(value["text"])
        return question[int(value["start"]) : int(value["end"])]
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return question[value[0] : value[1]]
    return None


def musique_cases(path: str | None = None) -> list[Case]:
    """All 2-hop MuSiQue-Ans dev questions with their decompositions."""
    from eval.datasets import load_musique

    records = load_musique(path, hops=2)
    return [Case(r.question, None, None, r.question_decomposition) for r in records]


def twohop_cases() -> list[Case] | None:
    """The bundled two-hop questions (all splits), or None when eval/twohop.py is absent."""
    try:
        from eval.twohop import generate_twohop
    except ImportError:
        return None
    cases = []
    for rec in generate_twohop():
        question = str(_get(rec, "question"))
        meta = _get(rec, "meta", {}) or {}
        decomposition = _get(rec, "question_decomposition") or None
        cases.append(
            Case(
                question,
                _span_text(question, meta.get("first_hop_span")),
                _span_text(question, meta.get("subject_span")),
                decomposition,
            )
        )
    return cases


REACH_REASONS = (("refers to the user", "the user or the conversation"),
                 ("points at context", "context the request lacks"),
                 ("long-form answer", "a long-form answer"),
                 ("stops before the relative clause", "a phrase cut before its clause"))


def reach_cost(sets: Mapping[str, Sequence[str]]) -> str:
    """A markdown table: per question set, how many questions the grammar locates and how many of those the reach
    rules (:mod:`autopatch.locate.reach`) leave alone, by reason. On two-hop sets every one is a question lost."""
    from autopatch.locate.reach import check_reach

    lines = ["## What the reach rules leave alone", "",
             "Questions the grammar locates (`locate_from_text`) that `autopatch.locate.reach.check_reach` then leaves "
             "alone, by reason. On the two-hop sets each is a question autopatch no longer patches; on the do-no-harm "
             "set, a request it no longer touches.", "",
             "| set | questions | located | left alone | " + " | ".join(label for _, label in REACH_REASONS) + " |",
             "|---|---|---|---|" + "---|" * len(REACH_REASONS)]
    for name, questions in sets.items():
        located, reasons = 0, Counter[str]()
        for question in questions:
            found = _text_location(question)
            if found is None:
                continue
            located += 1
            try:
                check_reach(found)
            except UnlocatableQuestion as why:
                reasons[next((label for key, label in REACH_REASONS if key in str(why)), "other")] += 1
        lines.append(f"| {name} | {len(questions)} | {located} | {sum(reasons.values())} | "
                     + " | ".join(str(reasons[label]) for _, label in REACH_REASONS) + " |")
    return "\n".join(lines) + "\n"


def bundled_question_sets() -> dict[str, list[str]]:
    """Every bundled question set, whole (both splits): the generator's, hand-written, MuSiQue 2-hop, do-no-harm."""
    from eval.datasets import load_musique, select_records
    from eval.twohop import generate_twohop

    return {"generated two-hop (train, dev, test)": [r.question for s in ("train", "dev", "test")
                                                     for r in generate_twohop(split=s)],
            "hand-written two-hop": [r.question for r in select_records("handwritten", hops=2)[0]],
            "MuSiQue 2-hop dev": [r.question for r in load_musique(hops=2)],
            "do-no-harm requests": [r.question for r in select_records("harm")[0]]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--musique", help="path to musique_ans_v1.0_dev.jsonl (default: shared data)")
    parser.add_argument("--misses", type=int, default=0, help="list the first N misses per set")
    parser.add_argument("--reach", action="store_true",
                        help="also count what the reach rules leave alone on every bundled question set")
    args = parser.parse_args(argv)

    reports = [coverage("MuSiQue 2-hop dev", musique_cases(args.musique), reference_from_decomposition=True)]
    two = twohop_cases()
    if two is None:
        print("eval/twohop.py not found: bundled two-hop set skipped", file=sys.stderr)
    else:
        reports.append(coverage("bundled two-hop", two))
    text = render_markdown(reports, show_misses=args.misses)
    if args.reach:
        text += "\n" + reach_cost(bundled_question_sets())
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
