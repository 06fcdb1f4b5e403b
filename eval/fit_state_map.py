"""Fit the cross-model map between two embedded models on calib prompts and ship it beside the target's profile.

Example:
    $ python -m eval.fit_state_map --target qwen2.5-coder-1.5b-instruct --source qwen2.5-coder-0.5b-instruct

The prompts are calib/train questions only (the generator's train split and MuSiQue 2-hop calib questions),
rendered in the target's prompt format, so no test question is ever read. The target layer is the one the
target's shipped ``reroute`` profile reads (``cross-model`` patches what ``reroute`` patches, from the other
model); the source layer is the same relative depth in the source, unless ``--source-layer`` says otherwise. The
map goes to ``autopatch/profiles/<target>/maps/<source>/`` (or ``--out``), and the ``cross-model`` profile,
``reroute``'s with the strategy changed, beside the target's other profiles.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import replace
from pathlib import Path


def calib_prompts(tok, fmt, *, twohop: int = 200, musique: int = 200) -> list[str]:
    """The fit's prompts: calib/train questions in the target's format (see the module docstring)."""
    from eval.datasets import load_musique
    from eval.sweep import stratified_sample
    from eval.twohop import generate_twohop

    questions = [r.question for r in stratified_sample(generate_twohop(split="train"), twohop)]
    ordered = sorted(load_musique(split="calib", hops=2), key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    questions += [r.question for r in ordered[:musique]]
    return [fmt.render(q, tok) for q in questions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", required=True, help="the model patched (an embedded model's name)")
    parser.add_argument("--source", required=True, help="the model whose states are mapped in")
    parser.add_argument("--source-layer", type=int, default=None, help="default: the target layer's relative depth")
    parser.add_argument("--quantize", default=None, help="both models' mode (default: each model's CPU default)")
    parser.add_argument("--out", default=None, help="default: autopatch/profiles/<target>/maps/<source>/")
    args = parser.parse_args(argv)

    import torch

    from autopatch import load_model
    from autopatch.architectures import num_layers
    from autopatch.crossmodel import fit_state_map
    from autopatch.fingerprint import model_fingerprint
    from autopatch.profile import PatchProfile, shipped_profile_dir

    torch.set_grad_enabled(False)
    target, tok = load_model(args.target, quantize=args.quantize)
    source, source_tok = load_model(args.source, quantize=args.quantize)
    reroute = PatchProfile.shipped_for(target, variant="reroute")
    directory = shipped_profile_dir(model_fingerprint(target))
    if reroute is None or directory is None:
        raise SystemExit(f"{args.target} ships no reroute profile: cross-model patches what reroute patches.")
    target_layer = reroute.source_layer
    source_layer = args.source_layer if args.source_layer is not None else round(
        (target_layer + 1) * num_layers(source) / num_layers(target)) - 1
    prompts = calib_prompts(tok, reroute.prompt_format)
    print(f"fitting {args.source} layer {source_layer} -> {args.target} layer {target_layer} on {len(prompts)} calib "
          "prompts", file=sys.stderr)
    state_map = fit_state_map(source, target, tok, prompts, source_layer=source_layer, target_layer=target_layer,
                              source_tok=source_tok)
    state_map.meta.update({"source": args.source, "target": args.target,
                           "command": "python -m eval.fit_state_map " + " ".join(argv or sys.argv[1:])})
    out = Path(args.out) if args.out else directory / "maps" / args.source
    state_map.save(out)
    if not args.out:
        replace(reroute, strategy="cross-model", note=f"reroute's configuration, from {args.source} through "
                f"maps/{args.source}").save(directory / "cross-model.json")
    meta = state_map.meta
    print(f"wrote {out}: held-out R² {meta['held_out_r2']:.3f} at penalty {meta['alpha']:g} "
          f"({meta['pairs']} token pairs; by penalty {meta['held_out_r2_by_alpha']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
