"""Rescore a run's lines with the current answer-extraction rule, without generating anything again.

Example:
    $ python -m eval.rescore runs/twohop_test          # rewrites answer/em/f1/contains, then the report

The continuations are kept as generated; only the fields derived from them by
:func:`eval.metrics.score_continuation` are recomputed (with the CoT rule for
CoT methods), each line is sealed again (:mod:`eval.integrity`), the old file
is kept as ``<name>.bak``, and ``summary.json``/``report.md`` are rewritten.
Use it when the extraction rule changes, so that every row of a table is
scored by the same rule. A damaged line stops it (``autopatch eval --repair`` first).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from eval.integrity import read_checked, seal
from eval.methods import METHODS
from eval.metrics import score_continuation

SCORED = ("answer", "em", "f1", "contains")


def rescore_file(path: Path) -> int:
    """Recompute the scored fields of every line of ``path``; return how many lines changed."""
    rows = read_checked(path)
    changed = 0
    out = []
    for row in rows:
        method = METHODS.get(row["method"])
        cot = bool(method and method.cot)
        fresh = score_continuation(row.get("continuation", ""), row.get("golds", []), cot=cot)
        if any(row.get(k) != fresh[k] for k in SCORED):
            changed += 1
        out.append(json.dumps(seal({**{k: v for k, v in row.items() if k != "sha256"}, **fresh})) + "\n")
    if changed:
        os.replace(path, path.with_name(path.name + ".bak"))
        path.write_text("".join(out))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rescore a run with the current answer-extraction rule.")
    parser.add_argument("run", help="a run directory written by `autopatch eval`")
    args = parser.parse_args(argv)
    out = Path(args.run)
    files = sorted(out.glob("results*.jsonl"))
    if not files:
        parser.error(f"{out} holds no results*.jsonl")
    for path in files:
        print(f"{path}: {rescore_file(path)} line(s) rescored")
    from eval.report import write_report

    config_path = out / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    command = f"python -m eval.rescore {args.run}"
    commands = [*(c for c in config.get("commands", []) if c != command), command]
    if config_path.exists():
        config_path.write_text(json.dumps({**config, "commands": commands}, indent=2) + "\n")
    write_report(out, "\n".join(commands))
    print(f"wrote {out}/summary.json and report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
