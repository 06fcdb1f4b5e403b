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

from transformers import PreTrainedTokenizerBase

from autopatch.errors import ProfileError
from autopatch.prompts import ChatPrompt, PromptFormat, render_chat
from server.errors import invalid_request

Prompt = ChatPrompt  # the rendered prompt, how it was rendered, and the question the locator reads


def build_prompt(messages: Sequence[dict], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> Prompt:
    """Render ``messages`` (``{"role", "content"}`` dicts with text content) for ``tokenizer``'s model.

    :func:`autopatch.prompts.render_chat`, with its refusals as the OpenAI-shaped 400 of ``param="messages"``.
    """
    try:
        return render_chat(messages, tokenizer, fmt)
    except ProfileError as err:
        raise invalid_request(str(err), param="messages") from err
