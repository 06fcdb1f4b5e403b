"""How many located rows of a run the two-hop screen passed, from the run's own reports.

Example:
    $ python -m eval.screen_pass docs/runs/harm_test_gemma docs/runs/handwritten_test_gemma

Reads ``autopatch``'s lines (or ``--method``'s) and counts, per run, the rows the locator read, those whose screen
score reached the threshold (the report's ``screen_passed``), and those patched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.runner import iter_methods_rows, read_results


def _rejected(report: dict) -> bool:
    """Whether the screen turned the row away: the report's ``screen_passed``; runs written before that field
    existed say it only in the reason ("screen: P(two-hop question)=0.123 < 0.500: left alone")."""
    if "screen_passed" in report:
        return report["screen_passed"] is False
    return report["reason"].startswith("screen:") and "<" in report["reason"].split(";")[0]


def screen_counts(run: Path, method: str = "autopatch") -> dict[str, int]:
    rows = dict(iter_methods_rows(read_results(run))).get(method, {})
    located = [r for r in rows.values() if (r.get("report") or {}).get("located")]
    rejected = [r for r in located if _rejected(r["report"])]
    return {"rows": len(rows), "located": len(located), "passed": len(located) - len(rejected),
            "patched": sum(1 for r in rows.values() if r.get("patched"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rows the two-hop screen passed, per run.")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--method", default="autopatch")
    args = parser.parse_args(argv)
    for run in args.runs:
        c = screen_counts(Path(run), args.method)
        print(f"{run}: {c['located']} of {c['rows']} located, {c['passed']} passed the screen, {c['patched']} patched")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
