"""Named evaluation methods: baselines, patching strategies, controls, oracles and hop diagnostics.

Example:
    >>> from eval.methods import METHODS, build_context
    >>> ctx = build_context(model, tok)
    >>> results = METHODS["vanilla"].run(ctx, records[:8])
    >>> results[0].continuation, results[0].n_tokens

Every generating method is greedy. Token budgets: ``ctx.budget`` new tokens
for every direct-answer method (vanilla, the patching methods, controls, hop
diagnostics); ``ctx.cot_budget`` for chain of thought, which needs room to
reason, and is reported next to its accuracy. Oracles are computed from other
methods' results (``oracle-gate``) or from a sweep over the configuration grid
(``oracle-layers``); they are upper bounds, never deployable methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from autopatch.errors import ConfigError
from autopatch.registry import CONTROLS, STRATEGIES, standalone_strategies
from eval.datasets import QARecord

if TYPE_CHECKING:  # the registry itself is imported by the CLI's parser, which must not load torch
    import torch

    from autopatch.gating import Gate
    from autopatch.patcher import Decomposer
    from autopatch.profile import PatchProfile
    from autopatch.prompts import PromptFormat
    from autopatch.strategies import Control

MethodKind = Literal["baseline", "patch", "control", "oracle", "diagnostic"]


@dataclass
class MethodResult:
    """One (method, question) outcome, with what is needed to audit it."""

    prompt: str
    continuation: str
    n_tokens: int
    seconds: float
    patched: bool = False
    report: dict | None = None
    gold_logprob: float | None = None
    gold_rank: int | None = None


@dataclass
class EvalContext:
    """Everything a method needs; built once per run."""

    model: Any  # torch.nn.Module
    tok: Any
    profile: PatchProfile
    strategy_profiles: dict[str, PatchProfile]
    gate: Gate | None
    budget: int = 16
    cot_budget: int = 48
    use_decomposition: bool = False
    gold_scores: bool = True
    reuse_prefix: bool = True  # the prompts' shared prefix from autopatch.prefix_cache's cache (same tokens, less compute)
    # record id -> vanilla's new tokens in this run: the patching methods answer the rows they leave alone with them
    # instead of generating them again (the same tokens: the same rows, prompts and budget in the same batch)
    vanilla_tokens: dict[str, list[int]] = field(default_factory=dict)
    vanilla_seconds: dict[str, float] = field(default_factory=dict)  # charged to those rows, as a deployment pays it

    @property
    def fmt(self) -> PromptFormat:
        return self.profile.prompt_format


@dataclass(frozen=True)
class Method:
    """A registered method: ``run(ctx, records) -> results`` (``None`` for derived methods).

    ``needs_gate``: it runs the learned gate (``autopatch``, ``autopatch-model``); with none for the model the
    harness refuses it when asked for by name and leaves it out otherwise, never runs it ungated.
    """

    name: str
    kind: MethodKind
    description: str
    run: Callable[[EvalContext, Sequence[QARecord]], list[MethodResult]] | None = None
    cot: bool = False
    needs: tuple[str, ...] = field(default=())  # methods a derived method is computed from
    needs_gate: bool = False


def build_context(model, tok, *, profile: PatchProfile | None = None, gate: Gate | None = None, budget: int = 16,
                  cot_budget: int = 48, use_decomposition: bool = False, gold_scores: bool = True) -> EvalContext:
    """The run context: the model's shipped profile and the best shipped profile of each strategy."""
    from autopatch.patcher import register_starts
    from autopatch.profile import strategy_profile
    from autopatch.resolve import model_profile

    base = profile or model_profile(model, tok)
    per_strategy = {s: strategy_profile(model, s, base, use_shipped=profile is None)[0] for s in STRATEGIES}
    # before any generation, as AutoPatcher does: which start a row reuses must not depend on what ran before it
    # (a batch-invariant model reuses only a registered start; autopatch.prefix_cache)
    for fmt in {p.prompt_format for p in (base, *per_strategy.values())}:
        register_starts(model, tok, fmt, proposals=True)  # a method may ask the model for decompositions
    return EvalContext(model, tok, base, per_strategy, gate, budget, cot_budget, use_decomposition, gold_scores)


# ---- generation helpers ------------------------------------------------------------------


def record_prompt(ctx: EvalContext, record: QARecord) -> str:
    """The prompt the model answers for ``record``: its chat request as a chat endpoint renders it
    (:func:`autopatch.prompts.render_chat`) when it carries ``messages``, else its question in the run's format."""
    if record.messages is not None:
        from autopatch.prompts import render_chat

        return render_chat(record.messages, ctx.tok, ctx.fmt).text
    return ctx.fmt.render(record.question, ctx.tok)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generate_prompts(ctx: EvalContext, prompts: Sequence[str], budget: int,
                      keep: list[list[int]] | None = None) -> tuple[list[str], list[int], float]:
    from autopatch.strategies import Target, run_targets

    tok = ctx.tok
    started = time.perf_counter()
    targets = [Target(i, ctx.fmt.encode(tok, p).input_ids[0]) for i, p in enumerate(prompts)]
    # the one layout-and-generate (autopatch.generate.run_targets): the format's shared start from the prefix cache
    out, width = run_targets(ctx.model, tok, targets, reuse_prefix=ctx.reuse_prefix, max_new_tokens=budget,
                             do_sample=False)
    seconds = (time.perf_counter() - started) / len(prompts)
    texts, counts = _decode_new(tok, out, width, keep)
    return texts, counts, seconds


def _decode_new(tok, sequences: torch.Tensor, width: int, keep: list[list[int]] | None = None,
                ) -> tuple[list[str], list[int]]:
    """Each row's new text and token count; ``keep`` receives the new token ids too."""
    from autopatch.strategies import generated_ids

    texts, counts = [], []
    for row in sequences[:, width:]:
        ids = generated_ids(row, tok.pad_token_id)
        texts.append(tok.decode(ids, skip_special_tokens=True))
        counts.append(len(ids))
        if keep is not None:
            keep.append(ids)
    return texts, counts


def gold_scores(ctx: EvalContext, prompts: Sequence[torch.Tensor], edits: Sequence[list[tuple[int, int, torch.Tensor]]],
                golds: Sequence[str], k: int = 3) -> list[tuple[float, int]]:
    """Teacher-forced log-probability of the gold's first ``k`` tokens, and the rank of its first token.

    ``prompts`` are the methods' final prompt ids; ``edits`` patch their prefill
    exactly as the method did (empty for unpatched prompts).
    """
    import torch

    from autopatch.engine import PatchEdit, patch
    from autopatch.prefix_cache import left_pad, position_ids

    tok = ctx.tok
    gold_ids = [tok(" " + g.strip(), add_special_tokens=False, return_tensors="pt").input_ids[0][:k] for g in golds]
    rows = [torch.cat([p.cpu(), g]) for p, g in zip(prompts, gold_ids)]
    ids, mask = left_pad(rows, tok.pad_token_id)
    flat = [PatchEdit(layer, i, pos, vec) for i, e in enumerate(edits) for layer, pos, vec in e]
    device = _device(ctx.model)
    keep = max(len(g) for g in gold_ids) + 1  # gold tokens sit at the end of each left-padded row
    with torch.no_grad(), patch(ctx.model, flat, attention_mask=mask):
        logits = ctx.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=position_ids(mask).to(device), logits_to_keep=keep).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = []
    for i, g in enumerate(gold_ids):
        start = keep - len(g)  # index of the first gold token among the kept positions
        token_lp = logprobs[i, start - 1 : keep - 1].gather(-1, g.to(device)[:, None]).squeeze(-1)
        first = logits[i, start - 1]
        rank = int((first > first[g[0]]).sum()) + 1
        scores.append((float(token_lp.sum()), rank))
    return scores


def _with_gold_scores(ctx: EvalContext, results: list[MethodResult], prompts, edits, records) -> list[MethodResult]:
    scored = [i for i, r in enumerate(records) if r.answer.strip()]  # a request with no gold has nothing to score
    if not ctx.gold_scores or not scored:
        return results
    pairs = gold_scores(ctx, [prompts[i] for i in scored], [edits[i] for i in scored], [records[i].answer for i in scored])
    for i, (lp, rank) in zip(scored, pairs):
        results[i].gold_logprob, results[i].gold_rank = lp, rank
    return results


# ---- methods -----------------------------------------------------------------------------


def _prompted(build: Callable[[EvalContext, QARecord], str], *, cot: bool = False, scored: bool = True,
              shared: bool = False):
    def run(ctx: EvalContext, records: Sequence[QARecord]) -> list[MethodResult]:
        prompts = [build(ctx, r) for r in records]
        tokens: list[list[int]] = []
        texts, counts, seconds = _generate_prompts(ctx, prompts, ctx.cot_budget if cot else ctx.budget,
                                                   tokens if shared else None)
        if shared:
            ctx.vanilla_tokens.update({r.id: t for r, t in zip(records, tokens)})
            ctx.vanilla_seconds.update({r.id: seconds for r in records})
        results = [MethodResult(p, t, n, seconds) for p, t, n in zip(prompts, texts, counts)]
        if not scored:
            return results
        ids = [ctx.fmt.encode(ctx.tok, p).input_ids[0] for p in prompts]
        return _with_gold_scores(ctx, results, ids, [[] for _ in records], records)

    return run


def _patcher_method(profile_of: Callable[[EvalContext], PatchProfile], *, gated: bool = False,
                    control: Control | None = None, decomposer: Decomposer | None = "grammar"):
    def run(ctx: EvalContext, records: Sequence[QARecord]) -> list[MethodResult]:
        from autopatch.gating import AlwaysPatch
        from autopatch.patcher import AutoPatcher

        gate = ctx.gate if gated else AlwaysPatch()
        patcher = AutoPatcher(ctx.model, ctx.tok, profile_of(ctx), gate=gate, control=control,
                              reuse_prefix=ctx.reuse_prefix, decomposer=decomposer)
        prompts = [record_prompt(ctx, r) for r in records]
        enc = ctx.fmt.encode(ctx.tok, prompts).to(_device(ctx.model))
        started = time.perf_counter()
        given = [ctx.vanilla_tokens.get(r.id) for r in records]
        shared = None if any(t is None for t in given) else cast("list[list[int]]", given)
        result = patcher.generate_with_reports(
            **enc, max_new_tokens=ctx.budget, do_sample=False, pad_token_id=ctx.tok.pad_token_id,
            questions=[r.question for r in records],
            decompositions=[r.question_decomposition for r in records] if ctx.use_decomposition else None,
            unpatched=shared)
        seconds = (time.perf_counter() - started) / len(records)
        if shared is not None:  # the rows left alone were vanilla's work: charge its time to them
            seconds += sum(ctx.vanilla_seconds[r.id] for r, rep in zip(records, result.reports) if not rep.patched
                           ) / len(records)
        texts, counts = _decode_new(ctx.tok, result.output, enc.input_ids.shape[1])
        results = []
        final_prompts, final_edits = [], []
        for i, (prompt, text, n) in enumerate(zip(prompts, texts, counts)):
            report = result.reports[i]
            target = result.targets.get(i)
            n += (target.bridge_tokens if target else 0) + report.proposal_tokens  # cost: bridge and proposal tokens
            results.append(MethodResult(target.prompt_text if target else prompt, text, n, seconds,
                                        patched=report.patched, report=report.to_dict()))
            if target is not None:
                final_prompts.append(target.input_ids)
                final_edits.append(target.edits)
            else:
                final_prompts.append(ctx.fmt.encode(ctx.tok, prompt).input_ids[0])
                final_edits.append([])
        return _with_gold_scores(ctx, results, final_prompts, final_edits, records)

    return run


def hop_questions(record: QARecord) -> tuple[str, list[str], str, list[str]]:
    """Hop 1 asked alone, and hop 2 with the gold bridge filled in, with their golds."""
    step1, step2 = record.question_decomposition[0], record.question_decomposition[1]
    hop1 = step1.as_question()
    hop1_golds = [step1.answer, *record.meta.get("bridge_aliases", [])]
    hop2 = step2.filled(step1.answer).question
    hop2_golds = list(record.golds) if record.hops == 2 else [step2.answer]  # hop 2 of a 2-hop question is its answer
    return hop1, hop1_golds, hop2, hop2_golds


class MethodTable(MutableMapping[str, Method]):
    """The evaluation methods, resolved when asked: those registered here, and one per strategy and per control
    of :mod:`autopatch.registry` as it stands at that moment, so a strategy registered after import is an
    ``autopatch eval`` method too. In a fixed order: the declared ones, each derived group where it was declared.
    Setting a name overrides it (tests do); deleting the override restores it.
    """

    def __init__(self) -> None:
        self._entries: list[Method | Callable[[], Iterable[Method]]] = []
        self._overrides: dict[str, Method] = {}

    def add(self, method: Method) -> Method:
        if method.name in self:
            raise ConfigError(f"Method {method.name!r} is already registered.")
        self._entries.append(method)
        return method

    def add_derived(self, derive: Callable[[], Iterable[Method]]) -> None:
        """Methods computed from another registry each time the table is read."""
        self._entries.append(derive)

    def _current(self) -> dict[str, Method]:
        table: dict[str, Method] = {}
        for entry in self._entries:
            for method in (entry,) if isinstance(entry, Method) else entry():
                table.setdefault(method.name, method)
        table.update(self._overrides)
        return table

    def __getitem__(self, name: str) -> Method:
        return self._current()[name]

    def __setitem__(self, name: str, method: Method) -> None:
        self._overrides[name] = method

    def __delitem__(self, name: str) -> None:
        del self._overrides[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


METHODS = MethodTable()
register = METHODS.add


def _cot(ctx: EvalContext, record: QARecord) -> str:
    from eval.cot import cot_prompt

    return cot_prompt(ctx.fmt, record.question, ctx.tok)


def _cot_fewshot(ctx: EvalContext, record: QARecord) -> str:
    from eval.cot import cot_fewshot_prompt

    return cot_fewshot_prompt(ctx.fmt, record.question, ctx.tok)


register(Method("vanilla", "baseline", "the question in the query format (a chat request as sent), no patching",
                _prompted(record_prompt, shared=True)))
register(Method("cot", "baseline", "zero-shot chain of thought (\"Let's think step by step.\"), cot budget",
                _prompted(_cot, cot=True, scored=False), cot=True))
register(Method("cot-fewshot", "baseline", "few-shot chain of thought whose demonstrations state the bridge first, cot budget",
                _prompted(_cot_fewshot, cot=True, scored=False), cot=True))
def _cot_two_stage(ctx: EvalContext, records: Sequence[QARecord]) -> list[MethodResult]:
    """Kojima et al. (2022): reason after "Let's think step by step.", then "Therefore, the answer is" (budget).

    The stored continuation is the reasoning, the trigger and the stage-2 answer, so the CoT extraction rule
    reads the answer after the trigger; tokens and seconds are both stages together.
    """
    from eval.cot import KOJIMA_ANSWER_TRIGGER, kojima_answer_prompt, kojima_prompts

    stage1 = [kojima_prompts(ctx.fmt, r.question, ctx.tok) for r in records]
    reasoning, n1, s1 = _generate_prompts(ctx, stage1, ctx.cot_budget)
    reasoning = [ctx.fmt.clean_answer(t) for t in reasoning]  # a base model's reasoning ends at the next "Q:"
    stage2 = [kojima_answer_prompt(p, t) for p, t in zip(stage1, reasoning)]
    answers, n2, s2 = _generate_prompts(ctx, stage2, ctx.budget)
    return [MethodResult(p, f"{t}\n{KOJIMA_ANSWER_TRIGGER}{a}", a1 + a2, s1 + s2)
            for p, t, a, a1, a2 in zip(stage2, reasoning, answers, n1, n2)]


register(Method("cot-2stage", "baseline", "zero-shot CoT with Kojima et al.'s second, answer-extraction prompt "
                "(\"Therefore, the answer is\"); cot budget, then the direct budget", _cot_two_stage, cot=True))
register(Method("patch", "patch", "always patch with the model's profile",
                _patcher_method(lambda ctx: ctx.profile)))
register(Method("autopatch", "patch", "patch when the gate says so, with the decomposer shipped for the model (the "
                "deployable method: what AutoPatcher(model, tok) does)",
                _patcher_method(lambda ctx: ctx.profile, gated=True, decomposer=None), needs_gate=True))
register(Method("autopatch-grammar", "patch", "autopatch (the shipped screen and gate) with the grammar's location "
                "only (decomposer='grammar')", _patcher_method(lambda ctx: ctx.profile, gated=True), needs_gate=True))


def _strategy_methods() -> Iterator[Method]:
    for name, spec in STRATEGIES.items():
        yield Method(name, "patch" if spec.uses_state else "baseline",
                     f"always patch with the best swept {name} configuration" if spec.uses_state else spec.description,
                     _patcher_method(lambda ctx, s=name: ctx.strategy_profiles[s]))  # type: ignore[misc]


def _control_methods() -> Iterator[Method]:
    for control in CONTROLS.values():
        yield Method(f"control-{control.name}", "control", control.description,
                     _patcher_method(lambda ctx: ctx.profile, control=control.name))


METHODS.add_derived(_strategy_methods)
register(Method("autopatch-model", "patch", "autopatch (the shipped screen and gate) with the model's own decomposition "
                "(decomposer='model'; asked only for rows the screen passes); proposal tokens counted",
                _patcher_method(lambda ctx: ctx.profile, gated=True, decomposer="model"), needs_gate=True))
register(Method("decompose-model", "baseline", "decompose with the model's own decomposition (self-ask style, "
                "autopatch.decomposer), the grammar where the model proposes none; proposal tokens counted",
                _patcher_method(lambda ctx: ctx.strategy_profiles["decompose"], decomposer="model")))
register(Method("second-opinion-model", "patch", "second-opinion with the model's own decomposition as the words' "
                "first hop (decomposer='model', the grammar where it proposes none); proposal tokens counted",
                _patcher_method(lambda ctx: ctx.strategy_profiles["second-opinion"], decomposer="model")))
register(Method("decompose-both", "baseline", "decompose with the grammar's location, the model's own decomposition "
                "where the grammar reads none; proposal tokens counted",
                _patcher_method(lambda ctx: ctx.strategy_profiles["decompose"], decomposer="both")))
METHODS.add_derived(_control_methods)
register(Method("hop1", "diagnostic", "hop 1 asked alone (e.g. 'In which country is the Colosseum located?')",
                _prompted(lambda ctx, r: ctx.fmt.render(hop_questions(r)[0], ctx.tok), scored=False)))
register(Method("hop2", "diagnostic", "hop 2 with the gold bridge given (e.g. 'What is the capital of Italy?')",
                _prompted(lambda ctx, r: ctx.fmt.render(hop_questions(r)[2], ctx.tok), scored=False)))
register(Method("oracle-gate", "oracle", "ORACLE: patch exactly when patching helps (vanilla or patch correct)",
                needs=("vanilla", "patch")))
register(Method("oracle-layers", "oracle", "ORACLE: correct if any configuration of the sweep grid answers correctly",
                needs=("vanilla",)))


def default_methods() -> tuple[str, ...]:
    """What ``autopatch eval`` runs when ``--methods`` is not given: the baselines, every strategy that runs on one
    model alone and every control registered now, and the oracle gate."""
    return ("vanilla", "cot", "cot-fewshot", "cot-2stage", "patch", "autopatch", *standalone_strategies(),
            *(f"control-{c}" for c in CONTROLS), "oracle-gate")
