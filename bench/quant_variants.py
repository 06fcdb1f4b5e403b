"""Where int8 loses accuracy: each way of quantizing, against float32, on the same two-hop dev questions.

Example:
    $ python bench/quant_variants.py --model qwen2.5-coder-1.5b-instruct --limit 64

Vanilla answers (``AutoPatcher`` with the gate off, greedy, 12 tokens, batches of 8) on ``--limit`` questions
drawn with a fixed seed from the two-hop *dev* split (never the test split the modes are reported on). Per
variant: EM, and the share of answers identical to float32's. The variants separate the two sources of error:

* ``weights-only (simulated)``: every decoder Linear's weight rounded to int8 per channel, multiplied in float;
* ``activations-only (simulated)``: float weights, the Linear inputs rounded to int8 per token;
* ``activations-only except down_proj``: as above, the MLP down-projections' inputs left in float;
* ``torch quantize_dynamic``: torch's eager dynamic int8 (per-channel weights, one activation scale per tensor);
* the shipped modes ``int8`` (weight-only, autopatch's kernel) and ``int8-dynamic`` (per-token activations).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


class _SimulatedWeights(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        from autopatch.quantize import quantize_per_channel

        q, scale = quantize_per_channel(linear.weight.detach().float())
        self.weight, self.bias = q.float() * scale[:, None], linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class _SimulatedActivations(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        from autopatch.quantize import quantize_per_token

        q, scale = quantize_per_token(x.reshape(-1, x.shape[-1]).float())
        return self.linear((q.float() * scale).reshape(x.shape))


def _swap(model: nn.Module, wrap, skip: tuple[str, ...] = ()) -> None:
    from autopatch.architectures import decoder_layers

    blocks = decoder_layers(model)
    for name, module in list(blocks.named_modules()):
        if isinstance(module, nn.Linear) and not (skip and name.endswith(skip)):
            parent, _, child = name.rpartition(".")
            setattr(blocks.get_submodule(parent), child, wrap(module))


def _torch_dynamic(model: nn.Module) -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from autopatch.architectures import decoder_layers

    quantize_dynamic(decoder_layers(model), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


VARIANTS = {
    "float32": ("none", None),
    "weights-only (simulated)": ("none", lambda m: _swap(m, _SimulatedWeights)),
    "activations-only (simulated)": ("none", lambda m: _swap(m, _SimulatedActivations)),
    "activations-only except down_proj": ("none", lambda m: _swap(m, _SimulatedActivations, ("down_proj",))),
    "torch quantize_dynamic (per-tensor activations)": ("none", _torch_dynamic),
    "int8 (shipped: weight-only kernel)": ("int8", None),
    "int8-dynamic (shipped: per-token activations)": ("int8-dynamic", None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--limit", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    import warnings

    warnings.filterwarnings("ignore")
    import autopatch
    from autopatch.gating import NeverPatch
    from eval.metrics import exact_match
    from eval.twohop import generate_twohop

    records = generate_twohop("dev")
    random.Random(0).shuffle(records)
    records = records[: args.limit]
    questions = [r.question for r in records]
    golds = [[r.answer, *r.answer_aliases] for r in records]
    reference: list[str] | None = None
    print(f"model: {args.model}, {len(questions)} two-hop dev questions, vanilla answers\n")
    print("| variant | EM | identical to float32 |")
    print("|---|---|---|")
    for name, (mode, change) in VARIANTS.items():
        model, tok = autopatch.load_model(args.model, quantize=mode)
        if change is not None:
            change(model)
        patcher = autopatch.AutoPatcher(model, tok, gate=NeverPatch())
        answers = [a.text for i in range(0, len(questions), 8) for a in patcher.answer(questions[i : i + 8], max_new_tokens=12)]
        reference = reference or answers
        em = sum(exact_match(a, g) for a, g in zip(answers, golds)) / len(questions)
        same = sum(a == b for a, b in zip(answers, reference)) / len(questions)
        print(f"| {name} | {em:.3f} | {same:.1%} |", flush=True)
        del model, patcher
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
