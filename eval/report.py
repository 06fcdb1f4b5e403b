"""Summarise a run: ``summary.json``, ``report.md`` and PNG plots, from the results JSONL alone.

Example:
    >>> from eval.report import write_report
    >>> summary = write_report(Path("runs/twohop_test"), command="autopatch eval ...")
    >>> summary["methods"]["vanilla"]["all"]["em"]

Definitions (also printed in ``report.md``):

* A hop is *known* when its answer line contains a gold (``contains``): the
  model states the fact, whatever the wording.
* The **compositionality-gap subset**: hop 1 known, hop 2 (with the gold bridge
  given) known, and the two-hop question failed by ``vanilla`` (no gold in its
  answer line). Only there can correction help.
* ``oracle-gate``: per question, the better of ``vanilla`` and ``patch``.
  ``oracle-layers``: correct if any configuration of the sweep grid (run on
  these same questions) is. Both are upper bounds, not methods.
* Against ``vanilla``: questions fixed (vanilla wrong, method right) and broken
  (the reverse) by EM, and an exact two-sided McNemar p-value.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autopatch.registry import DECOMPOSERS
from eval.methods import METHODS
from eval.metrics import bootstrap_ci, contains, mcnemar
from eval.runner import iter_methods_rows, read_results

METRICS = ("em", "f1", "contains")


def _derived(by_method: dict[str, dict[str, dict]], out_dir: Path) -> None:
    """Add oracle rows computed from other methods (and from a sweep on the same questions)."""
    if "vanilla" in by_method and "patch" in by_method:
        van, pat = by_method["vanilla"], by_method["patch"]
        by_method["oracle-gate"] = {
            i: {m: max(van[i][m], pat[i][m]) for m in METRICS} | {"n_tokens": pat[i]["n_tokens"], "seconds": None,
                                                                   "patched": pat[i]["em"] > van[i]["em"]}
            for i in van if i in pat
        }
    sweep_file = out_dir / "sweep.jsonl"
    if sweep_file.exists():
        from eval.sweep import SweepConfig, load_sweep

        table = load_sweep(sweep_file)
        oracle: dict[str, dict] = {}
        for key, rows in table.items():
            if not isinstance(key, SweepConfig):
                continue
            for i, row in rows.items():
                best = oracle.setdefault(i, {m: 0.0 for m in METRICS} | {"n_tokens": None, "seconds": None, "patched": True})
                for m in METRICS:
                    best[m] = max(best[m], row[m])
        if oracle:
            by_method["oracle-layers"] = oracle


def _stats(rows: dict[str, dict], vanilla: dict[str, dict] | None, ids: Sequence[str]) -> dict:
    out: dict = {"n": len(ids)}
    if not ids:
        return out

    def present(key: str) -> list:
        return [rows[i][key] for i in ids if rows[i].get(key) is not None]

    def mean(values: list) -> float | None:
        return sum(values) / len(values) if values else None

    graded = [i for i in ids if rows[i].get("golds", True)]  # requests without a gold (chat, code...) have no EM
    out["n_gold"] = len(graded)
    for m in METRICS:
        values = [float(rows[i][m]) for i in graded if rows[i].get(m) is not None]
        out[m] = mean(values)
        out[f"{m}_ci"] = list(bootstrap_ci(values)) if values else [None, None]
    out["mean_tokens"] = mean(present("n_tokens"))
    out["seconds_per_q"] = mean(present("seconds"))
    out["patched"] = sum(1 for i in ids if rows[i].get("patched")) / len(ids)
    out["gold_logprob"] = mean(present("gold_logprob"))
    ranks = present("gold_rank")
    out["gold_rank_median"] = statistics.median(ranks) if ranks else None
    two_hop = [i for i in ids if rows[i].get("bridge_golds") and rows[i].get("report") is not None]
    if two_hop:  # how well the method read the question: located, and the first hop answered with the gold bridge
        reports = [rows[i]["report"] for i in two_hop]
        out["located"] = sum(bool(r.get("located")) for r in reports) / len(two_hop)
        out["bridge"] = sum(bool(r.get("bridge")) and bool(contains(r["bridge"], rows[i]["bridge_golds"]))
                            for i, r in zip(two_hop, reports)) / len(two_hop)
    if vanilla is not None:
        test = mcnemar([bool(vanilla[i]["em"]) for i in graded], [bool(rows[i]["em"]) for i in graded])
        out["vs_vanilla"] = {"fixed": test["b_fixed"], "broken": test["b_broken"], "p_value": test["p_value"]}
        same = [i for i in ids if "continuation" in rows[i] and "continuation" in vanilla[i]]
        if same:  # do no harm: the share answered exactly as the model alone answers
            out["identical"] = sum(rows[i]["continuation"] == vanilla[i]["continuation"] for i in same) / len(same)
    return out


def kinds_of(by_method: dict[str, dict[str, dict]], ids: Sequence[str]) -> dict[str, list[str]]:
    """Ids by the dataset's own ``kind`` (code, chat, single-hop...), when its records carry one."""
    rows = next(iter(by_method.values()), {})
    out: dict[str, list[str]] = {}
    for i in ids:
        kind = rows.get(i, {}).get("kind")
        if kind:
            out.setdefault(str(kind), []).append(i)
    return dict(sorted(out.items()))


def gap_subset(by_method: dict[str, dict[str, dict]]) -> list[str] | None:
    """Ids with both hops known alone and the two-hop question failed by vanilla; None without diagnostics."""
    if not {"hop1", "hop2", "vanilla"} <= set(by_method):
        return None
    h1, h2, van = by_method["hop1"], by_method["hop2"], by_method["vanilla"]
    return sorted(i for i in van if i in h1 and i in h2 and h1[i]["contains"] and h2[i]["contains"] and not van[i]["contains"])


def summarise(out_dir: Path) -> dict:
    """The summary dict for every method found in ``out_dir``'s results."""
    by_method = dict(iter_methods_rows(read_results(out_dir)))
    _derived(by_method, out_dir)
    vanilla = by_method.get("vanilla")
    common = sorted(set.intersection(*(set(rows) for rows in by_method.values()))) if by_method else []
    gap = gap_subset(by_method)
    kinds = kinds_of(by_method, common)
    auto = by_method.get("autopatch", {})
    located = [i for i in common if ((auto.get(i) or {}).get("report") or {}).get("located")]  # where the gate decides
    summary: dict = {"n_questions": len(common), "gap_subset_size": None if gap is None else len(gap),
                     "kinds": {k: len(v) for k, v in kinds.items()}, "methods": {}}
    for name, rows in by_method.items():
        method = METHODS.get(name)
        kind = method.kind if method else "unknown"
        paired = vanilla if name != "vanilla" and kind != "diagnostic" else None  # hop questions are other questions
        entry = {"kind": kind, "description": method.description if method else "", "all": _stats(rows, paired, common)}
        if gap is not None and name not in ("hop1", "hop2"):
            entry["gap"] = _stats(rows, paired, [i for i in gap if i in rows])
        if auto and kinds:  # a set of requests of several kinds: how the ones the locator reads fared
            entry["located"] = _stats(rows, paired, [i for i in located if i in rows])
        for request_kind, ids in kinds.items():
            entry[f"kind:{request_kind}"] = _stats(rows, paired, [i for i in ids if i in rows])
        summary["methods"][name] = entry
    summary["vs_decompose"] = _versus(by_method, "decompose", common)
    summary["warnings"] = _control_warnings(summary)
    summary["gate"] = gate_quality(by_method)
    return summary


# A method named for a reader other than the grammar (decompose's own) is set against decompose with that reader.
READER_SUFFIXES = tuple(f"-{reader}" for reader in DECOMPOSERS if reader != "grammar")


def _versus(by_method: dict[str, dict[str, dict]], reference: str, ids: Sequence[str]) -> dict:
    """Every patch method against ``reference`` (paired EM on ``ids``): is the hidden state worth more than text?
    A method named with a reader's suffix (``second-opinion-model``) is set against the decomposition with the same
    reader (``decompose-model``) where the run has it: the state must add something over that reader's words."""
    if reference not in by_method:
        return {}
    out = {}
    for name, rows in by_method.items():
        method = METHODS.get(name)
        if method is None or method.kind != "patch":
            continue
        against = next((reference + suffix for suffix in READER_SUFFIXES
                        if name.endswith(suffix) and reference + suffix in by_method), reference)
        ref = by_method[against]
        paired = [i for i in ids if i in rows and i in ref and rows[i].get("golds", True)]  # EM needs a gold
        if not paired:
            continue
        test = mcnemar([bool(ref[i]["em"]) for i in paired], [bool(rows[i]["em"]) for i in paired])
        out[name] = {"n": len(paired), "em": sum(rows[i]["em"] for i in paired) / len(paired),
                     f"{reference}_em": sum(ref[i]["em"] for i in paired) / len(paired), "reference": against,
                     "fixed": test["b_fixed"], "broken": test["b_broken"], "p_value": test["p_value"]}
    return out


def gate_quality(by_method: dict[str, dict[str, dict]]) -> dict | None:
    """ROC-AUC of the gate's score for 'patch helps' (vanilla wrong, patch right by EM) on these questions."""
    if not {"vanilla", "patch", "autopatch"} <= set(by_method):
        return None
    van, pat, auto = by_method["vanilla"], by_method["patch"], by_method["autopatch"]
    pairs = [(float(pat[i]["em"] > van[i]["em"]), auto[i]["report"]["gate_score"]) for i in auto
             if i in van and i in pat and (auto[i].get("report") or {}).get("gate_score") is not None]
    labels = [p[0] for p in pairs]
    out: dict[str, Any] = {"n_scored": len(pairs), "helps": int(sum(labels)), "roc_auc": None}
    if 0 < sum(labels) < len(labels):
        from sklearn.metrics import roc_auc_score

        out["roc_auc"] = float(roc_auc_score(labels, [p[1] for p in pairs]))
    return out


def _control_warnings(summary: dict) -> list[str]:
    methods = summary["methods"]
    if "patch" not in methods or "em_ci" not in methods["patch"]["all"]:
        return []
    low = methods["patch"]["all"]["em_ci"][0]
    vanilla_em = methods.get("vanilla", {}).get("all", {}).get("em")
    if vanilla_em is not None and methods["patch"]["all"]["em"] <= vanilla_em:
        return [f"patch does not beat vanilla here (EM {methods['patch']['all']['em']:.3f} vs {vanilla_em:.3f}), "
                "so the controls have no effect to attribute."]
    warnings = []
    for name, entry in methods.items():
        if entry["kind"] == "control" and entry["all"].get("em", 0.0) >= low:
            warnings.append(f"{name} scores EM {entry['all']['em']:.3f}, inside or above the 95% CI of patch "
                            f"(lower bound {low:.3f}): the target prompt, not the patched state, is doing the work.")
    return warnings


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(summary: dict, subset: str) -> list[str]:
    order = [m for m in METHODS if m in summary["methods"]] + [m for m in summary["methods"] if m not in METHODS]
    lines = ["| method | kind | n | EM [95% CI] | F1 | contains | fixed/broken vs vanilla (McNemar p) | "
             "gold log-p | tokens | s/q | EM per 100 tokens | EM per s | patched | identical to vanilla |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        entry = summary["methods"][name]
        stats = entry.get(subset)
        if not stats or not stats.get("n"):
            continue
        label = f"**{name}** (oracle)" if entry["kind"] == "oracle" else name
        vs = stats.get("vs_vanilla")
        vs_text = f"{vs['fixed']}/{vs['broken']} (p={vs['p_value']:.3g})" if vs else "–"
        em_ci = stats.get("em_ci", [None, None])
        graded = stats.get("n_gold", stats["n"])
        n = f"{stats['n']} ({graded} with a gold)" if graded != stats["n"] else str(stats["n"])
        lines.append(
            f"| {label} | {entry['kind']} | {n} | {_fmt(stats['em'])} [{_fmt(em_ci[0])}, {_fmt(em_ci[1])}] | "
            f"{_fmt(stats['f1'])} | {_fmt(stats['contains'])} | {vs_text} | {_fmt(stats.get('gold_logprob'), 2)} | "
            f"{_fmt(stats.get('mean_tokens'), 1)} | {_fmt(stats.get('seconds_per_q'), 2)} | "
            f"{_fmt(_per(stats.get('em'), stats.get('mean_tokens'), 100), 2)} | "
            f"{_fmt(_per(stats.get('em'), stats.get('seconds_per_q')), 2)} | {_fmt(stats.get('patched'), 2)} | "
            f"{_fmt(stats.get('identical'), 3)} |")
    return lines


def _per(value: float | None, cost: float | None, scale: float = 1.0) -> float | None:
    """Accuracy per unit of cost (``None`` where the cost is unknown or zero)."""
    return None if value is None or not cost else scale * value / cost


def _decompose_lines(summary: dict) -> list[str]:
    """Whether each patch method beats the text-only decomposition (the hidden state must add something)."""
    versus = summary.get("vs_decompose") or {}
    if not versus:
        return ["- Not assessed: this run has no `decompose` (text-only) row, so it cannot say whether the hidden "
                "state adds anything over asking the located first hop in words."]
    lines = []
    for name, v in versus.items():
        verdict = ("beats" if v["em"] > v["decompose_em"] and v["p_value"] < 0.05 else
                   "does not beat" if v["em"] <= v["decompose_em"] else "is above but not significantly above")
        lines.append(f"- `{name}` {verdict} `{v.get('reference', 'decompose')}`: EM {v['em']:.3f} vs {v['decompose_em']:.3f} "
                     f"({v['fixed']} fixed / {v['broken']} broken, McNemar p={v['p_value']:.3g}, n={v['n']}).")
    return lines


def _command_lines(command: str) -> list[str]:
    commands = [c for c in command.split("\n") if c.strip()]
    if len(commands) == 1:
        return [f"Command: `{commands[0]}`"]
    return ["Commands (each wrote part of this run, in order):", "", *(f"- `{c}`" for c in commands)]


def _control_lines(summary: dict) -> list[str]:
    """What the controls say, only about methods that ran."""
    methods = summary["methods"]
    controls = [name for name, entry in methods.items() if entry["kind"] == "control"]
    if "patch" not in methods or not controls:
        missing = " and ".join(x for x, absent in (("`patch`", "patch" not in methods), ("a control", not controls)) if absent)
        return [f"- Not assessed: this run has no {missing}, so it cannot say whether the patched state carries an effect."]
    if summary["warnings"]:
        return [f"- {w}" for w in summary["warnings"]]
    return [f"- No control ({', '.join(f'`{c}`' for c in controls)}) reaches the 95% CI of `patch`: the patched state, "
            "not the target prompt, carries the effect."]


def _kind_lines(summary: dict) -> list[str]:
    """Per kind of request: how many, EM where a gold exists, and the share each method leaves as vanilla has it."""
    kinds = summary.get("kinds") or {}
    if not kinds:
        return []
    names = [m for m in summary["methods"] if m != "vanilla" and summary["methods"][m]["kind"] not in ("oracle", "diagnostic")]
    head = "| kind | n | vanilla EM | " + " | ".join(f"{m}: identical / patched / EM" for m in names) + " |"
    lines = ["## By kind of request", "",
             "Identical: the method's output is byte for byte the model's own (vanilla's); EM only where the request has a "
             "gold.", "", head, "|" + "---|" * (3 + len(names))]
    for kind, n in kinds.items():
        cells = []
        for m in names:
            st = summary["methods"][m].get(f"kind:{kind}") or {}
            cells.append(f"{_fmt(st.get('identical'))} / {_fmt(st.get('patched'), 2)} / {_fmt(st.get('em'))}")
        van = (summary["methods"].get("vanilla") or {}).get(f"kind:{kind}") or {}
        lines.append(f"| {kind} | {n} | {_fmt(van.get('em'))} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _reading_lines(summary: dict) -> list[str]:
    """Per patching method on two-hop questions with gold bridges: located, and the gold bridge found."""
    rows = [(name, e["all"]) for name, e in summary["methods"].items() if e["all"].get("located") is not None]
    if not rows:
        return []
    lines = ["## Reading the question", "",
             "Located: the question's first hop was found (grammar, or a decomposition). Bridge: the first hop, asked, "
             "was answered with the gold bridge (a gold bridge appears in the decoded bridge; patch methods that patch "
             "a state without decoding it have none).", "", "| method | located | bridge |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(st['located'])} | {_fmt(st['bridge'])} |" for name, st in rows]
    return [*lines, ""]


def report_markdown(summary: dict, command: str) -> str:
    lines = [
        "# Evaluation report", "",
        *_command_lines(command), "",
        f"Questions: {summary['n_questions']}. Greedy decoding. EM/F1 use SQuAD normalisation, best over answer and "
        "aliases, on the answer extracted by the one rule in `eval/metrics.py` (first line; for CoT the last "
        "\"Answer:\" line, else the text after \"the answer is\"). Tokens: every token the method generated (a "
        "decoded bridge and CoT's second stage included). `contains`: a gold appears in the answer line. Gold "
        "log-p: teacher-forced log-probability of the gold's first 3 tokens under the method's final prompt, "
        "patched where the method patches. Oracle rows are upper bounds, not methods.", "",
        "## All questions", "", *_table(summary, "all"), "",
    ]
    if summary.get("gap_subset_size") is not None:
        lines += ["## Compositionality-gap subset", "",
                  f"{summary['gap_subset_size']} questions where hop 1 and hop 2 are each answered alone (gold in the "
                  "answer line) but vanilla fails the two-hop question. Correction can only help here.", "",
                  *_table(summary, "gap"), ""]
    lines += _kind_lines(summary)
    lines += _reading_lines(summary)
    gate = summary.get("gate")
    if gate:
        auc = "n/a" if gate["roc_auc"] is None else f"{gate['roc_auc']:.3f}"
        lines += ["## Gate", "", f"ROC-AUC of the gate score for 'patch helps' on these held-out questions: {auc} "
                  f"({gate['n_scored']} scored questions, {gate['helps']} where always-patching helps).", ""]
    lines += ["## Controls", ""]
    lines += _control_lines(summary)
    lines += ["", "## Hidden state against text", ""]
    lines += _decompose_lines(summary)
    lines += ["", "## Methods", ""]
    lines += [f"- `{name}` ({entry['kind']}): {entry['description']}" for name, entry in summary["methods"].items()]
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in summary["methods"] if summary["methods"][m]["all"].get("n")]
    ems = [summary["methods"][m]["all"]["em"] for m in names]
    cis = [summary["methods"][m]["all"]["em_ci"] for m in names]
    errors = [[e - c[0] for e, c in zip(ems, cis)], [c[1] - e for e, c in zip(ems, cis)]]
    colours = {"baseline": "#4c72b0", "patch": "#dd8452", "control": "#8c8c8c", "oracle": "#55a868", "diagnostic": "#c44e52"}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
    ax.bar(names, ems, yerr=errors, capsize=3, color=[colours.get(summary["methods"][m]["kind"], "#999") for m in names])
    ax.set_ylabel("exact match (95% bootstrap CI)")
    ax.set_title(f"Accuracy by method (n={summary['n_questions']})")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(summary: dict, path: Path) -> bool:
    """Accuracy against cost: one point per method at (mean generated tokens, EM); False if no method has both."""
    points = [(name, e["all"]["mean_tokens"], e["all"]["em"], e["kind"]) for name, e in summary["methods"].items()
              if e["all"].get("mean_tokens") is not None and e["all"].get("em") is not None and e["kind"] != "diagnostic"]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"baseline": "#4c72b0", "patch": "#dd8452", "control": "#8c8c8c", "oracle": "#55a868"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, tokens, em, kind in points:
        ax.scatter([tokens], [em], color=colours.get(kind, "#999"))
        ax.annotate(name, (tokens, em), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("mean generated tokens per question (bridge and CoT stages included)")
    ax.set_ylabel("exact match")
    ax.set_title(f"Accuracy against cost (n={summary['n_questions']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sweep_heatmap(sweep_file: Path, path: Path, strategy: str = "reroute", position: str | None = None) -> bool:
    """Fix rate (vanilla wrong -> patched right, by EM) over (source layer, target layer); False if no data.

    ``position`` keeps one source position (else each cell shows the best); amplified patches are left out.
    """
    from eval.sweep import SweepConfig, load_sweep

    table = load_sweep(sweep_file)
    vanilla = table.get("vanilla", {})
    cells: dict[tuple[int, int], list[float]] = {}
    for config, rows in table.items():
        if not isinstance(config, SweepConfig) or config.strategy != strategy:
            continue
        if config.scale != 1 or (position is not None and config.source_position != position):
            continue
        wrong = [i for i in rows if i in vanilla and not vanilla[i]["em"]]
        if wrong:
            rate = sum(rows[i]["em"] for i in wrong) / len(wrong)
            cells.setdefault((config.source_layer, config.target_layer), []).append(rate)
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sources = sorted({s for s, _ in cells})
    targets = sorted({t for _, t in cells})
    grid = np.full((len(sources), len(targets)), np.nan)
    for (s, t), rates in cells.items():
        grid[sources.index(s), targets.index(t)] = max(rates)  # best source position for the cell
    fig, ax = plt.subplots(figsize=(4 + 0.4 * len(targets), 3 + 0.3 * len(sources)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(targets)), targets)  # type: ignore[arg-type]  # matplotlib's stub wants str labels; it formats any
    ax.set_yticks(range(len(sources)), sources)  # type: ignore[arg-type]  # matplotlib's stub wants str labels; it formats any
    ax.set_xlabel("target layer ℓ*")
    ax.set_ylabel("source layer ℓ")
    where = f" from {position}" if position else ""
    ax.set_title(f"{strategy}{where}: fix rate on vanilla-wrong questions", fontsize=9)
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out_dir: Path, command: str) -> dict:
    """Write summary.json, report.md and the plots into ``out_dir``; return the summary."""
    summary = summarise(out_dir)
    summary["command"] = command
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "report.md").write_text(report_markdown(summary, command))
    if summary["methods"]:
        plot_accuracy(summary, out_dir / "accuracy.png")
        plot_cost(summary, out_dir / "cost.png")
    if (out_dir / "sweep.jsonl").exists():
        plot_sweep_heatmap(out_dir / "sweep.jsonl", out_dir / "sweep_heatmap.png")
    return summary
