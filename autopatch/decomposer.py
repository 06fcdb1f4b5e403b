"""The model proposes the decomposition: self-ask style, for questions the grammar cannot read.

Example:
    >>> from autopatch.decomposer import propose_decompositions
    >>> steps = propose_decompositions(model, tok, fmt, ["What is the capital of the largest country in Africa?"])
    >>> steps[0]                      # or None: the model saw no second question in it
    [{'question': 'What is the largest country in Africa?'}, {'question': 'What is the capital of #1?'}]
    >>> patcher.generate(**enc, decompositions=steps)   # the locator aligns them with the question

The locator's grammar misses superlatives without a relative clause, nested
phrases and dates or numbers as bridges. Here the model itself writes the two
single-hop questions (Press et al.'s self-ask, as one batched greedy
generation in the model's own prompt format: few-shot for base models, turns
of its chat template for chat models), with ``#1`` for the first one's answer.
Its demonstrations also show a question and a request that need no splitting
("none"). The result is MuSiQue's decomposition shape, so
:func:`autopatch.locate.locate` aligns it with the question exactly as it
aligns a gold decomposition, and every strategy works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from autopatch.prompts import PromptFormat, Rendering
from autopatch.stopping import PARAGRAPH_STOPS, stop_token_ids

DECOMPOSE_INSTRUCTION = ("Split the question into two simpler questions when answering it needs one fact to find "
                         "another: Step 1 asks for that first fact, Step 2 asks the rest with #1 standing for Step 1's "
                         "answer. Write 'Step 1: none' when no split is needed.")

# Their facts avoid the bundled two-hop knowledge base, the hand-written two-hop set and the CoT demonstrations.
DECOMPOSE_EXAMPLES: tuple[tuple[str, str | None, str | None], ...] = (
    ("Who painted the ceiling of the chapel where popes are elected?",
     "In which chapel are popes elected?", "Who painted the ceiling of #1?"),
    ("Who won the Nobel Prize in Literature in the year the Titanic sank?",
     "In which year did the Titanic sink?", "Who won the Nobel Prize in Literature in #1?"),
    ("Who wrote the novel Moby-Dick?", None, None),
    ("Which university did the inventor of the World Wide Web study at?",
     "Who invented the World Wide Web?", "Which university did #1 study at?"),
    ("Write a short poem about the sea.", None, None),
)


def _answer_text(step1: str | None, step2: str | None) -> str:
    return "Step 1: none" if step1 is None else f"Step 1: {step1}\nStep 2: {step2}"


def decomposition_prompt(fmt: PromptFormat, tok: PreTrainedTokenizerBase, question: str) -> str:
    """The prompt that asks the model for ``question``'s two steps (ends where "Step 1:" is written next)."""
    turns = tuple((q, _answer_text(s1, s2)) for q, s1, s2 in DECOMPOSE_EXAMPLES)

    def base(q: str) -> str:  # one text: the instruction, then "Question:" blocks
        shots = "".join(f"Question: {example}\n{answer}\n\n" for example, answer in turns)
        return f"{DECOMPOSE_INSTRUCTION}\n\n{shots}Question: {q}\nStep 1:"

    return fmt.render_as(question, tok, base=base, chat=Rendering(demonstrations=turns,
                                                                   instruction=DECOMPOSE_INSTRUCTION,
                                                                   answer_prefix="Step 1:"))


def decomposition_prefix(fmt: PromptFormat, tok: PreTrainedTokenizerBase) -> list[int]:
    """The tokens every decomposition prompt starts with (the instruction and the examples, a few hundred on a
    chat template), for :func:`autopatch.prefix_cache.register_prefix`: a single question's proposal then runs
    only its own tokens."""
    return fmt.fixed_start(tok, lambda q: decomposition_prompt(fmt, tok, q))


def parse_decomposition(text: str) -> list[dict[str, str]] | None:
    """``"In which year...?\\nStep 2: Who ... in #1?"`` -> two steps; ``None`` for "none" or anything malformed."""
    lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
    if len(lines) < 2 or lines[0].lower().rstrip(".") == "none" or not lines[1].startswith("Step 2:"):
        return None
    step1, step2 = lines[0], lines[1].removeprefix("Step 2:").strip()
    if not step1 or "#1" not in step2 or "#1" in step1 or step2.replace("#1", "").strip(" ?") == "":
        return None
    return [{"question": step1}, {"question": step2}]


def propose_decompositions(model: Any, tok: PreTrainedTokenizerBase, fmt: PromptFormat, questions: Sequence[str], *,
                           max_new_tokens: int = 48) -> list[list[dict[str, str]] | None]:
    """Per question, the model's two steps (MuSiQue's shape, ``#1`` in step 2), or ``None``; one batched generate."""
    return [steps for steps, _ in propose_decompositions_counted(model, tok, fmt, questions,
                                                                 max_new_tokens=max_new_tokens)]


@torch.no_grad()
def propose_decompositions_counted(model: Any, tok: PreTrainedTokenizerBase, fmt: PromptFormat,
                                   questions: Sequence[str], *, max_new_tokens: int = 48,
                                   ) -> list[tuple[list[dict[str, str]] | None, int]]:
    """:func:`propose_decompositions`, with the number of tokens each proposal generated (its cost)."""
    from autopatch.strategies import Target, generated_ids, run_targets

    if not questions:
        return []
    prompts = [decomposition_prompt(fmt, tok, q) for q in questions]
    targets = [Target(i, fmt.encode(tok, p).input_ids[0], [], p)
               for i, p in enumerate(prompts)]
    out, width = run_targets(model, tok, targets, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_token_ids(tok, PARAGRAPH_STOPS))
    ids = [generated_ids(out[i, width:], tok.pad_token_id) for i in range(len(questions))]
    return [(parse_decomposition(cast(str, tok.decode(row, skip_special_tokens=True))), len(row)) for row in ids]
