"""The same-prompt variant of Patchscopes §5: the first hop's state, computed without the second hop's words.

Example:
    >>> profile = replace(profile, strategy="isolate", source_position="span_end", source_layer=9, target_layer=9)
    >>> AutoPatcher(model, tok, profile=profile, gate=AlwaysPatch()).generate(**enc, max_new_tokens=8)

In "What is the capital of the country where the Colosseum is located?" the first hop's tokens ("the country
where the Colosseum is located") attend to the second hop's words before them ("the capital of"). Patchscopes
§5 computes the first hop's state with the attention mask adjusted so that it cannot see them, then patches that
state into the same position of the ordinary forward pass. Masking those keys out is the same computation as
leaving their tokens out while keeping every other token's position id, which is what :func:`isolated_states`
does: the prompt up to the question (system turn, demonstrations), then the question's tokens from the span's
first token to the source position, at their original positions. The strategy then patches the state into the
same prompt at the same position (``build_backpatch``), at any target layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from autopatch.engine import capture
from autopatch.errors import ConfigError
from autopatch.prefix import left_pad
from autopatch.profile import PatchProfile
from autopatch.strategies import PatchJob
from autopatch.tokens import token_at_char, token_char_ends

ISOLABLE_POSITIONS = ("span_end", "subject_end")


def isolated_row(tok: PreTrainedTokenizerBase, job: PatchJob) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, position_ids)`` of ``job``'s prompt without the question's tokens before the first-hop span.

    When the span opens the question nothing is left out, and the state equals the ordinary one.
    """
    ids = job.prompt_ids
    text = cast(str, tok.decode(ids, skip_special_tokens=True))
    at = text.rfind(job.location.question)
    if at < 0:
        raise ConfigError("isolate: the located question does not occur in the decoded prompt; use another strategy "
                          "for this tokenizer.")
    ends = token_char_ends(tok, ids)
    question_start = token_at_char(ends, at)
    span_start = max(question_start, token_at_char(ends, at + job.location.span_start))
    keep = [*range(question_start), *range(span_start, job.source_index + 1)]
    index = torch.tensor(keep, dtype=torch.long)
    return ids[index], index


@torch.no_grad()
def isolated_states(model: torch.nn.Module, tok: PreTrainedTokenizerBase, profile: PatchProfile,
                    jobs: Sequence[PatchJob]) -> list[torch.Tensor]:
    """Block ``profile.source_layer``'s output at each job's source position, the second hop masked out."""
    if profile.source_position not in ISOLABLE_POSITIONS:
        raise ConfigError(f"isolate needs a source position inside the first hop ({', '.join(ISOLABLE_POSITIONS)}), "
                          f"not {profile.source_position!r}.")
    if not jobs:
        return []
    rows = [isolated_row(tok, job) for job in jobs]
    ids, mask = left_pad([r[0] for r in rows], tok.pad_token_id)
    positions = torch.zeros_like(ids)
    for i, (_, pos) in enumerate(rows):
        positions[i, ids.shape[1] - len(pos):] = pos
    device = next(model.parameters()).device
    with capture(model, layers=[profile.source_layer], positions=[-1], attention_mask=mask) as cap:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
              logits_to_keep=1)
    states = cap.states[profile.source_layer][:, 0]
    return [states[i].to(job.vector.dtype) for i, job in enumerate(jobs)]
