"""Several committed runs side by side: one row per method, one column per run (EM, vs vanilla, tokens).

Example:
    $ python -m eval.compare docs/runs/twohop_test docs/runs/qwen05_twohop_test docs/runs/qwen15_twohop_test

Reads each run's ``summary.json`` and ``config.json`` (written by ``autopatch eval``) and prints a markdown
table: per method and run, EM with its 95% interval, the McNemar fixed / broken counts against that run's
vanilla, and the mean generated tokens; "–" where a run lacks the method. Oracle rows come last and are
labelled. Nothing is recomputed, so the table always agrees with the reports it cites.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KIND_ORDER = {"baseline": 0, "patch": 1, "control": 2, "diagnostic": 3, "oracle": 4}


def _load(run: Path) -> tuple[str, dict]:
    try:
        summary = json.loads((run / "summary.json").read_text())
        config = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{run}: not a finished `autopatch eval` run ({err}); run it, or rescore it "
                         f"(python -m eval.rescore {run}).") from None
    name = config.get("model") or "gemma-3-270m"
    dataset = config.get("dataset", "twohop")
    plain = dataset == "twohop" and config.get("split") in (None, "test")
    where = "" if plain else f", {dataset} {config.get('split', '')}".rstrip()
    return f"{name}{where} (n={summary.get('n_questions')})", summary


def _cell(stats: dict | None) -> str:
    if not stats:
        return "–"
    same = f", {stats['identical']:.1%} identical" if stats.get("identical") is not None else ""
    if stats.get("em") is None:  # a run of requests without golds: only how much stayed the model's own
        return same.removeprefix(", ") or "–"
    lo, hi = stats.get("em_ci", [float("nan")] * 2)
    vs = stats.get("vs_vanilla")
    versus = f", {vs['fixed']}/{vs['broken']}" if vs else ""
    return f"{stats['em']:.3f} [{lo:.2f}, {hi:.2f}]{versus}, {stats.get('mean_tokens', float('nan')):.1f} tok{same}"


def compare_markdown(runs: list[Path]) -> str:
    loaded = [_load(run) for run in runs]
    kinds: dict[str, str] = {}
    for _, summary in loaded:
        for method, entry in summary["methods"].items():
            kinds.setdefault(method, entry.get("kind", "unknown"))
    methods = sorted(kinds, key=lambda m: (KIND_ORDER.get(kinds[m], 5), m != "vanilla", m))
    lines = ["| method | kind | " + " | ".join(name for name, _ in loaded) + " |",
             "|---|---|" + "---|" * len(loaded)]
    for method in methods:
        label = f"*{method}* (oracle)" if kinds[method] == "oracle" else method
        cells = [_cell(summary["methods"].get(method, {}).get("all")) for _, summary in loaded]
        lines.append(f"| {label} | {kinds[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nCells: EM [95% CI] (on the questions with a gold), fixed/broken against that run's "
                               "vanilla, mean generated tokens, and where a run has it the share of outputs identical "
                               "to vanilla's.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Committed runs side by side.")
    parser.add_argument("runs", nargs="+", help="run directories written by `autopatch eval`")
    args = parser.parse_args(argv)
    sys.stdout.write(compare_markdown([Path(r) for r in args.runs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
