"""The explain view on a tiny model: one reading per layer and source, the same as patching one row at a time,
the logit lens equal to the model's own last-layer logits, and the files it writes."""

from __future__ import annotations

import json

import pytest
import torch

from autopatch.engine import PatchEdit, capture, patch
from autopatch.explain import READINGS, bridge_token_ids, explain
from autopatch.locate import UnlocatableQuestion
from autopatch.patchscope import IDENTITY_PROMPT, patched_prompt
from autopatch.prompts import PromptFormat
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
Q = "What is the capital of the country where the Colosseum is located?"
FMT = PromptFormat(demonstrations=())


@pytest.fixture(scope="module")
def model():
    return tiny_model_for_bytes("llama", seed=5)


def test_every_layer_and_reading_matches_a_one_row_patchscope(model):
    tok = byte_tokenizer()
    view = explain(model, tok, Q, fmt=FMT, bridge="Italy")
    assert view.layers == [0, 1, 2, 3] or len(view.layers) == model.config.num_hidden_layers
    assert set(view.readings) == set(READINGS) and all(len(v) == len(view.layers) for v in view.readings.values())
    # the batched identity readings equal patching the subject's state alone, layer by layer
    ids = tok(FMT.render(Q), return_tensors="pt").input_ids
    subject_at = FMT.render(Q).rfind("Colosseum") + len("Colosseum") - 1  # byte tokenizer: one token per byte (+BOS)
    layer = view.layers[-1]
    with capture(model, [layer], [subject_at + 1]) as cap:
        model(input_ids=ids)
    identity = patched_prompt(tok, IDENTITY_PROMPT)
    with patch(model, [PatchEdit(layer, 0, identity.position, cap.states[layer][0, 0])]):
        logits = model(input_ids=identity.input_ids).logits[0, -1]
    probs = torch.softmax(logits.float(), -1)
    reading = view.readings["subject: identity"][-1]
    assert reading.prob == pytest.approx(float(probs.max()), abs=1e-5)
    # byte-level: " Italy" starts with a bare space, which starts any word, so only "I" counts
    assert bridge_token_ids(tok, "Italy") == tuple(tok("I", add_special_tokens=False).input_ids)
    assert reading.bridge_prob == pytest.approx(float(probs[tok("I", add_special_tokens=False).input_ids[0]]), abs=1e-5)


def test_the_logit_lens_of_the_last_layer_is_the_model_s_own_prediction(model):
    tok = byte_tokenizer()
    view = explain(model, tok, Q, fmt=FMT)
    logits = model(input_ids=tok(FMT.render(Q), return_tensors="pt").input_ids).logits[0, -1]
    assert view.readings["last: logit lens"][-1].prob == pytest.approx(float(torch.softmax(logits, -1).max()), abs=1e-5)


def test_the_view_is_written_as_json_markdown_and_a_heat_map(model, tmp_path):
    view = explain(model, byte_tokenizer(), Q, fmt=FMT, bridge="Italy", layers=[1, 2])
    view.save(tmp_path)
    data = json.loads((tmp_path / "explain.json").read_text())
    assert data["span"] == "the country where the Colosseum is located" and data["layers"] == [1, 2]
    assert (tmp_path / "explain.png").stat().st_size > 1000
    assert (tmp_path / "explain.md").read_text().count("\n| ") == 3  # header + two layers
    with pytest.raises(UnlocatableQuestion):
        explain(model, byte_tokenizer(), "Write a poem.", fmt=FMT)
