"""Chain-of-thought baselines' prompts: zero-shot, few-shot, and Kojima et al.'s two stages.

Example:
    >>> from eval.cot import cot_prompt
    >>> cot_prompt(PromptFormat(), "What is the capital of the country where the Colosseum is?")
    "Q: ...\\nA: Let's think step by step."

Only the harness's baselines use these, so they live in eval, not in the core. Every
prompt is rendered in the run's :class:`~autopatch.prompts.PromptFormat`: base models get
the few-shot QA template, chat models their chat template.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from autopatch.prompts import PromptFormat, Rendering

COT_TRIGGER = "Let's think step by step."
# Chain of thought for chat models: reason, then a final line in a fixed form (eval.metrics reads it).
CHAT_COT_INSTRUCTION = ("Think step by step. Then end with a last line of the form 'Answer: <answer>', where <answer> "
                        "is only the answer itself: a name, a number or a short phrase.")
# Kojima et al. (2022), zero-shot CoT: the reasoning trigger, then a second prompt that extracts the answer.
KOJIMA_ANSWER_TRIGGER = "Therefore, the answer is"

# Two-hop demonstrations (question, reasoning, answer) that state the bridge first; their facts avoid the bundled
# two-hop knowledge base.
COT_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("Which sea does the river that flows through Cairo empty into?",
     "The river that flows through Cairo is the Nile. The Nile empties into the Mediterranean Sea.",
     "the Mediterranean Sea"),
    ("How many legs does the animal that spins webs have?",
     "The animal that spins webs is the spider. A spider has eight legs.", "eight"),
)
# Base models: the demonstrations end "So the answer is X."; chat models: a last line "Answer: X".
COT_DEMONSTRATIONS: tuple[tuple[str, str], ...] = tuple((q, f"{r} So the answer is {a}.") for q, r, a in COT_EXAMPLES)
CHAT_COT_DEMONSTRATIONS: tuple[tuple[str, str], ...] = tuple((q, f"{r}\nAnswer: {a}") for q, r, a in COT_EXAMPLES)




def cot_prompt(fmt: PromptFormat, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Zero-shot chain of thought.

    Base models: the answer starts with "Let's think step by step.". Chat models: no demonstrations,
    and a system turn that asks for reasoning and then a last line "Answer: <answer>".
    """
    return fmt.render_as(question, tokenizer, chat=Rendering(demonstrations=(), instruction=CHAT_COT_INSTRUCTION),
                         base=Rendering(answer_prefix=COT_TRIGGER))


def cot_fewshot_prompt(fmt: PromptFormat, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Few-shot chain of thought: demonstrations that name the bridge before the answer (chat: as real turns)."""
    return fmt.render_as(question, tokenizer,
                         chat=Rendering(demonstrations=CHAT_COT_DEMONSTRATIONS, instruction=CHAT_COT_INSTRUCTION),
                         base=Rendering(demonstrations=COT_DEMONSTRATIONS))


def kojima_prompts(fmt: PromptFormat, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Stage 1 of Kojima et al.'s two-stage zero-shot CoT: the question, then "Let's think step by step.".

    Base models get exactly :func:`cot_prompt`'s prompt; chat models the bare question as their only user turn
    (the template's default system turn) and the trigger opening the assistant's turn. Stage 2 is
    :func:`kojima_answer_prompt`.
    """
    return fmt.render_as(question, tokenizer,
                         chat=Rendering(demonstrations=(), instruction=None, answer_prefix=COT_TRIGGER),
                         base=Rendering(answer_prefix=COT_TRIGGER))


def kojima_answer_prompt(stage1_prompt: str, reasoning: str) -> str:
    """Stage 2: the stage-1 prompt, the model's reasoning, then "Therefore, the answer is"."""
    return f"{stage1_prompt} {reasoning.strip()}\n{KOJIMA_ANSWER_TRIGGER}"
