"""Choose a model's decomposer on a calibration run, and ship it in the model's profile.

Example:
    $ python -m eval.choose_decomposer docs/runs/handwritten_calib_qwen1.5b \\
          --profile autopatch/profiles/qwen2.5-coder-1.5b-instruct/profile.json

The run must be a calibration split (never a test split) with ``decompose`` (the grammar's location),
``decompose-model`` and ``decompose-both``: always-decompose with each reader, so the reader is judged on its
own, not through a gate. The decomposer with the highest EM wins; a tie goes to the cheaper one (the grammar
costs no model call, ``both`` calls the model only where the grammar reads nothing). ``--profile`` writes the
choice into the profile's ``decomposer`` field (and its note), which is what ``AutoPatcher(model, tok)`` then
uses (:mod:`autopatch.resolve`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.metrics import mcnemar
from eval.runner import read_results

# Cheapest first: the order that breaks ties.
READERS = {"grammar": "decompose", "both": "decompose-both", "model": "decompose-model"}


def choose(run: Path) -> tuple[str, dict[str, float], str]:
    """``(decomposer, EM per decomposer, why)`` from a calibration run directory."""
    config = json.loads((run / "config.json").read_text())
    if config.get("split") in (None, "all", "test"):
        raise SystemExit(f"{run}: a decomposer is chosen on a calibration split, not on {config.get('split')!r}")
    rows = read_results(run)
    by_method: dict[str, dict[str, bool]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["id"]] = bool(row["em"])
    missing = [m for m in READERS.values() if m not in by_method]
    if missing:
        raise SystemExit(f"{run}: no {', '.join(missing)} lines; run `autopatch eval --split calib --methods "
                         f"{','.join(READERS.values())}`")
    ids = sorted(set.intersection(*(set(by_method[m]) for m in READERS.values())))
    em = {name: sum(by_method[m][i] for i in ids) / len(ids) for name, m in READERS.items()}
    best = max(READERS, key=lambda name: em[name])  # max keeps the first (cheapest) of equal ones
    grammar, chosen = [by_method["decompose"][i] for i in ids], [by_method[READERS[best]][i] for i in ids]
    test = mcnemar(grammar, chosen)
    why = (f"chosen on {run} (split {config['split']}, n={len(ids)}): EM " +
           ", ".join(f"{name} {em[name]:.3f}" for name in READERS) +
           ("" if best == "grammar" else f"; {best} vs grammar {test['b_fixed']} fixed / {test['b_broken']} broken, "
                                         f"McNemar p={test['p_value']:.2g}"))
    return best, em, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run", type=Path, help="a calibration run directory of `autopatch eval`")
    parser.add_argument("--profile", type=Path, help="a profile JSON to write the choice into")
    args = parser.parse_args(argv)
    best, _, why = choose(args.run)
    print(f"decomposer: {best} ({why})")
    if args.profile:
        data = json.loads(args.profile.read_text())
        if best == "grammar":
            data.pop("decomposer", None)  # the default: profiles without the field read the same
        else:
            data["decomposer"] = best
        note = data.get("note", "").split("; decomposer ", 1)[0]
        data["note"] = f"{note}; decomposer {best} {why}".lstrip("; ")
        args.profile.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
