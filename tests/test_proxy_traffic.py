"""eval.proxy_traffic: the summary counts identical answers, located, screened and decomposed requests, and EM."""

from __future__ import annotations

from eval.proxy_traffic import summarize


def _line(name, i, direct, proxy, *, located=False, passed=None, patched=False, golds=()):
    return {"set": name, "id": f"q{i}", "golds": list(golds), "located": located,
            "screen_score": None if passed is None else (0.9 if passed else 0.1), "screen_passed": passed,
            "direct": {"text": direct, "report": None}, "proxy": {"text": proxy, "report": {"patched": patched}}}


def test_the_summary_counts_what_the_proxy_changed():
    lines = [_line("harm", 0, "Paris", "Paris"),
             _line("harm", 1, "a poem", "a poem", located=True, passed=False),
             _line("harm", 2, "Watson", "Holmes", located=True, passed=True, patched=True, golds=["Watson"]),
             _line("handwritten", 0, "Paris", "Rome", located=True, passed=True, patched=True, golds=["Rome"])]
    table = summarize(lines, ["harm", "handwritten"])
    assert "| harm | 3 | 0.667 (2) | 2 | 1 | 1 | 1.000 → 0.000 (0/1, p=1; n=1) | 1.000 → 0.000 |" in table
    assert "| handwritten | 1 | 0.000 (0) | 1 | 1 | 1 | 0.000 → 1.000 (1/0, p=1; n=1) | 0.000 → 1.000 |" in table
