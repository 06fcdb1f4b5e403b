"""Speculative decoding on the 1.5B with the 0.5B as its draft (transformers' assisted generation), against the
1.5B alone: seconds for the same greedy tokens, and whether they are the same tokens.

Example:
    $ python bench/bench_assisted.py                  # each model in its CPU default mode, 32 tokens, 8 prompts

Both Qwen2.5-Coder models share one tokenizer, so the 0.5B can propose tokens the 1.5B checks in one forward pass.
Each prompt (4 two-hop questions, 4 ordinary requests, through the chat template) makes exactly ``--tokens`` new
tokens both ways (``min_new_tokens``), alternated per prompt after one warm-up of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--quantize", default=None, help="the 1.5B's mode (default: its CPU default)")
    parser.add_argument("--draft-quantize", default=None, help="the 0.5B's mode (default: its CPU default)")
    args = parser.parse_args(argv)

    import torch

    import autopatch
    from autopatch.quantize import model_quantization
    from bench.questions import ORDINARY, QUESTIONS

    torch.set_grad_enabled(False)
    target, tok = autopatch.load_model("qwen2.5-coder-1.5b-instruct", quantize=args.quantize)
    draft, _ = autopatch.load_model("qwen2.5-coder-0.5b-instruct", quantize=args.draft_quantize)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS[:4] + ORDINARY[:4]]

    def run(prompt: str, **kwargs) -> tuple[float, torch.Tensor]:
        ids = tok(prompt, return_tensors="pt")
        start = time.perf_counter()
        out = target.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, **kwargs)
        return time.perf_counter() - start, out[0, ids.input_ids.shape[1]:]

    run(prompts[0])
    run(prompts[0], assistant_model=draft)
    print(f"1.5B ({model_quantization(target)}) alone against 0.5B ({model_quantization(draft)}) drafting for it; "
          f"{args.tokens} tokens a prompt, greedy\n")
    print("| prompt | alone s | assisted s | same tokens |")
    print("|---|---:|---:|---|")
    alone = assisted = 0.0
    same = 0
    for prompt, question in zip(prompts, QUESTIONS[:4] + ORDINARY[:4]):
        a, x = run(prompt)
        b, y = run(prompt, assistant_model=draft)
        alone, assisted, same = alone + a, assisted + b, same + int(torch.equal(x, y))
        print(f"| {question} | {a:.2f} | {b:.2f} | {torch.equal(x, y)} |")
    print(f"\nalone {alone:.2f} s, assisted {assisted:.2f} s: assisted runs at {alone / assisted:.2f}x the speed; "
          f"{same}/{len(prompts)} prompts the same tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
