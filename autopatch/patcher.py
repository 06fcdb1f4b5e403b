"""``AutoPatcher.generate``: a drop-in ``model.generate`` that corrects two-hop questions.

Example:
    >>> import autopatch
    >>> model, tok = autopatch.load_model()
    >>> patcher = autopatch.AutoPatcher(model, tok)
    >>> prompt = patcher.profile.prompt_format.render("What is the capital of the country where the Colosseum is?")
    >>> enc = tok([prompt], return_tensors="pt", padding=True)
    >>> out = patcher.generate(**enc, max_new_tokens=8, do_sample=False)
    >>> tok.decode(out[0, enc.input_ids.shape[1]:])      # same return type as model.generate
    >>> patcher.last_report[0].patched, patcher.last_report[0].reason

How one call works:

1. Each row's question is read from its prompt (or taken from ``questions=``)
   and located: the first-hop span, its subject, the second-hop template.
2. One ordinary ``model.generate`` call runs for the whole batch. Its prefill is
   the source pass: hooks capture the block outputs needed by the profile and
   the gate, at the located positions. Right after the prefill, before the first
   token is emitted, the gate decides per row.
3. Rows the gate leaves alone simply continue in that call, so with no row
   patched the result *is* ``model.generate``'s result. Rows the gate patches
   are stopped there and answered from a fresh, patched continuation (one short
   extra prefill, batched over those rows) with the same token budget.
4. The answer tokens are appended to the caller's prompt, so decoding code that
   slices ``out[:, prompt_len:]`` keeps working. A report per row is kept in
   ``last_report`` and attached to dict outputs as ``out.autopatch``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial, wraps
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from autopatch.architectures import num_layers
from autopatch.datatypes import Answer as Answer  # re-exported: the types live in autopatch.datatypes
from autopatch.datatypes import GenerateResult as GenerateResult
from autopatch.datatypes import PatchReport as PatchReport
from autopatch.decomposer import decomposition_prefix
from autopatch.errors import PatchError
from autopatch.gating import Gate, gated_generate, screens_before_proposals
from autopatch.generate import continue_patched, token_budget
from autopatch.plan import Planner
from autopatch.prefill import Prefill, capture_prefill
from autopatch.prefix_cache import bypassed, register_prefix
from autopatch.profile import DECOMPOSERS as DECOMPOSERS  # re-exported
from autopatch.profile import Decomposer as Decomposer
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.report import attach_targets, finish, row_reports
from autopatch.resolve import Resolution, resolve
from autopatch.stopping import StopOnText
from autopatch.strategies import Control, Target, targets_for

# on_final's signature: the rows the gate left alone, the unpatched sequences, every row's report
FinalRows = Callable[[list[int], torch.Tensor, list[PatchReport]], None]


def _check_inputs(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
    """Refuse inputs that ``model.generate`` would take silently but answer wrongly (or fail on obscurely)."""
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[1] == 0):
        raise PatchError(f"input_ids must be (batch, tokens) with at least one token per row; got shape "
                         f"{tuple(input_ids.shape)}.")
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > 1:
        mask = attention_mask.bool()
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise PatchError("The batch is right-padded (a row's attention mask ends in zeros), so generation would "
                             "continue from padding; set tokenizer.padding_side = 'left' and tokenize again.")


def register_starts(model, tokenizer, fmt: PromptFormat, *, proposals: bool) -> None:
    """Declare the fixed starts of the prompts autopatch renders in ``fmt`` to the prefix cache
    (:func:`autopatch.prefix_cache.register_prefix`): the format's own and, with ``proposals`` (the model is asked
    for decompositions), the decomposition prompt's instruction and examples. Each is computed the first time a
    row starts with it, so a lone request runs only its own tokens."""
    register_prefix(model, fmt.fixed_prefix(tokenizer))
    if proposals:
        register_prefix(model, decomposition_prefix(fmt, tokenizer))


def _within_reuse_prefix(method):
    """Run a patcher's method with the prefix cache bypassed on this thread (:func:`autopatch.prefix_cache.bypassed`)
    when the patcher was built with ``reuse_prefix=False``: then every call it makes, the strategies' and the
    decomposer's own included, lays out plain batches."""
    @wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.reuse_prefix:
            return method(self, *args, **kwargs)
        with bypassed():
            return method(self, *args, **kwargs)
    return wrapper


_OWN_CACHE_ARGUMENTS = ("past_key_values", "cache", "inputs_embeds", "position_ids", "cache_position")

class AutoPatcher:
    """Wraps a causal LM so that ``generate`` corrects two-hop questions; see the module docstring.

    ``gate=None`` uses the gate shipped for this model when there is one (the
    embedded Gemma has one), else patches every located question; ``profile=None``
    uses the gate's profile, else the profile shipped for this model, else a default.
    ``decomposer``: who reads each question's first hop: ``"grammar"`` (the locator's rules, no model call),
    ``"model"`` (the model's own decomposition first, :mod:`autopatch.decomposer`) or ``"both"`` (the grammar,
    and the model where the grammar reads nothing: one extra short generation for each such row); ``None``: the
    one shipped for this model, else the grammar (``resolution.decomposer_source`` says which). Behind a screen
    that reads only the last token, the model proposes only for the rows the screen passes.
    """

    def __init__(self, model, tokenizer, profile: PatchProfile | str | None = None, gate: Gate | str | None = None,
                 *, control: Control | None = None, reuse_prefix: bool = True, decomposer: Decomposer | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise PatchError("The tokenizer has no pad token; load it with autopatch.load_model or set tokenizer.pad_token.")
        self.resolution: Resolution = resolve(model, tokenizer, profile=profile, gate=gate, decomposer=decomposer)
        self.resolution.profile.validate_for(num_layers(model))
        self.profile: PatchProfile = self.resolution.profile
        self.gate: Gate = self.resolution.gate
        self.control = control
        self.reuse_prefix = reuse_prefix  # cache the prompts' shared prefix (autopatch.prefix_cache); False: plain batches
        self.decomposer: Decomposer = self.resolution.decomposer  # the grammar, the model, or both (grammar first)
        if reuse_prefix:
            register_starts(self.model, tokenizer, self.profile.prompt_format, proposals=self.decomposer != "grammar")
        self.planner = Planner(tokenizer, self.profile.prompt_format, self.decomposer, model)
        self._local = threading.local()  # last_report / last_targets belong to the calling thread

    @property
    def last_report(self) -> list[PatchReport]:
        """The reports of this thread's latest ``generate`` call (prefer :meth:`generate_with_reports`)."""
        return getattr(self._local, "reports", [])

    @property
    def last_targets(self) -> dict[int, Target]:
        """The patched prompts of this thread's latest ``generate`` call, by row."""
        return getattr(self._local, "targets", {})

    # ---- steps 1 and 2: plan, prefill ---------------------------------------------------------

    @contextmanager
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int],
                questions: Sequence[str | None] | None = None,
                decompositions: Sequence[Any] | None = None, *, reuse_prefix: bool = False,
                defer_proposals: bool = False) -> Iterator[Prefill]:
        """Plan the batch and capture ``layers`` at the located positions of the next forward pass run inside:
        ``with patcher.prefill(ids, mask, [6]) as pre: model.generate(...)``; then ``pre.job(...)``
        (:func:`autopatch.prefill.capture_prefill`; ``defer_proposals``: :meth:`autopatch.plan.Planner.batch`)."""
        rows, plans, positions = self.planner.batch(input_ids, attention_mask, questions, decompositions,
                                                    defer_proposals=defer_proposals)
        with capture_prefill(self.model, self.tokenizer.pad_token_id, rows, plans, positions, layers, attention_mask,
                             reuse_prefix=reuse_prefix) as pre:
            yield pre

    def encode(self, questions: Sequence[str]):
        """The questions rendered in the profile's format and tokenized as one left-padded batch, on the model's device."""
        fmt = self.profile.prompt_format
        return fmt.encode(self.tokenizer, [fmt.render(q, self.tokenizer) for q in questions]).to(
            next(self.model.parameters()).device)

    # ---- generate -------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 logits_processor: LogitsProcessorList | None = None,
                 stopping_criteria: StoppingCriteriaList | None = None, prefix_allowed_tokens_fn=None,
                 synced_gpus: bool | None = None, assistant_model=None, streamer=None, *,
                 questions: Sequence[str | None] | None = None, decompositions: Sequence[Any] | None = None,
                 patching: bool = True, **kwargs):
        """Same arguments and return type as ``model.generate``, plus three keyword-only extras.

        ``questions``: the question of each row, when it cannot be read from the prompt
        (the last ``Q:`` line, or the last user turn of a chat-template prompt).
        ``decompositions``: MuSiQue-style decompositions, used by the locator when
        given. ``patching=False``: behave exactly like ``model.generate``. The
        reports are kept for this thread in ``last_report``; dict outputs also
        carry them as ``out.autopatch``.
        """
        result = self.generate_with_reports(inputs, generation_config, logits_processor, stopping_criteria,
                                            prefix_allowed_tokens_fn, synced_gpus, assistant_model, streamer,
                                            questions=questions, decompositions=decompositions, patching=patching,
                                            **kwargs)
        self._local.reports, self._local.targets = result.reports, result.targets
        return result.output

    @torch.no_grad()
    @_within_reuse_prefix
    def generate_with_reports(self, inputs: torch.Tensor | None = None,
                              generation_config: GenerationConfig | None = None,
                              logits_processor: LogitsProcessorList | None = None,
                              stopping_criteria: StoppingCriteriaList | None = None, prefix_allowed_tokens_fn=None,
                              synced_gpus: bool | None = None, assistant_model=None, streamer=None, *,
                              questions: Sequence[str | None] | None = None,
                              decompositions: Sequence[Any] | None = None, patching: bool = True,
                              unpatched: Sequence[Sequence[int]] | None = None,
                              on_final: FinalRows | None = None, **kwargs) -> GenerateResult:
        """:meth:`generate`, returning its output with this call's reports and targets (thread-safe).

        ``unpatched``: each row's new tokens as greedy ``model.generate`` gives them on these very rows and budget,
        when the caller already has them (the harness runs vanilla first). Then only the prefill runs, for the
        gate, and rows left alone get these tokens instead of being generated again; tensor output only.

        ``on_final(rows, sequences, reports)``: called once the rows the gate left alone are answered, before the
        patched rows' own generations run, with those rows' indices, the unpatched generation's sequences (prompt
        width first, as in the output) and every row's report (those rows' ``answer`` filled in); a server hands
        those answers back without waiting for the patched rows. Called only when the call patches (not with
        ``patching=False`` or a mode it leaves to ``model.generate``) and some row was left alone.
        """
        passthrough = dict(generation_config=generation_config, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                           synced_gpus=synced_gpus, assistant_model=assistant_model)
        passthrough = {k: v for k, v in passthrough.items() if v is not None}
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        config = copy.deepcopy(generation_config or self.model.generation_config)
        _check_inputs(input_ids, kwargs.get("attention_mask"))
        if patching and streamer is not None and input_ids is not None and input_ids.shape[0] > 1:
            raise PatchError("A streamer needs a batch of one prompt when patching (a patched row is answered from "
                             "another prompt, so the rows' tokens cannot share one stream; transformers' TextStreamer "
                             "takes one row too): stream each prompt separately, or pass patching=False.")
        unsupported = self._unsupported_mode(input_ids, config, kwargs, assistant_model)
        if not patching or unsupported:
            rows = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            reports = [PatchReport(reason=unsupported or "patching disabled by the caller")
                       for _ in range(0 if rows is None else rows.shape[0])]
            out = self.model.generate(input_ids, logits_processor=logits_processor,
                                      stopping_criteria=stopping_criteria, streamer=streamer, **passthrough, **kwargs)
            return GenerateResult(out, reports, {})

        batch, width = input_ids.shape
        if unpatched is not None and (len(unpatched) != batch or streamer is not None
                                      or kwargs.get("return_dict_in_generate")):
            raise PatchError("unpatched= needs one continuation per row, no streamer and tensor output.")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = self._infer_mask(input_ids)
        layers = sorted({self.profile.source_layer, *self.gate.feature_layers})  # a choosing gate lists its sources
        # Callbacks see the caller's own sequence through caller views on the cached path; a streamer needs a batch
        # of one, whose layout is the caller's row itself. max_length would count the re-laid-out width.
        reuse = (self.reuse_prefix and prefix_allowed_tokens_fn is None
                 and not any(k in kwargs for k in _OWN_CACHE_ARGUMENTS) and kwargs.get("max_new_tokens") is not None
                 and (streamer is None or input_ids.shape[0] == 1))
        # The model proposes decompositions after the screen, for the rows it passes, when the screen allows it.
        defer = self.decomposer != "grammar" and screens_before_proposals(self.gate)
        with self.prefill(input_ids, attention_mask, layers, questions, decompositions, reuse_prefix=reuse,
                          defer_proposals=defer) as pre:
            main, decisions = gated_generate(self.model, pre, self.gate, layers, input_ids, attention_mask,
                                             pad_id=self.tokenizer.pad_token_id, unpatched=unpatched,
                                             propose=partial(pre.propose, self.planner) if defer else None,
                                             logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                             streamer=streamer, **passthrough, **kwargs)
        patched_rows = [i for i, d in enumerate(decisions) if d.patch]
        first = main if isinstance(main, torch.Tensor) else main.sequences
        reports = row_reports(self.tokenizer, pre.plans, decisions, first, width, self.profile, self.control)
        left_alone = [i for i, d in enumerate(decisions) if not d.patch]
        if on_final is not None and left_alone:
            for i in left_alone:
                reports[i].answer = self.tokenizer.decode(first[i, width:], skip_special_tokens=True)
            on_final(left_alone, first, reports)
        targets = (targets_for(self.model, self.tokenizer, pre, decisions, patched_rows, self.profile, control=self.control)
                   if patched_rows else [])
        out = main
        if targets:
            target_kwargs = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "max_length", "position_ids")}
            target_kwargs["max_new_tokens"] = token_budget(config, kwargs, width)
            out = continue_patched(self.model, self.tokenizer, main, targets, width, logits_processor=logits_processor,
                                   stopping_criteria=stopping_criteria, streamer=streamer, reuse_prefix=reuse,
                                   caller_ids=input_ids[[t.row for t in targets]], **passthrough, **target_kwargs)
        attach_targets(reports, targets)
        out = finish(self.tokenizer, out, reports, out if isinstance(out, torch.Tensor) else out.sequences, width)
        return GenerateResult(out, reports, {t.row: t for t in targets})

    # ---- strings in, strings out --------------------------------------------------------------

    def answer(self, questions: str | Sequence[str], *, decompositions: Sequence[Any] | None = None,
               max_new_tokens: int = 16, **generation_kwargs) -> list[Answer]:
        """Answer each question: render it in the profile's format, generate (greedy by default), decode.

        ``patcher.answer("What is the capital of the country where the Colosseum is?")[0].text``.
        The answer ends at the format's stop strings (the next few-shot turn) or
        the chat turn's end, and is stripped. Extra keyword arguments go to
        ``generate``.
        """
        batch = [questions] if isinstance(questions, str) else list(questions)
        if not batch:
            return []
        fmt, tok = self.profile.prompt_format, self.tokenizer
        enc = self.encode(batch)
        generation_kwargs.setdefault("do_sample", False)
        generation_kwargs.setdefault("pad_token_id", tok.pad_token_id)
        if fmt.stop_strings and "stop_strings" not in generation_kwargs:
            stop = StopOnText(tok, fmt.stop_strings, enc.input_ids.shape[1])
            generation_kwargs["stopping_criteria"] = StoppingCriteriaList([*(generation_kwargs.get("stopping_criteria") or []),
                                                                           stop])
        result = self.generate_with_reports(input_ids=enc.input_ids, attention_mask=enc.attention_mask, questions=batch,
                                            decompositions=decompositions, max_new_tokens=max_new_tokens,
                                            **generation_kwargs)
        sequences = result.output if isinstance(result.output, torch.Tensor) else result.output.sequences
        width = enc.input_ids.shape[1]
        return [Answer(q, fmt.clean_answer(tok.decode(sequences[i, width:], skip_special_tokens=True)),
                       result.reports[i]) for i, q in enumerate(batch)]

    def explain(self, question: str, *, bridge: str | None = None, layers: Sequence[int] | None = None):
        """What every layer's state at the located positions decodes to (:func:`autopatch.explain.explain`), in
        this patcher's prompt format and with its profile's placeholder."""
        from autopatch.explain import explain

        return explain(self.model, self.tokenizer, question, fmt=self.profile.prompt_format, bridge=bridge,
                       layers=None if layers is None else list(layers), placeholder=self.profile.placeholder)

    # ---- helpers --------------------------------------------------------------------------

    def _unsupported_mode(self, input_ids, config: GenerationConfig, kwargs: dict, assistant_model) -> str:
        if input_ids is None:
            return "patching needs input_ids (inputs_embeds-only calls run unpatched)"
        beams = kwargs.get("num_beams", config.num_beams) or 1
        returns = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        if beams > 1 or returns > 1 or assistant_model is not None:
            return "patching supports one sequence per prompt without beams or assistants; ran unpatched"
        return ""

    def _infer_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        if pad is not None and pad != eos and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)
