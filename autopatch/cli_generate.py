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


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the (two-hop) question to answer")
    _add_model_arg(parser)
    parser.add_argument("--explain", action="store_true", help="print the per-row report as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-patch", action="store_true", help="plain model.generate, for comparison")
    parser.add_argument("--strategy", choices=["reroute", "backpatch", "verbalize"],
                        help="use the shipped profile of this strategy for the model (its best swept configuration)")
    parser.add_argument("--profile", help="a patch profile JSON file (default: the shipped one for the model)")


@subcommand("generate", "answer a question with autopatch; --explain prints what it did and why", _configure)
def run_generate(args: argparse.Namespace) -> int:
    from autopatch import load_model
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import PatchProfile, strategy_profile

    model, tok = load_model(args.model)
    profile = PatchProfile.load(args.profile) if args.profile else None
    if profile is None and args.strategy:
        profile, swept = strategy_profile(model, args.strategy, AutoPatcher(model, tok).profile)
        if not swept:
            logging.getLogger("autopatch").warning(
                "no swept %s profile is shipped for this model; using layers %d -> %d", args.strategy,
                profile.source_layer, profile.target_layer)
    patcher = AutoPatcher(model, tok, profile)
    fmt = patcher.profile.prompt_format
    prompt = fmt.render(args.question, tok)
    enc = tok([prompt], return_tensors="pt", padding=True).to(model.device)
    stops = {"stop_strings": list(fmt.stop_strings), "tokenizer": tok} if fmt.stop_strings else {}
    out = patcher.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id, questions=[args.question], patching=not args.no_patch,
                           **stops)
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    print(answer.strip().split("\n", 1)[0])
    if args.explain:
        print(json.dumps({"profile": patcher.profile.to_dict(), "report": patcher.last_report[0].to_dict()}, indent=2))
    return 0
