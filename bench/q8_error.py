"""How far rounding the activations to int8 (the ``-q8`` modes) moves each layer's product, by layer kind.

Example:
    $ python bench/q8_error.py --model qwen2.5-coder-1.5b-instruct --out docs/q8_error_qwen2.5-coder-1.5b-instruct.txt

The model loads in ``--quantize`` (``int4``: the weights the ``int4-q8`` mode multiplies); a forward pass over
``--limit`` two-hop *train* questions (chat prompts) records every packed layer's input rows. For each layer, in
float64 against ``x @ W.T`` (``W`` the layer's dequantized weight), the relative error
``||y - x @ W.T|| / ||x @ W.T||`` of

* ``kernel``: the ``-q8`` kernel itself (``kernels.bind(..., q8=True)``): the weight times x as rounded;
* ``exact offset``: an int4 weight ``a q + b`` whose offset ``b`` multiplies the *exact* sum of each group's
  inputs while ``a q`` meets the rounded x (the kernel before it was changed; int4 layers only): its error is
  ``a sum q e`` with ``q`` in 0..15, against the kernel's ``sum (a q + b) e``;

averaged over the layers of each kind (``q_proj``, ..., ``lm_head``) and weight format. Also each kind's mean
``max|x| / mean|x|`` over groups of 32 inputs (how peaked the inputs are the rounding scales to). No timing.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _inputs(model, tok, questions: list[str]) -> dict[str, torch.Tensor]:
    """Each packed layer's input rows over one forward pass per question."""
    from autopatch.quantize_layers import PackedLinear

    seen: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(
                 args[0].reshape(-1, mod.in_features).float()))
             for name, module in model.named_modules() if isinstance(module, PackedLinear)]
    try:
        with torch.no_grad():
            for question in questions:
                text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
                model(**tok(text, return_tensors="pt"))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def _errors(layer, x: torch.Tensor) -> dict[str, float]:
    from autopatch import kernels

    weight = layer.dequantized_weight().double()
    want = x.double() @ weight.t()
    bias = layer.bias.double() if layer.bias is not None else 0.0
    bound = kernels.bind(layer.bits, layer.qweight, layer.gscale, layer.bias, n=layer.out_features,
                         k=layer.in_features, q8=True)
    out = {"kernel": ((bound(x.contiguous()).double() - bias - want).norm() / want.norm()).item()}
    if layer.bits == 4:
        xq, d, _ = kernels.q8_quantize(x)
        rounded = (xq.double().reshape(len(x), -1, kernels.GROUP) * d.double()[..., None]).reshape(x.shape)
        offset = kernels.unpack4_scales(layer.gscale, layer.out_features)[1].double()
        spread = offset.repeat_interleave(kernels.GROUP, dim=1)
        old = rounded @ (weight - spread).t() + x.double() @ spread.t()
        out["exact offset"] = ((old - want).norm() / want.norm()).item()
    groups = x.reshape(len(x), -1, kernels.GROUP).abs()
    out["peak"] = (groups.amax(-1) / groups.mean(-1).clamp_min(1e-12)).mean().item()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--quantize", default="int4", help="the weights' mode (int4 or int8)")
    parser.add_argument("--limit", type=int, default=12, help="two-hop train questions (the first N)")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)

    import autopatch
    from autopatch.quantize_layers import PackedLinear
    from bench.machine import cpu_name, cpu_summary
    from eval.datasets import load_dataset_by_name

    model, tok = autopatch.load_model(args.model, quantize=args.quantize)
    questions = [r.question for r in load_dataset_by_name("twohop", split="train", hops=2)[: args.limit]]
    inputs = _inputs(model, tok, questions)
    table: dict[tuple[str, int], list[dict[str, float]]] = collections.defaultdict(list)
    for name, layer in model.named_modules():
        if isinstance(layer, PackedLinear) and name in inputs:
            table[(name.rsplit(".", 1)[-1], layer.bits)].append(_errors(layer, inputs[name]))
    rows = sum(len(x) for x in inputs.values()) // max(len(inputs), 1)
    lines = [f"# python bench/q8_error.py --model {args.model} --quantize {args.quantize} --limit {args.limit}",
             f"# {cpu_name()}, {cpu_summary()}; {rows} input rows a layer; relative error of the product (mean over layers)",
             "| layer | weights | layers | kernel (W times rounded x) | exact offset (before) | max/mean |x| a group |",
             "|---|---|---|---|---|---|"]
    for (kind, bits), found in sorted(table.items()):
        mean = {key: sum(f[key] for f in found) / len(found) for key in found[0]}
        old = f"{mean['exact offset']:.4f}" if "exact offset" in mean else "-"
        lines.append(f"| {kind} | int{bits} | {len(found)} | {mean['kernel']:.4f} | {old} | {mean['peak']:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
