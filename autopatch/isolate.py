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
from dataclasses import replace
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from autopatch.engine import capture
from autopatch.errors import ConfigError
from autopatch.prefix_cache import prefix_layout
from autopatch.profile import PatchProfile, Position
from autopatch.strategies import PatchJob
from autopatch.tokens import token_at_char, token_char_ends

ISOLABLE_POSITIONS = tuple(p for p in Position if p.inside_first_hop)


def span_bounds(tok: PreTrainedTokenizerBase, job: PatchJob) -> tuple[int, int]:
    """Token indices in ``job.prompt_ids`` where the question starts and where its first-hop span starts."""
    text = cast(str, tok.decode(job.prompt_ids, skip_special_tokens=True))
    at = text.rfind(job.location.question)
    if at < 0:
        raise ConfigError("isolate: the located question does not occur in the decoded prompt; use another strategy "
                          "for this tokenizer.")
    ends = token_char_ends(tok, job.prompt_ids)
    question_start = token_at_char(ends, at)
    return question_start, max(question_start, token_at_char(ends, at + job.location.span_start))


def isolated_row(tok: PreTrainedTokenizerBase, job: PatchJob) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, position_ids)`` of ``job``'s prompt without the question's tokens before the first-hop span.

    When the span opens the question nothing is left out, and the state equals the ordinary one.
    """
    return _row(job, *span_bounds(tok, job))


def _row(job: PatchJob, question_start: int, span_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([*range(question_start), *range(span_start, job.source_index + 1)], dtype=torch.long)
    return job.prompt_ids[index], index


@torch.no_grad()
def isolated_states(model: torch.nn.Module, tok: PreTrainedTokenizerBase, profile: PatchProfile,
                    jobs: Sequence[PatchJob]) -> list[torch.Tensor]:
    """Block ``profile.source_layer``'s output at each job's first-hop tokens, from the span's first token to the
    source position, computed without the second hop: ``(span tokens, hidden)``, the source position last."""
    if profile.source_position not in ISOLABLE_POSITIONS:
        raise ConfigError(f"isolate needs a source position inside the first hop ({', '.join(ISOLABLE_POSITIONS)}), "
                          f"not {profile.source_position!r}.")
    if not jobs:
        return []
    bounds = [span_bounds(tok, job) for job in jobs]
    rows = [_row(job, *b) for job, b in zip(jobs, bounds)]
    # The rows share the prompt up to the question (system turn, demonstrations): start from its cached KV.
    lay = prefix_layout(model, [ids for ids, _ in rows], tok.pad_token_id, protect=[q for q, _ in bounds])
    width, cached = lay.width, lay.prefix_len
    positions = torch.zeros(len(rows), width - cached, dtype=torch.long)
    for i, (_, pos) in enumerate(rows):
        positions[i, width - len(pos):] = pos[cached:]
    device = next(model.parameters()).device
    with capture(model, layers=[profile.source_layer], attention_mask=lay.engine_mask) as cap:
        model(input_ids=lay.input_ids[:, cached:].to(device), attention_mask=lay.attention_mask.to(device),
              position_ids=positions.to(device), logits_to_keep=1, **lay.generate_kwargs(model))
    states = cap.states[profile.source_layer]  # (batch, width - cached, hidden): the rows end together, left-padded
    return [states[i, states.shape[1] - (job.source_index + 1 - span_start):].to(job.vector.dtype)
            for i, (job, (_, span_start)) in enumerate(zip(jobs, bounds))]


def isolate_jobs(model: torch.nn.Module, tok: PreTrainedTokenizerBase, profile: PatchProfile,
                 jobs: Sequence[PatchJob]) -> list[PatchJob]:
    """Registered as the source of ``isolate``: each job's state replaced by its isolated state."""
    return [replace(job, vector=states[-1]) for job, states in zip(jobs, isolated_states(model, tok, profile, jobs))]


def isolate_span_jobs(model: torch.nn.Module, tok: PreTrainedTokenizerBase, profile: PatchProfile,
                      jobs: Sequence[PatchJob]) -> list[PatchJob]:
    """Registered as the source of ``isolate-span``: every token of the first hop up to the source position,
    isolated, patched at its own position (several positions of the span at once)."""
    out = []
    for job, states in zip(jobs, isolated_states(model, tok, profile, jobs)):
        span_start = job.source_index + 1 - len(states)
        span = [(span_start + k, state) for k, state in enumerate(states)]
        out.append(replace(job, vector=span[-1][1], more=tuple(span[:-1])))
    return out
