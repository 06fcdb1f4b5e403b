"""Map between characters of a text and the tokens that encode it.

Example:
    >>> from autopatch.tokens import token_char_ends, token_at_char
    >>> ids = tok("Q: Where is the Colosseum?").input_ids
    >>> ends = token_char_ends(tok, ids)        # decoded text length after each token
    >>> token_at_char(ends, 24)                 # index of the token holding character 24

``ends[i]`` is defined as the length of ``decode(ids[: i + 1])``. Fast
tokenizers get it in linear time from the offset mapping of the decoded text,
used only when re-encoding that text gives back exactly the same ids; otherwise
(slow tokenizers, non-round-tripping ids) growing prefixes are decoded, which is
quadratic but always exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import SupportsInt

from transformers import PreTrainedTokenizerBase

from autopatch.errors import PatchError


def token_char_ends(tokenizer: PreTrainedTokenizerBase, ids: Iterable[SupportsInt]) -> list[int]:
    """``ends[i]`` is the length of ``decode(ids[: i + 1])`` (special tokens skipped)."""
    int_ids: list[int] = [int(i) for i in ids]
    return _ends_from_offsets(tokenizer, int_ids) or _ends_from_prefixes(tokenizer, int_ids)


def _ends_from_prefixes(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    return [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]


def _ends_from_offsets(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int] | None:
    """Linear-time ends via the offset mapping; ``None`` when it cannot be trusted for these ids."""
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None  # slow tokenizers have no offset mapping
    if encoded.input_ids != [i for i in ids if i not in special]:
        return None
    offsets = iter(encoded.offset_mapping)
    ends, last = [], 0
    for token in ids:
        if token not in special:
            last = next(offsets)[1]
        ends.append(last)
    return ends


def token_at_char(ends: Sequence[int], char_index: int) -> int:
    """Index of the token whose decoded text covers ``char_index``."""
    for i, end in enumerate(ends):
        if end > char_index:
            return i
    raise PatchError(f"Character {char_index} is beyond the decoded text ({ends[-1] if ends else 0} characters).")


def last_token_of_char_span(ends: Sequence[int], start: int, end: int) -> int:
    """Index of the token holding the last character of ``text[start:end]``."""
    if end <= start:
        raise PatchError(f"Empty character span [{start}, {end}).")
    return token_at_char(ends, end - 1)
