"""Which layers a ``-q8`` mode should leave on float32 activations: each variant's distance from its weights' mode.

Example:
    $ python bench/q8_variants.py --model qwen2.5-coder-1.5b-instruct --limit 48 \\
          --variants ",lm_head,o_proj,down_proj,up_proj,gate_proj,gate_proj+up_proj"

The model loads in ``--weights`` (``int4``: float32 activations, the reference). Its greedy answers (``--tokens``
new tokens) to ``--limit`` two-hop *dev* questions, in the model's own prompt format, are the teacher. Each variant
is ``<weights>-q8`` with the named layers' inputs kept float32 (:meth:`QuantMode.with_q8_activations`, applied with
:func:`autopatch.quantize.apply_mode`, the shipped mechanism); the empty variant rounds every input. Per variant,
teacher-forced on those answers: the mean KL(reference || variant) of the next-token distribution at the answer's
first token and over all its tokens, how often the top token changes, the share of the weights' bytes whose
inputs stay float32, and greedy decode tokens/s on one prompt (``4 * --tokens`` tokens, each timed as it is made,
best of ``--repeats``: a guide; ``bench/bench_quantize.py`` times the modes over 8 prompts). Choose on these (dev);
report a chosen mode on the test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _log_probs(model, sequences: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Each teacher sequence's next-token log-probabilities at its answer's positions (float64)."""
    with torch.no_grad():
        return [torch.log_softmax(model(ids).logits[0, start - 1 : ids.shape[1] - 1].double(), -1)
                for ids, start in sequences]


def _decode_rate(model, ids: torch.Tensor, tokens: int, repeats: int) -> float:
    """Greedy tokens/s after the first at batch 1, each token's time taken as it is made (bench_quantize's
    ``TokenClock``, EOS masked), the best of ``repeats``."""
    from transformers import StoppingCriteriaList

    from bench.bench_quantize import TokenClock, eos_disabled

    clock = TokenClock()
    gen = dict(do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), logits_processor=eos_disabled(model))
    best = 0.0
    with torch.no_grad():
        for warm in (True, *[False] * repeats):  # the first call warms: each layer binds its kernel once per mode
            clock.start()
            model.generate(ids, max_new_tokens=2 if warm else tokens, **gen)
            if not warm:
                best = max(best, (len(clock.times) - 1) / clock.after_s())
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--weights", default="int4", help="the weights' mode (int4 or int8): the reference")
    parser.add_argument("--limit", type=int, default=48, help="two-hop dev questions (the first N)")
    parser.add_argument("--tokens", type=int, default=8, help="teacher answer tokens (and decode-rate tokens x4)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",lm_head,down_proj,up_proj,gate_proj+up_proj",
                        help="comma-separated; each a '+'-joined list of layer names kept float32 ('' rounds all)")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)

    import autopatch
    from autopatch.prompts import PromptFormat
    from autopatch.quantize import apply_mode, check_mode
    from bench.machine import cpu_name, cpu_summary
    from bench.profile_decode import layer_bytes
    from eval.datasets import load_dataset_by_name

    weights = check_mode(args.weights)
    model, tok = autopatch.load_model(args.model, quantize=weights.name)
    fmt = PromptFormat.for_tokenizer(tok)
    questions = [r.question for r in load_dataset_by_name("twohop", split="dev", hops=2)[: args.limit]]
    sequences = []
    with torch.no_grad():
        for question in questions:
            ids = fmt.encode(tok, fmt.render(question, tok), return_tensors="pt").input_ids
            sequences.append((model.generate(ids, max_new_tokens=args.tokens, do_sample=False), ids.shape[1]))
    reference = _log_probs(model, sequences)
    sizes = layer_bytes(model)
    rate_ids = sequences[0][0][:, : sequences[0][1]]
    rows = [("(reference) " + weights.name, 0.0, 0.0, 0, 0, 1.0, _decode_rate(model, rate_ids, 4 * args.tokens,
                                                                              args.repeats))]
    total = sum(len(r) for r in reference)
    for variant in args.variants.split(","):
        kept = tuple(name for name in variant.split("+") if name)
        mode = weights.with_q8_activations(kept)
        apply_mode(model, mode)
        got = _log_probs(model, sequences)
        kl = [(r.exp() * (r - g)).sum(-1) for r, g in zip(reference, got)]
        first = sum(float(k[0]) for k in kl) / len(kl)
        every = float(torch.cat(kl).mean())
        flips_first = sum(int(r[0].argmax() != g[0].argmax()) for r, g in zip(reference, got))
        flips = sum(int((r.argmax(-1) != g.argmax(-1)).sum()) for r, g in zip(reference, got))
        share = sum(n for name, n in sizes.items() if mode.prefill_of(name) == torch.float32) / sum(sizes.values())
        rate = _decode_rate(model, rate_ids, 4 * args.tokens, args.repeats)
        rows.append((f"{weights.name}-q8" + (f", {' + '.join(kept)} float" if kept else ""), first, every,
                     flips_first, flips, share, rate))
        print(rows[-1], file=sys.stderr, flush=True)
    base = rows[0][-1]
    lines = [f"# python bench/q8_variants.py --model {args.model} --weights {weights.name} --limit {args.limit} "
             f"--tokens {args.tokens} --repeats {args.repeats} --variants \"{args.variants}\"",
             f"# {cpu_name()}, {cpu_summary()}; {len(questions)} dev questions, {total} answer tokens; "
             f"KL(reference || variant) in nats; decode: {4 * args.tokens} tokens, batch 1, best of {args.repeats}",
             "| variant | KL first token | KL all tokens | top-1 changed, first | top-1 changed, all | bytes on float "
             "inputs | decode tok/s |",
             "|---|---|---|---|---|---|---|"]
    for name, first, every, flips_first, flips, share, rate in rows:
        lines.append(f"| {name} | {first:.5f} | {every:.5f} | {flips_first}/{len(questions)} | {flips}/{total} | "
                     f"{share:.0%} | {rate:.2f} ({rate / base:.2f}x) |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
