"""Turn chat messages into one prompt: the chat template when the tokenizer has one, else a few-shot QA fallback.

Example:
    >>> from server.prompting import build_prompt
    >>> prompt = build_prompt([{"role": "user", "content": "What is the capital of France?"}], tok, fmt)
    >>> prompt.question                       # the last user message: what the locator reads
    'What is the capital of France?'
    >>> prompt.text
    'Q: Which planet is known as the Red Planet?\\nA: Mars\\n\\n...Q: What is the capital of France?\\nA:'

The fallback, for base models such as the embedded Gemma (no ``chat_template``),
is the patcher's :class:`~autopatch.prompts.PromptFormat` few-shot rendering of
the last user message, so a single-turn chat gets exactly the prompt autopatch
was calibrated on. Everything else is kept, as plain text:

* system (and developer) messages, joined by blank lines, open the prompt,
  followed by a blank line;
* earlier turns become extra Q/A pairs after the format's demonstrations: each
  user message is paired with the assistant reply that follows it (an earlier
  user message with no reply gets an empty answer; an assistant message with
  no user message before it gets an empty question).

The conversation must end with a user message: that is the question whose
answer is generated and patched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from autopatch.prompts import PromptFormat
from server.errors import invalid_request


@dataclass(frozen=True)
class Prompt:
    """The rendered prompt, how it was rendered, and the question the locator reads."""

    text: str
    question: str
    template: str  # "chat-template" or "fewshot-qa"
    add_special_tokens: bool  # False when the chat template already wrote BOS
    stop: tuple[str, ...] = ()  # where the template's answer ends (the next few-shot turn); EOS ends chat turns


def _turns(messages: Sequence[dict]) -> tuple[list[str], list[tuple[str, str]], str]:
    """(system texts, earlier (question, answer) pairs, last user message)."""
    if not messages or messages[-1]["role"] != "user":
        raise invalid_request("The last message must have role 'user': it is the question this server answers.",
                              param="messages")
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for m in messages[:-1]:
        if m["role"] == "user":
            if pending is not None:
                pairs.append((pending, ""))
            pending = m["content"]
        elif m["role"] == "assistant":
            pairs.append((pending or "", m["content"]))
            pending = None
    if pending is not None:
        pairs.append((pending, ""))
    return system, pairs, messages[-1]["content"]


def build_prompt(messages: Sequence[dict], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> Prompt:
    """Render ``messages`` (``{"role", "content"}`` dicts with text content) for ``tokenizer``'s model."""
    system, pairs, last = _turns(messages)
    question = last.strip()
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # templates raise their own errors (e.g. "roles must alternate")
            raise invalid_request(f"The model's chat template rejected these messages: {err}", param="messages") from err
        return Prompt(str(text), question, "chat-template", add_special_tokens=False)
    base = fmt if fmt.kind == "fewshot-qa" else PromptFormat()
    rendered = replace(base, demonstrations=(*base.demonstrations, *pairs)).render(question)
    preamble = "\n\n".join(s.strip() for s in system if s.strip())
    return Prompt(f"{preamble}\n\n{rendered}" if preamble else rendered, question, "fewshot-qa", add_special_tokens=True,
                  stop=base.stop_strings)
