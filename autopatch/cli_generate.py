"""``autopatch generate``: answer one question through AutoPatcher, optionally explaining what it did.

Example:
    $ autopatch generate "Who is the spouse of the Green performer?" --explain
    $ autopatch generate "What is the capital of the country where the Colosseum is located?" --no-patch
"""

from __future__ import annotations

import argparse
import json
import logging

from autopatch.cli import _add_model_arg, subcommand
from autopatch.registry import DECOMPOSERS, standalone_strategies


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the (two-hop) question to answer")
    _add_model_arg(parser)
    parser.add_argument("--explain", action="store_true", help="print the per-row report as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-patch", action="store_true", help="plain model.generate, for comparison")
    parser.add_argument("--strategy", choices=list(standalone_strategies()),
                        help="use the shipped profile of this strategy for the model (its best swept configuration)")
    parser.add_argument("--profile", help="a patch profile JSON file (default: the shipped one for the model)")
    parser.add_argument("--gate", help="a gate directory (default: the gate shipped for the model)")
    parser.add_argument("--decomposer", choices=DECOMPOSERS, default=None,
                        help="who reads the question's first hop: the locator's grammar, the model's own "
                             "decomposition, or both (the model where the grammar reads nothing); default: the one "
                             "shipped for the model (chosen on calib), else the grammar")


@subcommand("generate", "answer a question with autopatch; --explain prints what it did and why", _configure)
def run_generate(args: argparse.Namespace) -> int:
    from autopatch import load_model
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import strategy_profile

    model, tok = load_model(args.model, quantize=args.quantize, batch_invariant=args.batch_invariant)
    patcher = AutoPatcher(model, tok, args.profile, args.gate, decomposer=args.decomposer)
    if args.strategy and args.profile is None:
        profile, swept = strategy_profile(model, args.strategy, patcher.profile)
        if not swept:
            logging.getLogger("autopatch").warning(
                "no swept %s profile is shipped for this model; using layers %d -> %d", args.strategy,
                profile.source_layer, profile.target_layer)
        patcher = AutoPatcher(model, tok, profile, patcher.gate, decomposer=args.decomposer)
    (answer,) = patcher.answer(args.question, max_new_tokens=args.max_new_tokens, patching=not args.no_patch)
    print(answer.text)
    if args.explain:
        print(json.dumps({"profile": patcher.profile.to_dict(), "resolution": patcher.resolution.to_dict(),
                          "report": answer.report.to_dict()}, indent=2))
    return 0


def _configure_explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="a two-hop question the locator reads")
    _add_model_arg(parser)
    parser.add_argument("--bridge", default=None,
                        help="the first hop's answer to track (default: the one decompose finds with this model)")
    parser.add_argument("--out", default=None, help="write explain.json, explain.md and explain.png here")


@subcommand("explain", "what every layer's state decodes to at the located subject, span end and last token "
            "(Patchscopes and the logit lens), as a table, a heat map and JSON", _configure_explain)
def run_explain(args: argparse.Namespace) -> int:
    from autopatch import load_model
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import strategy_profile

    model, tok = load_model(args.model, quantize=args.quantize, batch_invariant=args.batch_invariant)
    patcher = AutoPatcher(model, tok)
    bridge = args.bridge
    if bridge is None:  # what the text decomposition finds: the reading the hidden state is compared with
        decompose = AutoPatcher(model, tok, strategy_profile(model, "decompose", patcher.profile)[0], gate=AlwaysPatch())
        bridge = decompose.answer(args.question)[0].report.bridge
    view = patcher.explain(args.question, bridge=bridge or None)
    print(view.table())
    if args.out:
        print(f"wrote {view.save(args.out)}/explain.json, explain.md and explain.png")
    return 0
