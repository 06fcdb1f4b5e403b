"""The ``autopatch`` model of lm-evaluation-harness: generation by a method of ``autopatch eval``, log-likelihoods
from the plain model.

Example:
    $ python -m autopatch.lm_eval --model autopatch --model_args pretrained=gemma-3-270m,method=autopatch \\
          --tasks autopatch_twohop --limit 8

``model_args`` (anything else is refused, naming what is accepted):

* ``pretrained``: an embedded model name, a local path or an HF id (default: the embedded default);
* ``method``: a direct-answer method of ``autopatch eval`` (``vanilla``, ``decompose``, ``autopatch``,
  ``autopatch-model``, a strategy, a control; default ``autopatch``). One that runs the gate is refused when the
  model has none, never run ungated;
* ``decomposer`` (with ``method=autopatch``), ``quantize``, ``gate``, ``profile``: as for ``autopatch eval``;
* ``render``: ``question`` (default): each context is a question (or a chat request as JSON
  ``{"messages": [...]}``, which the ``autopatch_*`` tasks send) and is rendered and answered exactly as
  ``autopatch eval`` renders and answers it (the same method code, batches cut the same way), so the two agree;
  ``raw``: the context is the prompt as lm-eval built it (with ``--apply_chat_template``, through the model's
  template), the question read from its last ``Q:`` line or user turn; for ``vanilla`` and the ``autopatch``
  methods;
* ``batch_size``, ``max_length`` (log-likelihood windows; default: the model's context, at most 4096); lm-eval's
  ``--device`` is used where CUDA is available, else the model runs on the CPU.

Only generation is corrected. ``loglikelihood`` and ``loglikelihood_rolling`` come from the plain model, so any
lm-eval task runs, and multiple-choice tasks score the model itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models: its registry loads them only while it is empty
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from autopatch.registry import DECOMPOSERS
from autopatch.stopping import cut_at_stop
from eval.records import QARecord

RENDERS = ("question", "raw")
ACCEPTED = ("pretrained", "method", "decomposer", "quantize", "gate", "profile", "render", "batch_size",
            "max_batch_size", "device", "max_length")
# render=raw: the method's gate and decomposer on the prompts as given (None: the shipped gate / decomposer)
RAW_METHODS: dict[str, tuple[str, str | None]] = {"vanilla": ("never", "grammar"), "autopatch": ("shipped", None),
                                                  "autopatch-grammar": ("shipped", "grammar"),
                                                  "autopatch-model": ("shipped", "model"), "patch": ("always", "grammar")}


def generation_methods() -> list[str]:
    """The ``autopatch eval`` methods lm-eval can run: those that answer directly (no CoT, no diagnostic, no oracle)."""
    from eval.methods import METHODS

    return [name for name, m in METHODS.items() if m.run is not None and not m.cot and m.kind in ("baseline", "patch",
                                                                                                   "control")]


@register_model("autopatch")
class AutopatchLM(LM):
    """See the module docstring."""

    def __init__(self, pretrained: str | None = None, method: str = "autopatch", decomposer: str | None = None,
                 quantize: str | None = None, gate: str | None = None, profile: str | None = None,
                 render: str = "question", batch_size: int | str | None = 16, max_batch_size: int | None = None,
                 device: str | None = None, max_length: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise ValueError(f"autopatch: unknown model_args {', '.join(sorted(unknown))}; accepted: {', '.join(ACCEPTED)}")
        methods = generation_methods()
        if method not in methods:
            raise ValueError(f"autopatch: method={method!r} is not a direct-answer method of autopatch eval; choose one "
                             f"of {', '.join(methods)}")
        if render not in RENDERS:
            raise ValueError(f"autopatch: render={render!r}; choose one of {', '.join(RENDERS)}")
        if render == "raw" and method not in RAW_METHODS:
            raise ValueError(f"autopatch: render=raw runs {', '.join(RAW_METHODS)}; {method!r} needs the question "
                             "(render=question)")
        if decomposer is not None and (decomposer not in DECOMPOSERS or method != "autopatch"):
            raise ValueError(f"autopatch: decomposer={decomposer!r} applies to method=autopatch and is one of "
                             f"{', '.join(DECOMPOSERS)} (autopatch-model, decompose-model name theirs)")
        from autopatch import load_model
        from autopatch.resolve import resolve
        from eval.methods import METHODS, build_context

        torch.set_grad_enabled(False)
        # lm-eval passes its default device (cuda:0) unasked: it is used where CUDA is, else the CPU
        on = device if device and str(device).startswith("cuda") and torch.cuda.is_available() else None
        self.model, self.tok = load_model(pretrained, quantize=quantize, device=on)
        self.resolution = resolve(self.model, self.tok, profile=profile, gate=gate,
                                  decomposer=decomposer)  # type: ignore[arg-type]
        gated = self.resolution.gate if self.resolution.gate_source != "default" else None
        if METHODS[method].needs_gate and gated is None:
            raise ValueError(f"autopatch: method={method!r} runs the gate and no gate is shipped for {pretrained!r}; "
                             "pass gate=DIR (autopatch train-gate), or method=decompose")
        base = self.resolution.profile if self.resolution.profile_source in ("argument", "file") else None
        self.ctx = build_context(self.model, self.tok, profile=base, gate=gated, gold_scores=False)
        if decomposer is not None:
            self.ctx = replace(self.ctx, profile=replace(self.ctx.profile, decomposer=decomposer))  # type: ignore[arg-type]
        self.method, self.render, self.name = method, render, str(pretrained or "")
        self.batch_size = batch_size if isinstance(batch_size, int) and batch_size > 0 else 16
        context = getattr(self.model.config, "max_position_embeddings", 2048) or 2048
        self.max_length = int(max_length or min(int(context), 4096))

    # ---- generation -----------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request answered by the method, cut at its ``until`` strings; ``max_gen_toks`` new tokens."""
        out: list[str] = [""] * len(requests)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            context, kwargs = request.args
            until = kwargs.get("until") or ()
            until = (until,) if isinstance(until, str) else tuple(until)
            groups.setdefault((until, int(kwargs.get("max_gen_toks", 16))), []).append(i)
        for (until, budget), rows in groups.items():
            contexts = [requests[i].args[0] for i in rows]
            texts = self._answer(contexts, budget) if self.render == "question" else self._answer_raw(contexts, budget)
            for i, text in zip(rows, texts):
                out[i] = cut_at_stop(text, until)[0]
        return out

    def _answer(self, contexts: Sequence[str], budget: int) -> list[str]:
        """``autopatch eval``'s method on these questions: the same prompts, batches and code."""
        from eval.methods import METHODS
        from eval.runner import batches, order_by_length

        records = [_record(str(i), context) for i, context in enumerate(contexts)]
        ctx = replace(self.ctx, budget=budget, vanilla_tokens={}, vanilla_seconds={})
        texts: dict[str, str] = {}
        run = METHODS[self.method].run
        if run is None:  # generation_methods() lists only methods that run
            raise ValueError(f"autopatch: method {self.method!r} is computed from others and cannot run alone")
        for batch in batches(order_by_length(ctx, records), self.batch_size):
            for record, result in zip(batch, run(ctx, batch)):
                texts[record.id] = result.continuation
        return [texts[str(i)] for i in range(len(contexts))]

    def _answer_raw(self, prompts: Sequence[str], budget: int) -> list[str]:
        from autopatch.gating import AlwaysPatch, NeverPatch
        from autopatch.patcher import AutoPatcher

        which, decomposer = RAW_METHODS[self.method]
        gate = {"never": NeverPatch(), "always": AlwaysPatch(), "shipped": self.ctx.gate}[which]
        patcher = AutoPatcher(self.model, self.tok, self.ctx.profile, gate, decomposer=decomposer)  # type: ignore[arg-type]
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            enc = self.tok(list(prompts[start : start + self.batch_size]), return_tensors="pt", padding=True)
            result = patcher.generate_with_reports(**enc, max_new_tokens=budget, do_sample=False,
                                                   pad_token_id=self.tok.pad_token_id)
            width = enc.input_ids.shape[1]
            texts += [str(self.tok.decode(row[width:], skip_special_tokens=True)) for row in result.output]
        return texts

    # ---- log-likelihoods, from the plain model ---------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            context_ids = self.tok(context).input_ids if context else [self._prefix_token()]
            pairs.append((context_ids, self.tok(continuation, add_special_tokens=False).input_ids))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (text,) = request.args
            tokens = self.tok(text, add_special_tokens=False).input_ids
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self._prefix_token(), max_seq_len=self.max_length, context_len=1)]
            totals.append(sum(logprob for logprob, _ in self._score([(list(c), list(t)) for c, t in windows])))
        return totals

    def _prefix_token(self) -> int:
        return int(self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id)

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Per (context, continuation) token lists: the continuation's log-probability and whether greedy decoding
        gives it, in batches of right-padded rows (longest first), cut on the left to ``max_length``."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in rows]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(rows), width), int(self.tok.pad_token_id), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, seq in enumerate(seqs):
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, : len(seq)] = 1
            logprobs = torch.log_softmax(self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            for j, i in enumerate(rows):
                n, length = len(pairs[i][1]), len(seqs[j])
                target = torch.tensor(pairs[i][1])
                scores = logprobs[j, length - n : length].cpu()
                results[i] = (float(scores.gather(1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
        return [r for r in results if r is not None]

    # ---- lm-eval's chat-template hooks (render=raw with --apply_chat_template) -------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tok, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return str(self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt))


def _record(identifier: str, context: str) -> QARecord:
    """A context of an ``autopatch_*`` task (a question, or ``{"messages": [...]}``) as the harness's record."""
    text = context.strip()
    if text.startswith('{"messages"'):
        messages = tuple(dict(m) for m in json.loads(text)["messages"])
        return QARecord(identifier, str(messages[-1]["content"]), (), "", messages=messages)
    return QARecord(identifier, text, (), "")
