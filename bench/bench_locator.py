"""Locator time against question length: 100 to 40,000 characters (issue: a linear-time or capped locator).

Example:
    $ python bench/bench_locator.py            # one line per length: characters, located?, median ms, why not

Questions longer than ``autopatch.locate.MAX_QUESTION_CHARS`` are refused at once (left unpatched, with the
reason in the report); below the cap the parse time is what a real two-hop question costs. Each length is a
two-hop question padded with a long descriptive clause inside the first hop, the worst case for the parser.
"""

from __future__ import annotations

import argparse
import statistics
import time

from autopatch.locate import MAX_QUESTION_CHARS, UnlocatableQuestion, locate

BASE = "What is the capital of the country where the Colosseum, {pad} is located?"
LENGTHS = (100, 250, 500, 1000, 2000, 5000, 10000, 20000, 40000)


def question_of_length(n: int) -> str:
    filler = "an amphitheatre built of travertine and tuff under the Flavian emperors"
    pad = (filler + ", ") * (n // (len(filler) + 2) + 1)
    q = BASE.format(pad=pad)
    over = len(q) - n
    return BASE.format(pad=pad[: max(0, len(pad) - over)]) if over > 0 else q


def time_locate(question: str, repeats: int) -> tuple[float, str]:
    times, why = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            locate(question)
            why = "located"
        except UnlocatableQuestion as err:
            why = err.why
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"cap: {MAX_QUESTION_CHARS} characters")
    print("| characters | median ms | outcome |\n|---|---|---|")
    for n in LENGTHS:
        q = question_of_length(n)
        ms, why = time_locate(q, args.repeats)
        print(f"| {len(q)} | {ms:.2f} | {why[:90]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
