"""``autopatch train-gate``: reproduce the shipped gate (see :mod:`classifiers.train`).

Example:
    $ autopatch train-gate --out runs/gate --ship
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from autopatch.cli import _add_model_arg, subcommand
from autopatch.errors import ConfigError

if TYPE_CHECKING:
    from autopatch.profile import PatchProfile

DEFAULT_TRAIN = "twohop:train:600,musique:calib:200"
DEFAULT_DEV = "twohop:dev:240"


def _configure(parser: argparse.ArgumentParser) -> None:
    _add_model_arg(parser)
    parser.add_argument("--train", default=DEFAULT_TRAIN, help="DATASET:SPLIT[:LIMIT],... (never a test split)")
    parser.add_argument("--dev", default=DEFAULT_DEV, help="validation questions for the threshold")
    parser.add_argument("--out", required=True, help="directory for labels, features, cv.md and the gate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--choose", default=None, metavar="STRATEGIES",
                        help="train a choosing gate over these strategies (comma-separated, e.g. "
                             "verbalize,reroute,decompose; each with the model's shipped profile for it) instead of "
                             "a yes/no gate for the model's profile")
    parser.add_argument("--labels-from", default=None, metavar="SWEEPS",
                        help="comma-separated sweep.jsonl files of the same model (eval.sweep, same questions) whose "
                             "vanilla and candidate rows are reused as labels instead of generated again")
    parser.add_argument("--retune", action="store_true",
                        help="re-tune the decision rule of the choosing gate already saved in --out from its cached dev "
                             "labels and features (no model, nothing generated)")
    parser.add_argument("--ship", action="store_true",
                        help="also replace this model's shipped gate in classifiers/shipped/ (tracked files: commit or revert)")


def _seed_from_sweeps(args: argparse.Namespace, out: Path, profiles: dict[str | None, PatchProfile]) -> None:
    """Copy finished sweep rows into each gate's label files (see :func:`classifiers.labels.seed_labels`)."""
    from classifiers.labels import seed_labels
    from classifiers.train import _source_name, parse_sources
    from eval.jsonl import iter_rows
    from eval.sweep import REFERENCE_KEYS, SweepConfig

    rows = [row for path in args.labels_from.split(",") if path.strip() for row in iter_rows(Path(path.strip()))]
    sources = [*parse_sources(args.train), *parse_sources(args.dev)]
    for name, profile in profiles.items():
        key = SweepConfig.of(profile).key
        alias = profile.strategy if profile.strategy in REFERENCE_KEYS else None
        for dataset, split, _ in sources:
            label_file = (out / name if name else out) / f"labels_{_source_name(dataset, split)}.jsonl"
            n = seed_labels(label_file, key, rows, alias=alias)
            print(f"train-gate: {n} rows of {args.labels_from} reused for {key} in {label_file}", flush=True)


def _retune(out: Path, *, ship: bool) -> int:
    from classifiers import SHIPPED_DIR, shipped_gate_dir
    from classifiers.train import retune_choice_gate

    choice = retune_choice_gate(out)
    print(json.dumps(choice.meta.get("dev"), indent=2))
    print(f"re-tuned {out}/choice.json")
    if ship:
        fingerprint = str(choice.fingerprint)
        target = shipped_gate_dir(fingerprint)
        if target is None:
            raise ConfigError(f"No gate is shipped for fingerprint {fingerprint} under {SHIPPED_DIR}; ship it from a "
                              "training run (train-gate --choose ... --ship) instead.")
        choice.save(target)
        print(f"shipped it to {target}")
    return 0


@subcommand("train-gate", "train the patch gate on training questions and save it without pickle", _configure)
def run_train_gate(args: argparse.Namespace) -> int:
    import torch

    from autopatch import load_model, registry
    from autopatch.profile import PatchProfile, strategy_profile
    from classifiers.train import cv_markdown, parse_sources, train_choice_gate, train_gate

    if args.retune:
        return _retune(Path(args.out), ship=args.ship)
    parse_sources(args.train), parse_sources(args.dev)  # refuse a bad source before the model loads
    strategies = [s.strip() for s in (args.choose or "").split(",") if s.strip()]
    for name in strategies:
        registry.strategy(name)  # an unknown name is refused before the model loads
    missing = [p for p in (args.labels_from or "").split(",") if p.strip() and not Path(p.strip()).is_file()]
    if missing:
        raise ConfigError(f"--labels-from: no sweep file at {', '.join(missing)}; run eval.sweep first or drop the option")
    torch.set_grad_enabled(False)
    model, tok = load_model(args.model, quantize=args.quantize)
    if strategies:
        base = PatchProfile.shipped_for(model) or PatchProfile.default_for(model)
        candidates = {name: strategy_profile(model, name, base)[0] for name in strategies}
        if args.labels_from:
            _seed_from_sweeps(args, Path(args.out), dict(candidates))
        choice = train_choice_gate(model, tok, candidates=candidates, train=args.train, dev=args.dev, out=Path(args.out),
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, ship=args.ship)
        print(json.dumps(choice.meta, indent=2))
        print(f"wrote {args.out}/choice.json and one gate per strategy" + (" (and shipped it)" if args.ship else ""))
        return 0
    if args.labels_from:
        _seed_from_sweeps(args, Path(args.out), {None: PatchProfile.shipped_for(model) or PatchProfile.default_for(model)})
    gate = train_gate(model, tok, train=args.train, dev=args.dev, out=Path(args.out), batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, ship=args.ship)
    print(cv_markdown(gate))
    print(f"wrote {args.out}/gate.json and gate.npz" + (" (and shipped it)" if args.ship else ""))
    return 0


def _configure_screen(parser: argparse.ArgumentParser) -> None:
    _add_model_arg(parser)
    parser.add_argument("--out", required=True, help="directory for screen/, screen.json and screen.md")
    parser.add_argument("--max-fpr", type=float, default=0.05,
                        help="share of located calib requests that are not two-hop questions allowed through (held out)")
    parser.add_argument("--layers", default=None, help="feature layers, comma-separated (default: n/2 and 2n/3)")
    parser.add_argument("--components", type=int, default=64, help="PCA components of the logistic regression")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ship", action="store_true",
                        help="also put the screen beside this model's shipped gate in classifiers/shipped/")


@subcommand("train-screen", "train the two-hop screen that keeps gates off other requests (classifiers.screen)",
            _configure_screen)
def run_train_screen(args: argparse.Namespace) -> int:
    import torch

    from autopatch import load_model
    from autopatch.fingerprint import model_fingerprint
    from classifiers import SHIPPED_DIR, shipped_gate_dir
    from classifiers.screen import save_screen, screen_markdown, train_screen

    if not 0.0 <= args.max_fpr < 1.0:
        raise ConfigError(f"--max-fpr must be in [0, 1); got {args.max_fpr}")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    torch.set_grad_enabled(False)
    model, tok = load_model(args.model, quantize=args.quantize)
    screen = train_screen(model, tok, out=Path(args.out), layers=layers, max_fpr=args.max_fpr, n_components=args.components,
                          batch_size=args.batch_size)
    print(screen_markdown(screen.meta["summary"]))
    if args.ship:
        target = shipped_gate_dir(model_fingerprint(model))
        if target is None:
            raise ConfigError(f"No gate is shipped for this model under {SHIPPED_DIR}; a screen ships beside a gate.")
        save_screen(screen, target)
        (target / "screen.md").write_text(screen_markdown(screen.meta["summary"]))
        print(f"shipped it to {target}")
    return 0
