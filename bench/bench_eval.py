"""Evaluation throughput: questions per second per method, and each method's cost relative to ``vanilla``.

Example:
    $ python bench/bench_eval.py --limit 32                       # embedded Gemma, a fresh temporary run
    $ python bench/bench_eval.py --run docs/runs/qwen05_twohop_test  # read a finished run, generate nothing

Runs ``autopatch eval`` on ``--limit`` two-hop test questions into a temporary directory (or reads ``--run``) and
prints, per method, the seconds per question the harness measured (``summary.json``), questions per second, and
the ratio to ``vanilla`` in the same run, so the numbers compare methods on one machine and one load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_METHODS = "vanilla,decompose,patch,autopatch,reroute,control-random,cot"


def throughput_markdown(summary: dict) -> str:
    methods = {m: e["all"] for m, e in summary["methods"].items() if e["all"].get("seconds_per_q")}
    base = methods.get("vanilla", {}).get("seconds_per_q")
    lines = ["| method | s/q | q/s | cost vs vanilla | tokens |", "|---|---|---|---|---|"]
    for name, stats in sorted(methods.items(), key=lambda kv: kv[1]["seconds_per_q"]):
        spq = stats["seconds_per_q"]
        ratio = f"{spq / base:.2f}x" if base else "–"
        lines.append(f"| {name} | {spq:.3f} | {1 / spq:.2f} | {ratio} | {stats.get('mean_tokens', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished run directory to read instead of running one")
    parser.add_argument("--model", default=None)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    args = parser.parse_args(argv)
    if args.run:
        run = Path(args.run)
    else:
        run = Path(tempfile.mkdtemp(prefix="bench_eval_")) / "run"
        command = [sys.executable, "-m", "autopatch", "eval", "--dataset", "twohop", "--split", "test", "--limit",
                   str(args.limit), "--methods", args.methods, "--batch-size", str(args.batch_size), "--no-hops",
                   "--no-gold-scores", "--quiet", "--out", str(run), *(["--model", args.model] if args.model else [])]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((run / "summary.json").read_text())
    print(f"{run}: {summary['n_questions']} questions")
    print(throughput_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
