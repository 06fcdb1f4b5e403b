"""Map between characters of a text and the tokens that encode it.

Example:
    >>> from autopatch.tokens import token_char_ends, token_at_char
    >>> ids = tok("Q: Where is the Colosseum?").input_ids
    >>> ends = token_char_ends(tok, ids)        # decoded text length after each token
    >>> token_at_char(ends, 24)                 # index of the token holding character 24

Offsets come from decoding growing prefixes of the ids, which works for any
tokenizer (slow or fast, with or without offset mapping) and exactly matches
``tok.decode(ids)``; prompts are short, so the quadratic cost does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def token_char_ends(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int]:
    """``ends[i]`` is the length of ``decode(ids[: i + 1])`` (special tokens skipped)."""
    ids = [int(i) for i in ids]
    ends = []
    for i in range(len(ids)):
        ends.append(len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)))
    return ends


def token_at_char(ends: Sequence[int], char_index: int) -> int:
    """Index of the token whose decoded text covers ``char_index``."""
    for i, end in enumerate(ends):
        if end > char_index:
            return i
    raise IndexError(f"Character {char_index} is beyond the decoded text ({ends[-1] if ends else 0} characters).")


def last_token_of_char_span(ends: Sequence[int], start: int, end: int) -> int:
    """Index of the token holding the last character of ``text[start:end]``."""
    if end <= start:
        raise ValueError(f"Empty character span [{start}, {end}).")
    return token_at_char(ends, end - 1)
