"""Read a hidden state back as words: the token-identity Patchscope.

Example:
    >>> from autopatch.engine import capture
    >>> from autopatch.patchscope import decode_state, describe_state
    >>> enc = tok("The Colosseum is located in the country of", return_tensors="pt")
    >>> with capture(model, layers=[8], positions=[-1]) as cap:
    ...     model(**enc)
    >>> decode_state(model, tok, cap.states[8][0, 0], layer=8)[:3]
    [(' Italy', 0.41), (' Rome', 0.12), ...]
    >>> describe_state(model, tok, cap.states[8][0, 0], layer=8, max_new_tokens=4)
    ' Italy;'

The vector is patched over the placeholder ``?`` of a few-shot identity prompt
(``cat -> cat; 1135 -> 1135; hello -> hello; ? ->``) at ``target_layer`` (by
default the layer it came from), and the model's continuation is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from autopatch.engine import PatchEdit, patch
from autopatch.errors import PatchError
from autopatch.tokens import last_token_of_char_span, token_char_ends

IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ? ->"
IDENTITY_PLACEHOLDER = "?"


@dataclass(frozen=True)
class PatchedPrompt:
    """A prompt with the token position where a vector goes."""

    input_ids: torch.Tensor  # (1, seq)
    position: int


def patched_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str = IDENTITY_PROMPT, placeholder: str = IDENTITY_PLACEHOLDER
) -> PatchedPrompt:
    """Tokenize ``prompt`` and find the last token of the last ``placeholder`` in it."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    decoded = cast(str, tokenizer.decode(ids[0], skip_special_tokens=True))
    start = decoded.rfind(placeholder) if placeholder else -1  # search the decoded text: decode() may alter spacing
    if start < 0:
        raise PatchError(f"The placeholder {placeholder!r} does not occur in the prompt {prompt!r} as the tokenizer "
                         f"decodes it ({decoded!r}); put it where the vector goes, e.g. {IDENTITY_PROMPT!r}.")
    ends = token_char_ends(tokenizer, ids[0])
    return PatchedPrompt(ids, last_token_of_char_span(ends, start, start + len(placeholder)))


def _identity_patch(model, tokenizer, vector: torch.Tensor, layer: int, prompt: str) -> tuple[torch.Tensor, PatchEdit]:
    target = patched_prompt(tokenizer, prompt)
    device = next(model.parameters()).device
    return target.input_ids.to(device), PatchEdit(layer=layer, row=0, position=target.position, vector=vector)


@torch.no_grad()
def decode_state(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    vector: torch.Tensor,
    layer: int,
    *,
    target_layer: int | None = None,
    k: int = 5,
    prompt: str = IDENTITY_PROMPT,
) -> list[tuple[str, float]]:
    """Top-``k`` next tokens (text, probability) of the identity prompt with ``vector`` patched in."""
    input_ids, edit = _identity_patch(model, tokenizer, vector, layer if target_layer is None else target_layer, prompt)
    with patch(model, [edit]):
        logits = model(input_ids=input_ids).logits[0, -1]
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, k)
    return [(cast(str, tokenizer.decode([int(i)])), float(p)) for p, i in zip(top.values, top.indices)]


@torch.no_grad()
def describe_state(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    vector: torch.Tensor,
    layer: int,
    *,
    target_layer: int | None = None,
    max_new_tokens: int = 6,
    prompt: str = IDENTITY_PROMPT,
) -> str:
    """Greedy multi-token continuation of the identity prompt with ``vector`` patched in."""
    input_ids, edit = _identity_patch(model, tokenizer, vector, layer if target_layer is None else target_layer, prompt)
    with patch(model, [edit]):
        out = cast(Any, model).generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return cast(str, tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
