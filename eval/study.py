"""The reroute study: configurations chosen on a training sweep, scored on a dev sweep, against their controls.

Example:
    $ python -m eval.sweep --model qwen2.5-coder-0.5b-instruct --split train --grid study --controls --out runs/st_train
    $ python -m eval.sweep --model qwen2.5-coder-0.5b-instruct --split dev --grid study --controls --out runs/st_dev
    $ python -m eval.study --train runs/st_train/sweep.jsonl --dev runs/st_dev/sweep.jsonl --markdown docs/study.md

Both sweeps must have run with ``--controls``: each configuration's random-vector
control (``random:<key>``), the text-only ``decompose`` and ``control-text`` rows,
and the hop diagnostics that define the compositionality-gap subset (hop 1 and
hop 2 answered alone, the two-hop question failed by vanilla). For each strategy
the configuration with the best EM on **train** is chosen; the dev columns then
say what it does on questions it was not chosen on, beside the controls that
would expose a gain the hidden state does not cause. Dev figures of every other
configuration are printed too, labelled as not used for the choice.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from autopatch.profile import Position
from eval.metrics import mcnemar
from eval.sweep import RandomControl, RowKey, SweepConfig, SweepTable, load_sweep, row_key_text

Table = SweepTable


def gap_ids(table: Table) -> list[str]:
    """Questions with both hops answered alone (gold in the answer) and the two-hop question failed by vanilla."""
    vanilla, h1, h2 = table.get("vanilla", {}), table.get("hop1", {}), table.get("hop2", {})
    return sorted(i for i in vanilla if i in h1 and i in h2 and h1[i]["contains"] and h2[i]["contains"]
                  and not vanilla[i]["contains"])


def _em(table: Table, key: RowKey, ids: Sequence[str]) -> list[float]:
    """EM per question; a question the key has no row for (not located) keeps vanilla's answer."""
    rows, vanilla = table.get(key, {}), table["vanilla"]
    return [rows[i]["em"] if i in rows else vanilla[i]["em"] for i in ids]


def config_stats(table: Table, key: RowKey) -> dict:
    """EM, fixes and breaks against vanilla, gap-subset fixes, and the same for the key's controls."""
    ids, gap = sorted(table["vanilla"]), gap_ids(table)
    vanilla = _em(table, "vanilla", ids)
    em = _em(table, key, ids)
    test = mcnemar([bool(v) for v in vanilla], [bool(e) for e in em])
    out = {"n": len(ids), "em": sum(em) / len(ids), "fixed": test["b_fixed"], "broken": test["b_broken"],
           "p_vs_vanilla": test["p_value"], "gap_n": len(gap), "gap_fixed": int(sum(_em(table, key, gap)))}
    controls: tuple[tuple[str, RowKey], ...] = (("text", "control-text"), ("decompose", "decompose"))
    if isinstance(key, SweepConfig):
        controls = (("random", RandomControl(key)), *controls)
    for name, ref in controls:
        if ref in table:
            out[f"gap_fixed_{name}"] = int(sum(_em(table, ref, gap)))
            out[f"em_{name}"] = sum(_em(table, ref, ids)) / len(ids)
    if "decompose" in table:
        versus = mcnemar([bool(e) for e in _em(table, "decompose", ids)], [bool(e) for e in em])
        out["p_vs_decompose"] = versus["p_value"]
    return out


def choose_on_train(train: Table) -> dict[str, SweepConfig]:
    """Per strategy, the configuration with the best train EM (ties: the later key, as text)."""
    best: dict[str, tuple[float, str, SweepConfig]] = {}
    vanilla_ids = sorted(train["vanilla"])
    for key in train:
        if not isinstance(key, SweepConfig):
            continue
        em = sum(_em(train, key, vanilla_ids)) / len(vanilla_ids)
        if key.strategy not in best or (em, key.key) > best[key.strategy][:2]:
            best[key.strategy] = (em, key.key, key)
    return {strategy: config for strategy, (_, _, config) in best.items()}


def _fmt_p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def _row(key: RowKey, stats: dict) -> str:
    shown = row_key_text(key).replace("|", "\\|")  # the key's separators would split the table's cells
    return (f"| `{shown}` | {stats['em']:.3f} | {stats['fixed']}/{stats['broken']} (p={_fmt_p(stats['p_vs_vanilla'])}) | "
            f"{stats['gap_fixed']}/{stats['gap_n']} | {stats.get('gap_fixed_random', '–')} | "
            f"{stats.get('gap_fixed_text', '–')} | {stats.get('gap_fixed_decompose', '–')} | "
            f"{_fmt_p(stats.get('p_vs_decompose'))} |")


HEADER = ["| configuration | EM | fixed/broken vs vanilla | gap fixed | gap fixed by its random control | "
          "gap fixed by control-text | gap fixed by decompose | p vs decompose |",
          "|---|---|---|---|---|---|---|---|"]


def study_markdown(train: Table, dev: Table, command: str) -> str:
    chosen = choose_on_train(train)
    n_train, n_dev = len(train["vanilla"]), len(dev["vanilla"])
    lines = ["# Reroute study", "", f"Made by `{command}`.", "",
             f"Train sweep: {n_train} questions; dev sweep: {n_dev} questions (disjoint subjects). Greedy; every "
             "configuration patches every located question. EM against vanilla by an exact McNemar test. The gap "
             "subset: hop 1 and hop 2 answered alone, the two-hop question failed by vanilla. Controls: the same "
             "configuration with a norm-matched random vector; `control-text`, the subject's words in the "
             "placeholder; `decompose`, the located first hop asked in words (no hidden state).", "",
             f"Vanilla EM: train {sum(_em(train, 'vanilla', sorted(train['vanilla']))) / n_train:.3f}, "
             f"dev {sum(_em(dev, 'vanilla', sorted(dev['vanilla']))) / n_dev:.3f}. "
             f"Text references on dev: decompose EM {config_stats(dev, 'vanilla').get('em_decompose', float('nan')):.3f}, "
             f"control-text EM {config_stats(dev, 'vanilla').get('em_text', float('nan')):.3f}.", "",
             "## Chosen on train, scored on dev", "", *HEADER]
    lines += [_row(key, config_stats(dev, key)) for key in chosen.values()]
    lines += ["", "The same configurations on train (where they were chosen):", "", *HEADER]
    lines += [_row(key, config_stats(train, key)) for key in chosen.values()]
    lines += ["", "## Every configuration on dev (descriptive; not used for the choice)", "", *HEADER]
    keys = sorted((k for k in dev if isinstance(k, SweepConfig)), key=lambda k: -config_stats(dev, k)["em"])
    lines += [_row(key, config_stats(dev, key)) for key in keys]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Configurations chosen on a train sweep, scored on a dev sweep.")
    parser.add_argument("--train", required=True, help="sweep.jsonl of the training split (with --controls)")
    parser.add_argument("--dev", required=True, help="sweep.jsonl of the dev split (with --controls)")
    parser.add_argument("--markdown", help="write the study here")
    parser.add_argument("--plots", help="a directory for the heat maps (fix rate on vanilla-wrong dev questions)")
    args = parser.parse_args(argv)
    train, dev = load_sweep(Path(args.train)), load_sweep(Path(args.dev))
    for name, table in (("train", train), ("dev", dev)):
        missing = [k for k in ("vanilla", "hop1", "hop2", "decompose", "control-text") if k not in table]
        if missing:
            parser.error(f"the {name} sweep has no {', '.join(missing)} rows: run eval.sweep with --controls")
    text = study_markdown(train, dev, "python -m eval.study " + " ".join(sys.argv[1:] if argv is None else argv))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plots:
        from eval.report import plot_sweep_heatmap

        for position in (Position.SPAN_END, Position.SUBJECT_END):
            path = Path(args.plots) / f"study_heatmap_{position}.png"
            if plot_sweep_heatmap(Path(args.dev), path, "reroute", position=position):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
