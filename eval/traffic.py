"""The three kinds of questions per model, side by side: do no harm, hand-written two-hop, generated two-hop.

Example:
    $ python -m eval.traffic gemma=docs/runs/harm_test_gemma,docs/runs/handwritten_test_gemma,docs/runs/twohop_screened_gemma

Each argument is ``MODEL=HARM_RUN,HANDWRITTEN_RUN,TWOHOP_RUN`` (committed ``autopatch eval`` run directories;
a run may be left empty). Reads their ``summary.json`` only, so the table always agrees with the reports it cites:

* do no harm: the share of ``autopatch``'s outputs identical to vanilla's, on all requests and on those the
  locator reads (where the screen decides), and on single-hop questions (kinds ``single-hop`` and
  ``relative``) EM of vanilla and autopatch;
* hand-written two-hop and generated two-hop: EM of vanilla, ``decompose`` and ``autopatch`` with autopatch's
  fixed/broken against vanilla and McNemar p.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _summary(run: str) -> dict | None:
    if not run:
        return None
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no summary.json (not a finished `autopatch eval` run)")
    return json.loads(path.read_text())


def _em(summary: dict | None, method: str, subset: str = "all") -> dict | None:
    if summary is None:
        return None
    return (summary["methods"].get(method) or {}).get(subset)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _single_hop(summary: dict | None, method: str) -> str:
    """EM on the single-hop kinds, pooled by their sizes."""
    if summary is None:
        return "–"
    total = n = 0.0
    for kind in ("single-hop", "relative"):
        stats = _em(summary, method, f"kind:{kind}")
        if stats and stats.get("em") is not None:
            total += stats["em"] * stats["n_gold"]
            n += stats["n_gold"]
    return _fmt(total / n) if n else "–"


def _two_hop(summary: dict | None) -> str:
    if summary is None:
        return "–"
    van, dec, auto = (_em(summary, m) or {} for m in ("vanilla", "decompose", "autopatch"))
    vs = auto.get("vs_vanilla") or {}
    versus = f" ({vs['fixed']}/{vs['broken']}, p={vs['p_value']:.2g})" if vs else ""
    return f"{_fmt(van.get('em'))} / {_fmt(dec.get('em'))} / {_fmt(auto.get('em'))}{versus}"


def traffic_markdown(models: list[tuple[str, list[str]]]) -> str:
    lines = ["| model | do no harm: identical (all / located) | single-hop EM vanilla → autopatch | "
             "hand-written two-hop: vanilla / decompose / autopatch | generated two-hop: vanilla / decompose / autopatch |",
             "|---|---|---|---|---|"]
    for name, runs in models:
        harm, hand, twohop = (_summary(r) for r in (runs + ["", "", ""])[:3])
        auto = _em(harm, "autopatch") or {}
        located = _em(harm, "autopatch", "located") or {}
        same = f"{_fmt(auto.get('identical'))} / {_fmt(located.get('identical'))} (n={auto.get('n', '–')}/" \
               f"{located.get('n', '–')})" if harm else "–"
        lines.append(f"| {name} | {same} | {_single_hop(harm, 'vanilla')} → {_single_hop(harm, 'autopatch')} | "
                     f"{_two_hop(hand)} | {_two_hop(twohop)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Three kinds of questions per model, from committed runs.")
    parser.add_argument("models", nargs="+", help="MODEL=HARM_RUN,HANDWRITTEN_RUN,TWOHOP_RUN")
    args = parser.parse_args(argv)
    models = []
    for spec in args.models:
        name, _, runs = spec.partition("=")
        models.append((name, runs.split(",")))
    sys.stdout.write(traffic_markdown(models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
