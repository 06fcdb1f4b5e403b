"""``isolate``: the first hop's state with the second hop masked out (Patchscopes §5, same prompt)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from autopatch.engine import capture
from autopatch.errors import ConfigError
from autopatch.gating import AlwaysPatch
from autopatch.isolate import isolate_jobs, isolate_span_jobs, isolated_row, isolated_states, span_bounds
from autopatch.patcher import AutoPatcher
from autopatch.prefix_cache import MIN_PREFIX_TOKENS, prefix_layout
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from autopatch.registry import STRATEGIES
from autopatch.strategies import plan_targets
from eval.methods import METHODS
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTION = "What is the capital of the country where the Colosseum is located?"
PROFILE = PatchProfile(strategy="isolate", source_position="span_end", source_layer=2, target_layer=1,
                       prompt_format=PromptFormat(demonstrations=()))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_for_bytes("llama"), byte_tokenizer()


def _job(patcher: AutoPatcher, question: str):
    enc = patcher.encode([question])
    with patcher.prefill(enc.input_ids, enc.attention_mask, [PROFILE.source_layer], [question]) as pre:
        patcher.model(**enc)
    return pre.job(0, "span_end", PROFILE.source_layer), enc


def test_isolate_is_one_registry_entry_and_an_eval_method():
    assert STRATEGIES["isolate"].uses_state and STRATEGIES["isolate"].states() is isolate_jobs
    assert STRATEGIES["isolate-span"].states() is isolate_span_jobs
    assert METHODS["isolate"].kind == "patch" and METHODS["isolate-span"].kind == "patch"


def test_the_isolated_row_drops_the_second_hop_and_keeps_every_position(tiny):
    model, tok = tiny
    job, enc = _job(AutoPatcher(model, tok, profile=PROFILE, gate=AlwaysPatch()), QUESTION)
    ids, positions = isolated_row(tok, job)
    assert tok.decode(ids).endswith("Q: the country where the Colosseum is located")
    assert positions[-1] == job.source_index and torch.equal(ids, job.prompt_ids[positions])
    dropped = sorted(set(range(job.source_index + 1)) - set(positions.tolist()))
    assert tok.decode(job.prompt_ids[dropped]) == "What is the capital of "


@pytest.mark.parametrize("demonstrations", [(), (("Which planet is red?", "Mars"), ("Who wrote Hamlet?", "Shakespeare"))])
def test_the_isolated_state_is_the_masked_forward_of_the_whole_prompt(tiny, demonstrations):
    """Leaving the second hop's tokens out at their positions is the same as masking them out of attention
    (with demonstrations, the rows start from the cached prefix)."""
    model, tok = tiny
    profile = replace(PROFILE, prompt_format=PromptFormat(demonstrations=demonstrations))
    patcher = AutoPatcher(model, tok, profile=profile, gate=AlwaysPatch())
    job, enc = _job(patcher, QUESTION)
    other, _ = _job(patcher, "Who founded the company that makes the iPhone?")
    if demonstrations:
        assert prefix_layout(model, [isolated_row(tok, j)[0] for j in (job, other)], 0,
                             protect=[span_bounds(tok, j)[0] for j in (job, other)]).prefix_len >= MIN_PREFIX_TOKENS
    _, kept = isolated_row(tok, job)
    n = job.source_index + 1
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    hidden = sorted(set(range(n)) - set(kept.tolist()))
    allowed[job.source_index, hidden] = False
    for q in kept.tolist():  # the kept tokens after the gap never see the second hop either
        if q > hidden[-1]:
            allowed[q, hidden] = False
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with capture(model, layers=[2], positions=[job.source_index]) as cap:
        model(input_ids=job.prompt_ids[None, :n], attention_mask=mask)
    masked = cap.states[2][0, 0]
    isolated = isolated_states(model, tok, profile, [job, other])[0][-1]
    ordinary = job.vector
    torch.testing.assert_close(isolated, masked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(isolated, ordinary, atol=1e-4)


def test_a_question_whose_span_opens_it_keeps_the_ordinary_state(tiny):
    model, tok = tiny
    job, _ = _job(AutoPatcher(model, tok, profile=PROFILE, gate=AlwaysPatch()),
                  "The country where the Colosseum is located has what capital?")
    if job.location.span_start != 0:
        pytest.skip("the locator did not put this span first")
    isolated = isolated_states(model, tok, PROFILE, [job])[0][-1]
    torch.testing.assert_close(isolated, job.vector, rtol=1e-4, atol=1e-5)


def test_isolate_generates_with_its_controls_and_refuses_the_last_position(tiny):
    model, tok = tiny
    patcher = AutoPatcher(model, tok, profile=PROFILE, gate=AlwaysPatch())
    enc = patcher.encode([QUESTION, "Who wrote Hamlet?"])
    result = patcher.generate_with_reports(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                           questions=[QUESTION, "Who wrote Hamlet?"])
    assert result.output.shape[0] == 2 and result.reports[0].patched and not result.reports[1].patched
    target = result.targets[0]
    assert torch.equal(target.input_ids, _job(patcher, QUESTION)[0].prompt_ids)  # the same prompt
    (layer, position, vector), = target.edits
    assert (layer, position) == (PROFILE.target_layer, _job(patcher, QUESTION)[0].source_index)
    with pytest.raises(ConfigError, match="source position"):
        isolated_states(model, tok, PatchProfile(strategy="isolate", source_position="last", source_layer=2,
                                                 target_layer=1), [_job(patcher, QUESTION)[0]])


def test_isolate_span_patches_every_first_hop_token_and_its_controls_act_on_each(tiny):
    model, tok = tiny
    profile = PatchProfile(strategy="isolate-span", source_position="span_end", source_layer=2, target_layer=1,
                           prompt_format=PromptFormat(demonstrations=()))
    job, _ = _job(AutoPatcher(model, tok, profile=profile, gate=AlwaysPatch()), QUESTION)
    _, span_start = span_bounds(tok, job)
    (target,) = plan_targets(model, tok, profile, [job])
    assert [p for _, p, _ in target.edits] == [job.source_index, *range(span_start, job.source_index)]
    assert tok.decode(job.prompt_ids[span_start:job.source_index + 1]).strip() == "the country where the Colosseum is located"
    states = isolated_states(model, tok, profile, [job])[0]
    torch.testing.assert_close(target.edits[0][2], states[-1])
    (random,) = plan_targets(model, tok, profile, [job], control="random")
    assert len(random.edits) == len(target.edits)
    for (_, _, v), (_, _, r) in zip(target.edits, random.edits):
        assert not torch.allclose(v, r) and torch.isclose(v.norm(), r.norm(), rtol=1e-4)
    assert plan_targets(model, tok, profile, [job], control="nopatch")[0].edits == []
