"""Mechanics of capture/patch on tiny random models of many architectures."""

from __future__ import annotations

import pytest
import torch

from autopatch.architectures import decoder_layers, final_norm, num_layers, unembedding
from autopatch.engine import PatchEdit, block_hidden, capture, patch, with_block_hidden
from autopatch.errors import PatchError
from autopatch.strategies import left_pad
from tests.tiny_models import TINY_ARCHITECTURES, VOCAB, tiny_model

torch.set_grad_enabled(False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def model(request):
    return tiny_model(request.param)


def ids(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def greedy(model, input_ids, attention_mask=None, n=4):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def test_patching_a_state_with_itself_leaves_logits_unchanged(model):
    (x,) = ids(9)
    x = x[None]
    reference = model(x).logits
    with capture(model, layers=[1, 2]) as cap:
        model(x)
    edits = [PatchEdit(layer, 0, pos, cap.states[layer][0, pos]) for layer in (1, 2) for pos in range(9)]
    with patch(model, edits):
        patched = model(x).logits
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)


def test_patch_sets_the_block_output_and_leaves_earlier_positions_alone(model):
    (x,) = ids(8, seed=1)
    x = x[None]
    vector = torch.randn(model.config.hidden_size) * 3
    clean = model(x, output_hidden_states=True).hidden_states
    with patch(model, [PatchEdit(layer=1, row=0, position=5, vector=vector)]):
        patched = model(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(patched[2][0, 5], vector)  # hidden_states[l + 1] is block l's output
    for layer_states_clean, layer_states_patched in zip(clean, patched):
        torch.testing.assert_close(layer_states_patched[0, :5], layer_states_clean[0, :5])
    assert not torch.allclose(patched[-1][0, 5:], clean[-1][0, 5:])


def test_patch_at_last_layer_matches_hand_computed_logits(model):
    (x,) = ids(6, seed=2)
    vector = torch.randn(model.config.hidden_size)
    last = num_layers(model) - 1
    with patch(model, [PatchEdit(layer=last, row=0, position=3, vector=vector)]):
        logits = model(x[None]).logits[0, 3]
    by_hand = unembedding(model)(final_norm(model)(vector[None, None]))[0, 0]
    torch.testing.assert_close(logits, by_hand, atol=1e-4, rtol=1e-4)


def test_patch_applies_the_mapping_function(model):
    (x,) = ids(5, seed=3)
    vector = torch.randn(model.config.hidden_size)
    with patch(model, [PatchEdit(layer=0, row=0, position=-1, vector=vector, fn=lambda v: 2 * v + 1)]):
        hidden = model(x[None], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(hidden[0, -1], 2 * vector + 1)


def test_decode_steps_are_untouched(model):
    (x,) = ids(7, seed=4)
    x = x[None]
    vector = torch.randn(model.config.hidden_size) * 5
    calls = []

    def counted(v):
        calls.append(1)
        return v

    with patch(model, [PatchEdit(layer=1, row=0, position=-1, vector=vector, fn=counted)]):
        generated = greedy(model, x, n=5).sequences[0, 7:]
    assert len(calls) == 1  # the prefill only

    # by hand: patched prefill, then plain cached decoding with no hooks
    with patch(model, [PatchEdit(layer=1, row=0, position=-1, vector=vector)]):
        out = model(x, use_cache=True)
    cache, token, tokens = out.past_key_values, out.logits[0, -1].argmax(), []
    for step in range(5):
        tokens.append(int(token))
        out = model(token.view(1, 1), past_key_values=cache, use_cache=True,
                    attention_mask=torch.ones(1, 8 + step, dtype=torch.long))
        cache, token = out.past_key_values, out.logits[0, -1].argmax()
    assert generated.tolist() == tokens


def test_left_padded_batch_equals_one_by_one(model):
    rows = ids(5, 9, 3, seed=5)
    input_ids, mask = left_pad(rows, pad_id=0)
    vectors = [torch.randn(model.config.hidden_size) for _ in rows]
    edits = [PatchEdit(layer=1, row=i, position=1, vector=v) for i, v in enumerate(vectors)]
    with capture(model, layers=[2], positions=[0, -1], attention_mask=mask) as cap, \
            patch(model, edits, attention_mask=mask):
        batched = greedy(model, input_ids, mask, n=1).scores[0]
    for i, row in enumerate(rows):
        with capture(model, layers=[2], positions=[0, -1]) as single_cap, \
                patch(model, [PatchEdit(layer=1, row=0, position=1, vector=vectors[i])]):
            single = greedy(model, row[None], n=1).scores[0]
        torch.testing.assert_close(batched[i], single[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cap.states[2][i], single_cap.states[2][0], atol=1e-4, rtol=1e-4)


def test_per_row_capture_positions(model):
    rows = ids(6, 4, seed=6)
    input_ids, mask = left_pad(rows, pad_id=0)
    with capture(model, layers=[0], attention_mask=mask) as full, \
            capture(model, layers=[0], positions=[[5, 1], [0, 3]], attention_mask=mask) as picked:
        model(input_ids=input_ids, attention_mask=mask)
    torch.testing.assert_close(picked.states[0][0], full.states[0][0, [5, 1]])
    torch.testing.assert_close(picked.states[0][1], full.states[0][1, [2, 5]])  # 2 pads on row 1


def _hooks_left(model) -> int:
    return sum(len(block._forward_hooks) for block in decoder_layers(model))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_hooks_are_removed_after_an_exception(model, error):
    vector = torch.zeros(model.config.hidden_size)
    before = _hooks_left(model)  # transformers may keep hooks of its own on the blocks
    with pytest.raises(error):
        with capture(model, layers=[0, 1]), patch(model, [PatchEdit(1, 0, 0, vector)]):
            assert _hooks_left(model) == before + 3
            raise error("boom")
    assert _hooks_left(model) == before


def test_bad_position_raises_a_clear_error_and_cleans_up(model):
    (x,) = ids(4)
    before = _hooks_left(model)
    with pytest.raises(PatchError, match="outside a prompt of 4 tokens"):
        with patch(model, [PatchEdit(1, 0, 10, torch.zeros(model.config.hidden_size))]):
            model(x[None])
    assert _hooks_left(model) == before
    with pytest.raises(PatchError, match="decoder blocks"):
        with patch(model, [PatchEdit(99, 0, 0, torch.zeros(model.config.hidden_size))]):
            pass


def test_wrong_vector_size_names_the_fix(model):
    (x,) = ids(4)
    with pytest.raises(PatchError, match="fn="):
        with patch(model, [PatchEdit(0, 0, 0, torch.zeros(model.config.hidden_size + 1))]):
            model(x[None])


def test_both_block_output_shapes_are_handled():
    hidden = torch.randn(1, 3, 4)
    other = torch.randn(2)
    assert block_hidden(hidden) is hidden
    assert block_hidden((hidden, other)) is hidden
    new = torch.zeros_like(hidden)
    assert with_block_hidden(hidden, new) is new
    replaced = with_block_hidden((hidden, other), new)
    assert isinstance(replaced, tuple) and replaced[0] is new and replaced[1] is other
    with pytest.raises(PatchError):
        block_hidden("not a tensor")


def test_tiny_models_cover_tuple_and_tensor_blocks():
    kinds = set()
    for arch in TINY_ARCHITECTURES:
        m = tiny_model(arch)
        seen: list[type] = []
        handle = decoder_layers(m)[0].register_forward_hook(lambda mod, a, o, seen=seen: seen.append(type(o)))
        m(torch.tensor([[3, 4, 5]]))
        handle.remove()
        kinds.add(tuple if issubclass(seen[0], tuple) else torch.Tensor)
    assert kinds == {tuple, torch.Tensor}
