"""Stop each row of a batch when its generated text contains a stop string, at a few decodes per step.

Example:
    >>> criteria = StoppingCriteriaList([StopOnText(tok, ["\\nQ:"], prompt_width=enc.input_ids.shape[1])])
    >>> model.generate(**enc, max_new_tokens=16, stopping_criteria=criteria)

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


class StopOnText(StoppingCriteria):
    """``True`` for the rows whose tokens after ``prompt_width`` decode to text containing one of ``stops``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, [s for s in stops if s], prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.width :]
        done = [any(stop in self.tokenizer.decode(row, skip_special_tokens=True) for stop in self.stops) for row in new]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))
