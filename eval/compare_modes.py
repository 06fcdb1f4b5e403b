"""Two runs of the same questions, paired question by question: what a quantization mode (or any change) costs.

Example:
    $ python -m eval.compare_modes docs/runs/qwen15_twohop_test docs/runs/quant_qwen15_int8

Reads both runs' ``results.jsonl`` and ``config.json`` (written by ``autopatch eval``), keeps the methods and
question ids both hold, and prints, per method: EM in each run, the change, the questions the second run got
right and the first wrong (gained) and the reverse (lost), the exact McNemar p between the two, the share of
answers that are identical, and the mean seconds per question in each run (the harness's own clock, so the
speed ratio only means something when both ran on the same machine). It refuses runs whose questions or
evaluation settings other than the model's weights differ, naming the setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.metrics import mcnemar
from eval.runner import read_results

# Settings that change what a question's answer is, besides the weights; they must agree for a paired comparison.
PAIRED_SETTINGS = ("dataset", "split", "hops", "limit", "model", "budget", "cot_budget", "use_decomposition",
                   "profile_file", "gate_file")


def _run(path: Path) -> tuple[dict, dict[tuple[str, str], dict]]:
    from autopatch.models import DEFAULT_MODEL

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: not an `autopatch eval` run ({err})") from None
    config["model"] = config.get("model") or DEFAULT_MODEL  # runs of the default model recorded no name
    return config, {(row["method"], row["id"]): row for row in read_results(path)}


def compare(first: Path, second: Path) -> list[dict]:
    """One dict per method both runs hold, in the first run's method order."""
    config_a, rows_a = _run(first)
    config_b, rows_b = _run(second)
    differ = [k for k in PAIRED_SETTINGS if config_a.get(k) != config_b.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {config_a.get(k)!r} vs {config_b.get(k)!r}" for k in differ)
        raise SystemExit(f"{first} and {second} are not the same evaluation ({detail}).")
    methods = [m for m in config_a.get("methods", []) if m in set(config_b.get("methods", []))]
    table = []
    for method in methods:
        ids = sorted({i for (m, i) in rows_a if m == method} & {i for (m, i) in rows_b if m == method})
        if not ids:
            continue
        a = [rows_a[(method, i)] for i in ids]
        b = [rows_b[(method, i)] for i in ids]
        if any(x["question"] != y["question"] for x, y in zip(a, b)):
            raise SystemExit(f"{method}: the two runs hold different questions under the same ids.")
        test = mcnemar([bool(x["em"]) for x in a], [bool(y["em"]) for y in b])
        table.append({
            "method": method, "n": len(ids),
            "em_a": sum(bool(x["em"]) for x in a) / len(ids), "em_b": sum(bool(y["em"]) for y in b) / len(ids),
            "gained": test["b_fixed"], "lost": test["b_broken"], "p": test["p_value"],
            "identical": sum(x["answer"] == y["answer"] for x, y in zip(a, b)) / len(ids),
            "s_a": sum(x["seconds"] for x in a) / len(ids), "s_b": sum(y["seconds"] for y in b) / len(ids),
        })
    return table


def markdown(table: list[dict], first: str, second: str) -> str:
    lines = [f"A = {first}, B = {second}", "",
             "| method | n | EM A | EM B | change | gained / lost (McNemar p) | identical answers | s/q A | s/q B | speed B/A |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['n']} | {r['em_a']:.3f} | {r['em_b']:.3f} | {100 * (r['em_b'] - r['em_a']):+.1f} | "
                     f"{r['gained']} / {r['lost']} (p={r['p']:.3g}) | {r['identical']:.1%} | {r['s_a']:.2f} | "
                     f"{r['s_b']:.2f} | {r['s_a'] / r['s_b']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("first", type=Path, help="the reference run (e.g. float32)")
    parser.add_argument("second", type=Path, help="the run to compare with it (e.g. int8)")
    args = parser.parse_args(argv)
    print(markdown(compare(args.first, args.second), str(args.first), str(args.second)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
