"""The one stop mechanism: where generated text ends, for the library, the server and the proxy.

Example:
    >>> criteria = StoppingCriteriaList([StopOnText(tok, ["\\nQ:"], prompt_width=enc.input_ids.shape[1])])
    >>> model.generate(**enc, max_new_tokens=16, stopping_criteria=criteria)
    >>> cut_at_stop("Rome\\nQ: next", ["\\nQ:"])      # the text before the first stop string, and whether one came
    ('Rome', True)
    >>> stop_token_ids(tok, BRIDGE_STOPS)                  # EOS and the stops that are single tokens

transformers' own ``stop_strings=`` builds tables over the whole vocabulary on every ``generate`` call, which
costs seconds for Gemma's 262k tokens (measured: 3.25 s against 1.03 s per short request in
``bench/bench_server.py``). Answers here are a few tokens long, so decoding each row's new tokens at every
step is cheaper, and it stops at the same step: the first one whose text contains a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

BRIDGE_STOPS: tuple[str, ...] = ("\n", ";")  # where a decoded bridge (or a first hop's short answer) ends
PARAGRAPH_STOPS: tuple[str, ...] = ("\n\n",)  # where a proposed decomposition ends


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest occurrence of any of ``stops``, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> list[int]:
    """EOS, plus each of ``stops`` that is a single token: generation ends there with no wasted decode step
    (a stop of several tokens is cut from the text instead, :func:`cut_at_stop`)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for stop in stops:
        encoded = tokenizer(stop, add_special_tokens=False).input_ids
        if len(encoded) == 1:
            ids.append(encoded[0])
    return ids


class StopOnText(StoppingCriteria):
    """``True`` for the rows whose tokens after ``prompt_width`` decode to text containing one of ``stops``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, [s for s in stops if s], prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.width :]
        done = [any(stop in self.tokenizer.decode(row, skip_special_tokens=True) for stop in self.stops) for row in new]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))
