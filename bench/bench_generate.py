"""Time AutoPatcher.generate against plain model.generate on the same prompts, in the same run.

Example:
    $ python bench/bench_generate.py                  # embedded Gemma, prints a markdown table
    $ python bench/bench_generate.py --model PATH --repeats 5 --max-new-tokens 16

Every method generates exactly ``--max-new-tokens`` tokens (EOS masked in place:
:func:`bench.bench_quantize.eos_disabled`, a cost no side of a ratio pays where ``min_new_tokens`` charged every
step) with greedy decoding, so the ratios compare equal work. Modes:

* ``gate says no``: AutoPatcher with NeverPatch, batch size 1, over model.generate at batch size 1, with the
  shared-prefix cache (the default) and without it (``reuse_prefix=False``).
* ``gate says yes``: AutoPatcher with AlwaysPatch, batch size 1, over model.generate, once per strategy in
  ``--strategies`` (each with the model's shipped profile for it).
* ``floor``: each ``gate says yes`` strategy over its floor, the forwards it cannot avoid: every
  ``model.generate`` call and every stand-alone forward the strategy made on these prompts (recorded once, with
  the number of tokens each generation produced), replayed as plain model calls, with no hooks, no locating,
  no stopping criteria and no prefix cache; the ``(cached)`` floor replays each generation through the library's
  layout-and-generate with the shared-prefix cache autopatch uses (still no hooks, locating or gate). What is
  above 1.00x is autopatch's own work around the model.
* ``batched``: AutoPatcher (AlwaysPatch, the model's profile) throughput at batch size ``--batch`` over its own
  batch size 1.
* ``screen says no``: the model's shipped (screened) gate on ordinary requests (``bench.questions.ORDINARY``), batch
  size 1: ``decomposer="model"`` over ``"grammar"``, and the same with the proposals asked before the screen
  (how ``"model"`` ran before it waited for the screen). Skipped when the model ships no screen.

Each timing is the median of ``--repeats`` passes over all prompts, with the
methods interleaved so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.bench_quantize import eos_disabled  # noqa: E402
from bench.questions import ORDINARY, QUESTIONS  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class ModelCalls:
    """Records the ``generate`` calls and stand-alone forwards made on ``model`` inside ``with ModelCalls(model)``,
    to replay them later as plain calls (:meth:`replay`): a strategy's floor."""

    def __init__(self, model):
        self.model, self.calls, self._depth = model, [], 0
        self.no_eos = eos_disabled(model)  # built once: replays are timed

    def __enter__(self):
        model, generate, forward = self.model, self.model.generate, self.model.forward

        def recorded_generate(input_ids=None, attention_mask=None, **kwargs):
            self._depth += 1
            try:
                out = generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            finally:
                self._depth -= 1
            sequences = out if torch.is_tensor(out) else out.sequences
            self.calls.append(("generate", input_ids.clone(), None if attention_mask is None else attention_mask.clone(),
                               sequences.shape[1] - input_ids.shape[1]))
            return out

        @functools.wraps(forward)  # the same signature: the prefix cache reads it to name its cache argument
        def recorded_forward(*args, **kwargs):
            if self._depth == 0 and kwargs.get("input_ids") is not None:
                mask = kwargs.get("attention_mask")
                self.calls.append(("forward", kwargs["input_ids"].clone(), None if mask is None else mask.clone(), 0))
            return forward(*args, **kwargs)

        model.generate, model.forward = recorded_generate, recorded_forward
        return self

    def __exit__(self, *exc):
        del self.model.generate, self.model.forward  # the instance attributes go; the class methods return
        return False

    def replay(self, tok, *, cached_prefix: bool = False) -> None:
        """Each call again, as a plain call; ``cached_prefix``: each generation through the library's one
        layout-and-generate with the shared-prefix cache (no patches), so the floor gets the cache autopatch uses."""
        from autopatch.generate import run_targets
        from autopatch.strategies import Target

        for kind, ids, mask, new in self.calls:
            if kind == "forward":
                self.model(input_ids=ids, attention_mask=mask)
            elif new > 0 and cached_prefix:
                rows = [Target(i, row[m.bool()] if m is not None else row)
                        for i, (row, m) in enumerate(zip(ids, mask if mask is not None else [None] * len(ids)))]
                run_targets(self.model, tok, rows, max_new_tokens=new, logits_processor=self.no_eos,
                            do_sample=False)
            elif new > 0:
                self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                    logits_processor=self.no_eos,
                                    do_sample=False, pad_token_id=tok.pad_token_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--strategies", default="verbalize,reroute,decompose")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    from autopatch import load_model
    from autopatch.gating import AlwaysPatch, NeverPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import strategy_profile

    model, tok = load_model(args.model)
    never = AutoPatcher(model, tok, gate=NeverPatch())
    never_uncached = AutoPatcher(model, tok, gate=NeverPatch(), reuse_prefix=False)
    always = AutoPatcher(model, tok, gate=AlwaysPatch())
    strategies = [s for s in args.strategies.split(",") if s]
    per_strategy = {s: AutoPatcher(model, tok, strategy_profile(model, s, always.profile)[0], gate=AlwaysPatch())
                    for s in strategies}
    fmt = always.profile.prompt_format
    prompts = [fmt.render(q, tok) for q in QUESTIONS][: args.batch]
    singles = [tok([p], return_tensors="pt").to(model.device) for p in prompts]
    batch = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    gen = dict(max_new_tokens=args.max_new_tokens, logits_processor=eos_disabled(model), do_sample=False,
               pad_token_id=tok.pad_token_id)

    screened = _screened_runs(model, tok, gen)
    runs = {
        **screened,
        "model.generate bs=1": lambda: [model.generate(**e, **gen) for e in singles],
        "autopatch no-patch bs=1": lambda: [never.generate(**e, **gen) for e in singles],
        "autopatch no-patch uncached bs=1": lambda: [never_uncached.generate(**e, **gen) for e in singles],
        "autopatch patch bs=1": lambda: [always.generate(**e, **gen) for e in singles],
        **{f"autopatch {s} bs=1": (lambda p=p: [p.generate(**e, **gen) for e in singles]) for s, p in per_strategy.items()},
        f"model.generate bs={len(prompts)}": lambda: model.generate(**batch, **gen),
        f"autopatch patch bs={len(prompts)}": lambda: always.generate(**batch, **gen),
    }
    for fn in runs.values():  # warm-up: first calls pay for lazy initialisation
        fn()
    floors = {}
    for name, patcher in {always.profile.strategy: always, **per_strategy}.items():
        with ModelCalls(model) as calls:
            [patcher.generate(**e, **gen) for e in singles]
        floors[name] = calls
        runs[f"floor {name} bs=1"] = lambda calls=calls: calls.replay(tok)
        runs[f"cached floor {name} bs=1"] = lambda calls=calls: calls.replay(tok, cached_prefix=True)
    for name in floors:
        runs[f"floor {name} bs=1"]()
        runs[f"cached floor {name} bs=1"]()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for patcher in (always, *per_strategy.values()):
        if not all(r.patched for r in patcher.last_report):
            raise SystemExit(f"{patcher.profile.strategy}: the patch mode must actually patch every prompt")

    base = median["model.generate bs=1"]
    n = len(prompts)
    from autopatch.quantize import model_quantization

    print(f"model: {model.config.model_type} ({model_quantization(model)}), prompts: {n}, new tokens: {args.max_new_tokens}, "
          f"repeats: {args.repeats}, threads: {torch.get_num_threads()}, strategy: {always.profile.strategy}\n")
    print("| run | seconds (median) | per prompt | ratio |")
    print("|---|---|---|---|")
    rows = [
        ("model.generate bs=1", base, "1.00x (reference)"),
        ("autopatch, gate says no, bs=1", median["autopatch no-patch bs=1"], f"{median['autopatch no-patch bs=1'] / base:.2f}x vs model.generate"),
        ("autopatch, gate says no, bs=1, no prefix cache", median["autopatch no-patch uncached bs=1"],
         f"{median['autopatch no-patch uncached bs=1'] / base:.2f}x vs model.generate"),
        (f"autopatch, gate says yes, bs=1 (profile: {always.profile.strategy})", median["autopatch patch bs=1"],
         f"{median['autopatch patch bs=1'] / base:.2f}x vs model.generate"),
        *((f"autopatch, gate says yes, bs=1, {s}", median[f"autopatch {s} bs=1"],
           f"{median[f'autopatch {s} bs=1'] / base:.2f}x vs model.generate") for s in strategies),
        *((f"floor of {s}{kind}: its {len(floors[s].calls)} model calls replayed{how}, bs=1",
           median[f"{key} {s} bs=1"],
           f"autopatch {s} at {median[f'autopatch {s} bs=1' if s in per_strategy else 'autopatch patch bs=1'] / median[f'{key} {s} bs=1']:.2f}x its floor")
          for s in floors
          for key, kind, how in (("floor", "", " plain"), ("cached floor", " (cached)", " with the prefix cache"))),
        (f"model.generate bs={n}", median[f"model.generate bs={n}"], f"{base / median[f'model.generate bs={n}']:.2f}x throughput vs bs=1"),
        (f"autopatch, gate says yes, bs={n}", median[f"autopatch patch bs={n}"],
         f"{median['autopatch patch bs=1'] / median[f'autopatch patch bs={n}']:.2f}x throughput vs autopatch bs=1"),
    ]
    if screened:
        grammar = median["screened grammar bs=1"]
        rows += [("ordinary requests, shipped screened gate, decomposer=grammar, bs=1", grammar, "1.00x (reference)"),
                 *((f"ordinary requests, shipped screened gate, decomposer=model{how}, bs=1", median[key],
                    f"{median[key] / grammar:.2f}x vs decomposer=grammar")
                   for key, how in (("screened model bs=1", ""),
                                    ("screened model first bs=1", ", proposals before the screen (as before)")))]
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / n:.3f} | {ratio} |")
    if screened:
        print(f"\nOrdinary requests: {len(ORDINARY)}; the screen passed {screened_stats['passed']} of them; proposal "
              f"tokens per pass over them: {screened_stats['model']} with decomposer=model, "
              f"{screened_stats['model first']} with the proposals before the screen.")
    return 0


screened_stats: dict[str, int] = {}


def _screened_runs(model, tok, gen: dict) -> dict:
    """The ``screen says no`` runs (see the module docstring); empty when the model ships no screened gate."""
    from autopatch.patcher import AutoPatcher
    from classifiers.screen import ScreenedGate

    grammar = AutoPatcher(model, tok, decomposer="grammar")
    if not isinstance(grammar.gate, ScreenedGate):
        return {}

    class ProposeFirst(ScreenedGate):
        reads_last_token_only = False  # type: ignore[assignment]  # the planner then proposes before the prefill

    first_gate = ProposeFirst(grammar.gate.screen, grammar.gate.inner)
    patchers = {"grammar": grammar, "model": AutoPatcher(model, tok, decomposer="model"),
                "model first": AutoPatcher(model, tok, grammar.profile, first_gate, decomposer="model")}
    fmt = grammar.profile.prompt_format
    singles = [fmt.encode(tok, fmt.render(q, tok)).to(model.device) for q in ORDINARY]
    for name, patcher in patchers.items():
        reports = [patcher.generate_with_reports(**e, **gen, questions=[q]).reports[0] for e, q in zip(singles, ORDINARY)]
        screened_stats[name] = sum(r.proposal_tokens for r in reports)
        if name == "model":
            screened_stats["passed"] = sum(bool(r.screen_passed) for r in reports)
    return {f"screened {name} bs=1": (lambda p=p: [p.generate(**e, **gen, questions=[q]) for e, q in zip(singles, ORDINARY)])
            for name, p in patchers.items()}


if __name__ == "__main__":
    raise SystemExit(main())
