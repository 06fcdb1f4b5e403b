"""Sweep patch configurations on training questions; the result picks the profile and labels the gate.

Example:
    $ python -m eval.sweep --dataset twohop --split train --limit 240 --out runs/sweep_train
    $ python -m eval.sweep --summarize runs/sweep_train/sweep.jsonl --write-profile

For each question the vanilla prompt runs once: its greedy answer is recorded
and, during its prefill, the block outputs of every layer are captured at the
three located positions (span end, subject end, last token). Every
configuration of the grid then reuses those states: only the target prompts
are run. Verbalize configurations that decode the same bridge for a question
share one second-hop generation.

Output: ``sweep.jsonl``, one line per (question, configuration) plus one
``vanilla`` line per question; an interrupted sweep resumes where it stopped.
``--summarize`` prints the table (EM / contains of always-patching with each
configuration, and its fix / break counts against vanilla) and with
``--write-profile`` saves the best configuration per strategy and overall
under ``--out/profiles/`` (and, with ``--ship``, into ``autopatch/profiles/<name>/``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch

from autopatch.architectures import num_layers
from autopatch.cli import add_quantize_arg
from autopatch.errors import ConfigError
from autopatch.patcher import register_starts
from autopatch.plan import Planner
from autopatch.prefill import capture_prefill
from autopatch.profile import BridgePrompt, PatchProfile, Position
from autopatch.resolve import model_profile
from autopatch.strategies import plan_targets, run_targets
from eval.datasets import QARecord, load_dataset_by_name
from eval.jsonl import iter_rows, repair_tail
from eval.metrics import score_continuation


@dataclass(frozen=True)
class SweepConfig:
    """One point of the grid."""

    strategy: str
    source_position: Position
    source_layer: int
    target_layer: int
    bridge_prompt: str = "identity"
    scale: float = 1.0

    @property
    def key(self) -> str:
        key = f"{self.strategy}|{self.source_position}|{self.source_layer}|{self.target_layer}|{self.bridge_prompt}"
        return key if self.scale == 1 else f"{key}|{self.scale:g}"

    @classmethod
    def from_key(cls, key: str) -> SweepConfig:
        """The configuration :attr:`key` wrote; ``ValueError`` for anything else."""
        strategy, position, source, target, bridge, *scale = key.split("|")
        if len(scale) > 1:
            raise ValueError(f"{key!r} has more fields than strategy|position|source|target|prompt[|scale]")
        return cls(strategy, Position(position), int(source), int(target), bridge, float(scale[0]) if scale else 1.0)

    @classmethod
    def of(cls, profile: PatchProfile) -> SweepConfig:
        """The grid point a profile stands for (its key names the profile's rows in a sweep)."""
        return cls(profile.strategy, profile.source_position, profile.source_layer, profile.target_layer,
                   profile.bridge_prompt, profile.scale)

    def profile(self, base: PatchProfile) -> PatchProfile:
        # PatchProfile checks both names when it is built
        return replace(base, strategy=self.strategy, source_position=Position(self.source_position),
                       source_layer=self.source_layer, target_layer=self.target_layer,
                       bridge_prompt=cast(BridgePrompt, self.bridge_prompt), scale=self.scale)


# Rows a study sweep adds per question beside the configurations: text-only references and hop diagnostics.
REFERENCE_KEYS = ("decompose", "control-text", "hop1", "hop2")
RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class RandomControl:
    """A configuration's norm-matched random-vector control (``random:<key>`` in a sweep file)."""

    of: SweepConfig


# What a sweep row holds: ``vanilla`` or a reference row (by name), a grid configuration, or its random control.
# Keys are text only in the JSONL files (:func:`row_key_text`, :func:`parse_row_key`).
RowKey = str | SweepConfig | RandomControl
SweepTable = dict[RowKey, dict[str, dict]]  # key -> question id -> row


def row_key_text(key: RowKey) -> str:
    """The ``config`` field a sweep file writes for ``key``."""
    if isinstance(key, SweepConfig):
        return key.key
    return RANDOM_PREFIX + key.of.key if isinstance(key, RandomControl) else key


def parse_row_key(text: str) -> RowKey:
    """The key a sweep file's ``config`` field names; ``ValueError`` for text that names none."""
    if text == "vanilla" or text in REFERENCE_KEYS:
        return text
    if text.startswith(RANDOM_PREFIX):
        return RandomControl(SweepConfig.from_key(text.removeprefix(RANDOM_PREFIX)))
    return SweepConfig.from_key(text)


def default_grid(n_layers: int) -> list[SweepConfig]:
    """A coarse grid (38 points on an 18-layer model) over strategies, positions and layer pairs.

    Layers are given as fractions of depth so the grid scales to any model; on
    Gemma 3 270M sources are blocks 3, 6, 9, 12 and targets 1 and 4.
    """
    def layer(fraction: float) -> int:
        return min(n_layers - 1, round(fraction * (n_layers - 1)))

    sources = [layer(f) for f in (0.18, 0.35, 0.53, 0.7)]
    early, mid = layer(0.06), layer(0.24)
    span_or_last = (Position.SPAN_END, Position.LAST)
    grid = [SweepConfig("reroute", pos, s, t) for pos in span_or_last for s in sources for t in (early, mid)]
    grid += [SweepConfig("reroute", Position.SUBJECT_END, s, early) for s in sources[:3]]
    grid += [SweepConfig("backpatch", pos, s, t) for pos in span_or_last
             for s, t in ((sources[1], early), (sources[2], mid), (sources[3], mid), (layer(0.88), layer(0.47)))]
    grid += [SweepConfig("verbalize", pos, s, s, "identity") for pos in span_or_last for s in sources[:2]]
    grid += [SweepConfig("verbalize", Position.SUBJECT_END, s, t, "span")
             for s, t in ((0, 0), (sources[0], sources[0]), (sources[1], sources[1]), (sources[0], early), (sources[1], early))]
    grid += [SweepConfig("verbalize", Position.SPAN_END, s, t, "span")
             for s, t in ((sources[0], sources[0]), (sources[1], early))]
    return list(dict.fromkeys(grid))


def study_grid(n_layers: int) -> list[SweepConfig]:
    """The reroute study: (ℓ, ℓ*) at a coarse stride with ℓ* ≤ ℓ (ℓ* early to middle, as Patchscopes and Hopping
    Too Late suggest), from the span end and from the subject end, plus the span-prompt ``verbalize`` points.

    On a 24-layer model: sources 4, 8, 12, 16 and targets 0, 4, 8, plus amplified patches (2h, 4h) from 8 and
    12 into 0 (35 points). Run with ``--controls`` for each point's random-vector control and the text-only
    references (``decompose``, ``control-text``, the hop diagnostics) that the study compares against.
    """
    def layer(fraction: float) -> int:
        return min(n_layers - 1, round(fraction * n_layers))

    sources = sorted({layer(f) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3)})
    targets = sorted({0, layer(1 / 6), layer(1 / 3)})
    first_hop = (Position.SPAN_END, Position.SUBJECT_END)
    grid = [SweepConfig("reroute", pos, s, t) for pos in first_hop for s in sources for t in targets if t <= s]
    grid += [SweepConfig("verbalize", Position.SUBJECT_END, s, t, "span")
             for s, t in ((0, 0), (sources[0], sources[0]), (sources[1], sources[1]), (sources[0], 0), (sources[1], 0))]
    grid += [SweepConfig("reroute", pos, s, 0, "identity", scale)  # amplified patches (Superscopes)
             for pos in first_hop for s in sources[1:3] for scale in (2.0, 4.0)]
    return list(dict.fromkeys(grid))


def focus_grid(n_layers: int) -> list[SweepConfig]:
    """The study grid cut to what the Qwen 0.5B study (docs/study_qwen05.md) left open, for larger models.

    Kept: ``reroute`` from the subject end into ℓ* = 0 at every source layer and into every target from the
    middle source; one span-end point as the reference for the mechanism that lost everywhere on the 0.5B; the
    amplified patches; the five span-prompt ``verbalize`` points; three points of ``isolate``, the same-prompt
    variant with the second hop masked out of the first hop's state, and one of ``isolate-span``, the same at
    every token of the span (20 points, 45 rows per question with ``--controls``, against 74 for ``study``).
    """
    study = study_grid(n_layers)
    sources = sorted({c.source_layer for c in study if c.strategy == "reroute"})
    mid = sources[1]
    keep = [c for c in study if c.strategy == "verbalize" or c.scale != 1.0
            or (c.source_position == Position.SUBJECT_END and (c.target_layer == 0 or c.source_layer == mid))
            or (c.source_position == Position.SPAN_END and c.source_layer == mid and c.target_layer == 0)]
    keep = [c for c in keep if not (c.scale != 1.0 and c.source_position == Position.SPAN_END)]
    high = sources[2]
    keep += [SweepConfig("isolate", Position.SPAN_END, s, t) for s, t in ((mid, mid), (high, high), (mid, 0))]
    return keep + [SweepConfig("isolate-span", Position.SPAN_END, mid, mid)]


GRIDS = {"default": default_grid, "study": study_grid, "focus": focus_grid}


def _done_keys(path: Path) -> set[tuple[str, str]]:
    return {(row["id"], row["config"]) for row in iter_rows(path)}


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def run_sweep(model, tok, records: Sequence[QARecord], configs: Sequence[SweepConfig], out_path: Path, *,
              batch_size: int = 16, max_new_tokens: int = 8, use_decomposition: bool = False,
              controls: bool = False) -> None:
    """Append results for every (record, config) not yet in ``out_path``.

    ``controls=True`` also writes each configuration's random-vector control (``random:<key>``) and, per
    question, the text-only references and hop diagnostics in :data:`REFERENCE_KEYS`.
    """
    base = model_profile(model, tok)
    fmt, planner, device = base.prompt_format, Planner(tok, base.prompt_format), next(model.parameters()).device
    register_starts(model, tok, fmt, proposals=False)  # the grammar reads the first hops here
    layers = list(range(num_layers(model)))
    repair_tail(out_path)
    done = _done_keys(out_path)
    runs: list[tuple[str, SweepConfig, str | None]] = [(c.key, c, None) for c in configs]
    if controls:
        runs += [(row_key_text(RandomControl(c)), c, "random") for c in configs]
        runs += [("decompose", SweepConfig("decompose", Position.SUBJECT_END, 0, 0), None),
                 ("control-text", SweepConfig("reroute", Position.SPAN_END, 0, 0), "text")]
    keys = ["vanilla", *(key for key, _, _ in runs), *(("hop1", "hop2") if controls else ())]  # as the file writes them
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started, n_done = time.perf_counter(), 0
    with out_path.open("a") as sink:
        def emit(rec: QARecord, key: str, continuation: str, golds: Sequence[str] | None = None, **extra) -> None:
            row = {"id": rec.id, "config": key, "continuation": continuation,
                   **score_continuation(continuation, rec.golds if golds is None else golds), **extra}
            sink.write(json.dumps(row) + "\n")

        for batch in _chunks(list(records), batch_size):
            if all((r.id, k) in done for r in batch for k in keys):
                continue
            enc = fmt.encode(tok, [fmt.render(r.question, tok) for r in batch]).to(device)
            ids, plans, positions = planner.batch(enc.input_ids, enc.attention_mask, [r.question for r in batch],
                                                  [r.question_decomposition for r in batch] if use_decomposition else None)
            with capture_prefill(model, tok.pad_token_id, ids, plans, positions, layers, enc.attention_mask,
                                 reuse_prefix=True) as pre:
                vanilla = pre.generate(model, enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=tok.pad_token_id)
            plans = pre.plans
            width = enc.input_ids.shape[1]
            for i, rec in enumerate(batch):
                if (rec.id, "vanilla") not in done:
                    emit(rec, "vanilla", tok.decode(vanilla[i, width:], skip_special_tokens=True),
                         located=bool(plans[i].positions), reason=plans[i].why_not)
            located = [i for i, p in enumerate(plans) if p.positions]
            for key, config, control in runs:
                todo = [i for i in located if (batch[i].id, key) not in done]
                if not todo:
                    continue
                jobs = [pre.job(i, config.source_position, config.source_layer) for i in todo]
                targets = plan_targets(model, tok, config.profile(base), jobs, control=control)
                out, target_width = run_targets(model, tok, targets, max_new_tokens=max_new_tokens, do_sample=False)
                for j, target in enumerate(targets):
                    emit(batch[target.row], key, tok.decode(out[j, target_width:], skip_special_tokens=True),
                         bridge=target.bridge)
            if controls:
                _hop_rows(model, tok, base, [r for r in batch if (r.id, "hop1") not in done], emit, max_new_tokens)
            sink.flush()
            n_done += len(batch)
            rate = n_done / (time.perf_counter() - started)
            print(f"sweep: {n_done}/{len(records)} questions ({rate:.2f} q/s)", flush=True)


def _hop_rows(model, tok, base: PatchProfile, records: Sequence[QARecord], emit, max_new_tokens: int) -> None:
    """Hop 1 alone and hop 2 with the gold bridge, asked in the profile's format (the gap-subset diagnostics)."""
    from autopatch.strategies import Target, run_targets
    from eval.methods import hop_questions

    if not records:
        return
    hops = [hop_questions(r) for r in records]
    for name, question_at, golds_at in (("hop1", 0, 1), ("hop2", 2, 3)):
        targets = [Target(i, tok(base.prompt_format.render(cast(str, h[question_at]), tok), return_tensors="pt").input_ids[0])
                   for i, h in enumerate(hops)]
        out, width = run_targets(model, tok, targets, max_new_tokens=max_new_tokens, do_sample=False)
        for i, rec in enumerate(records):
            emit(rec, name, tok.decode(out[i, width:], skip_special_tokens=True), golds=hops[i][golds_at])


def load_sweep(path: Path) -> SweepTable:
    """``{key: {question_id: row}}`` from a sweep file, keys parsed (the last line wins on duplicates)."""
    table: SweepTable = defaultdict(dict)
    parsed: dict[str, RowKey] = {}
    for n, row in enumerate(iter_rows(path), 1):
        text = row["config"]
        if text not in parsed:
            try:
                parsed[text] = parse_row_key(text)
            except ValueError as err:
                raise ConfigError(f"{path}: row {n}, field 'config': {text!r} is neither vanilla, a reference row "
                                  f"({', '.join(REFERENCE_KEYS)}), a configuration key nor {RANDOM_PREFIX}<key> "
                                  f"({err})") from err
        table[parsed[text]][row["id"]] = row
    return table


def summarize(table: SweepTable) -> list[dict]:
    """Per configuration: n, EM and contains of always-patching (unlocated questions keep vanilla), fixes, breaks.

    ``config`` holds each row's key (a :data:`RowKey`): configurations, their controls and the text references.
    """
    vanilla = table["vanilla"]
    summary = []
    for key, rows in table.items():
        if key in ("vanilla", "hop1", "hop2"):
            continue
        ids = list(vanilla)
        em = [rows[i]["em"] if i in rows else vanilla[i]["em"] for i in ids]
        cont = [rows[i]["contains"] if i in rows else vanilla[i]["contains"] for i in ids]
        fixed = sum(1 for i in ids if i in rows and rows[i]["em"] > vanilla[i]["em"])
        broken = sum(1 for i in ids if i in rows and rows[i]["em"] < vanilla[i]["em"])
        summary.append({"config": key, "n": len(ids), "em": sum(em) / len(ids), "contains": sum(cont) / len(ids),
                        "fixed": fixed, "broken": broken})
    summary.sort(key=lambda r: (-r["em"], -r["contains"], row_key_text(r["config"])))
    return summary


def summary_markdown(table: SweepTable, command: str) -> str:
    vanilla = table["vanilla"]
    n = len(vanilla)
    lines = [
        "# Patch-configuration sweep",
        "",
        f"Made by `{command}`. {n} training questions; greedy; each configuration patches every located question "
        "(unlocated ones keep the vanilla answer). `fixed`/`broken`: EM gained/lost against vanilla.",
        "",
        f"Vanilla: EM {sum(r['em'] for r in vanilla.values()) / n:.3f}, "
        f"contains {sum(r['contains'] for r in vanilla.values()) / n:.3f}, "
        f"located {sum(1 for r in vanilla.values() if r.get('located')) / n:.3f}.",
        "",
        "| config (strategy\\|position\\|ℓ\\|ℓ*\\|bridge prompt) | EM | contains | fixed | broken |",
        "|---|---|---|---|---|",
    ]
    for row in summarize(table):
        lines.append(f"| {row_key_text(row['config']).replace('|', chr(92) + '|')} | {row['em']:.3f} | {row['contains']:.3f} | "
                     f"{row['fixed']} | {row['broken']} |")
    return "\n".join(lines) + "\n"


def best_per_strategy(table: SweepTable) -> dict[str, SweepConfig]:
    best: dict[str, SweepConfig] = {}
    for row in summarize(table):  # sorted best first
        if isinstance(row["config"], SweepConfig):
            best.setdefault(row["config"].strategy, row["config"])
    return best


def write_profiles(table: SweepTable, model_type: str, fingerprint: str, base: PatchProfile,
                   source: str, directory: Path) -> list[Path]:
    """Save the best configuration per strategy (``<strategy>.json``) and the best overall (``profile.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = {r["config"]: r for r in summarize(table)}
    written = []
    best_overall = None
    for strategy, config in best_per_strategy(table).items():
        r = rows[config]
        note = (f"sweep on {source}: best {strategy} config, always-patch EM {r['em']:.3f} "
                f"(vanilla {sum(v['em'] for v in table['vanilla'].values()) / r['n']:.3f}, n={r['n']})")
        profile = replace(config.profile(base), model_type=model_type, model_fingerprint=fingerprint, note=note)
        path = directory / f"{strategy}.json"
        profile.save(path)
        written.append(path)
        if best_overall is None or r["em"] > rows[best_overall[0]]["em"]:
            best_overall = (config, profile)
    if best_overall is not None:
        path = directory / "profile.json"
        best_overall[1].save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sweep patch configurations on training questions.")
    parser.add_argument("--dataset", default="twohop")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=160)
    parser.add_argument("--model", default=None)
    add_quantize_arg(parser)
    parser.add_argument("--out", default="runs/sweep_train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--controls", action="store_true",
                        help="also run each configuration's random-vector control, decompose, control-text and the "
                             "hop diagnostics (the study compares against them; see eval/study.py)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default",
                        help="default: strategies x positions x layers (38 points on 18 layers); study: the reroute "
                             "study, (ℓ, ℓ*) with ℓ* ≤ ℓ from the span end and the subject end, plus span verbalize; "
                             "focus: the study cut to what the 0.5B study left open, plus same-prompt isolate (20 points)")
    parser.add_argument("--configs", default=None, metavar="KEYS",
                        help="run these configurations instead of a grid (comma-separated keys as in sweep.jsonl, "
                             "e.g. the ones chosen on a training sweep, to confirm them on dev)")
    parser.add_argument("--summarize", help="a sweep.jsonl to summarise instead of running")
    parser.add_argument("--write-profile", action="store_true",
                        help="with --summarize: save the chosen profiles into --out/profiles/")
    parser.add_argument("--ship", action="store_true",
                        help="with --write-profile: also replace the shipped profiles of this model (tracked files)")
    parser.add_argument("--markdown", help="with --summarize: write the table to this file")
    args = parser.parse_args(argv)
    if args.split in ("test",):
        parser.error("the sweep chooses the profile: run it on a training split (twohop train, musique calib), never test")
    chosen = [_parse_key(k.strip(), parser) for k in (args.configs or "").split(",") if k.strip()]
    if args.summarize:
        table = load_sweep(Path(args.summarize))
        text = summary_markdown(table, "python -m eval.sweep " + " ".join(sys.argv[1:] if argv is None else argv))
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text)
        if args.write_profile:
            from autopatch import load_model

            model, tok = load_model(args.model, quantize=args.quantize)
            from autopatch.fingerprint import model_fingerprint
            from autopatch.profile import PROFILES_DIR, ship_name, shipped_profile_dir
            from autopatch.resolve import model_profile

            base = model_profile(model, tok)
            fingerprint = model_fingerprint(model)
            targets = [Path(args.out) / "profiles"]
            if args.ship:
                targets.append(shipped_profile_dir(fingerprint) or PROFILES_DIR / ship_name(model))
            for directory in targets:
                for path in write_profiles(table, model.config.model_type, fingerprint, base, args.summarize, directory):
                    print(f"wrote {path}")
        return 0

    from autopatch import load_model

    torch.set_grad_enabled(False)
    model, tok = load_model(args.model, quantize=args.quantize)
    records = stratified_sample(load_dataset_by_name(args.dataset, split=args.split, hops=2), args.limit)
    configs = chosen or GRIDS[args.grid](num_layers(model))
    print(f"sweep: {len(records)} questions x {len(configs)} configurations -> {args.out}/sweep.jsonl", flush=True)
    run_sweep(model, tok, records, configs, Path(args.out) / "sweep.jsonl", batch_size=args.batch_size,
              max_new_tokens=args.max_new_tokens, controls=args.controls)
    return 0


def _parse_key(key: str, parser: argparse.ArgumentParser) -> SweepConfig:
    from autopatch import registry

    try:
        config = SweepConfig.from_key(key)
        registry.strategy(config.strategy)
    except (ValueError, ConfigError) as err:
        parser.error(f"--configs: {key!r} is not a configuration key (strategy|position|source|target|prompt[|scale]): "
                     f"{err}")
    return config


def stratified_sample(records: Sequence[QARecord], limit: int | None) -> list[QARecord]:
    """A deterministic sample that takes questions round-robin over compositions (or all, if ``limit`` is None)."""
    if not limit or limit >= len(records):
        return list(records)
    return stratified_order(records)[:limit]


def stratified_order(records: Sequence[QARecord]) -> list[QARecord]:
    """Every record, round-robin over compositions (each by the SHA-256 of its id): its first N are
    :func:`stratified_sample`'s N, which is how lm-eval's ``--limit N`` meets ``autopatch eval --limit N``."""
    groups: dict[str, list[QARecord]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest()):
        groups[str(rec.meta.get("composition", "all"))].append(rec)
    picked: list[QARecord] = []
    while len(picked) < len(records):
        for name in sorted(groups):
            if groups[name]:
                picked.append(groups[name].pop(0))
    return picked


if __name__ == "__main__":
    raise SystemExit(main())
