"""The OpenAI-compatible server, end to end: a real uvicorn on loopback, a tiny model, the official ``openai`` client.

Two servers live for the whole module: ``served`` (AlwaysPatch, the default
gate) and ``gated`` (a controllable gate with a ``threshold``, ``max_queue=1``
and a short timeout, for the queue, timeout, threshold and failure tests).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from autopatch.gating import GateDecision
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from server import create_app
from server.runner import BackgroundServer
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

MODEL = "tiny-llama"
FMT = PromptFormat(demonstrations=())  # the tiny model has 128 positions: no room for demonstrations
PROFILE = PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT)
TWO_HOP = "What is the capital of the country where the Colosseum is located?"
QUESTIONS = [TWO_HOP, "Who founded the company that makes the iPhone?", "What is 2+2?", "Name a colour."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs a tiny model (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def model_and_tok(one_torch_thread):
    return tiny_model_for_bytes("llama", seed=1), byte_tokenizer()  # seed 1: patched and vanilla answers differ


@pytest.fixture(scope="module")
def served(model_and_tok):
    model, tok = model_and_tok
    with BackgroundServer(create_app(model, tok, model_name=MODEL, profile=PROFILE)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


class ControlGate:
    """A learned-gate stand-in: fixed score against ``threshold``; can block (``release``) or fail."""

    feature_layers: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.threshold, self.score, self.fail = 0.5, 0.5, False
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def decide(self, inputs):
        self.entered.set()
        self.release.wait(30)
        if self.fail:
            raise RuntimeError("the test gate failed on purpose")
        return [GateDecision(self.score >= self.threshold, self.score, "control gate") for _ in inputs]

    def with_threshold(self, threshold: float) -> ControlGate:
        clone = copy.copy(self)
        clone.threshold = threshold
        return clone


@dataclass
class Gated:
    srv: BackgroundServer
    gate: ControlGate
    client: openai.OpenAI


@pytest.fixture(scope="module")
def gated(model_and_tok):
    model, tok = model_and_tok
    gate = ControlGate()
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, gate=gate, max_queue=1, request_timeout_s=2.0)
    with BackgroundServer(app) as srv:
        yield Gated(srv, gate, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60))
    gate.release.set()


def ask(client: openai.OpenAI, question: str = TWO_HOP, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kwargs)


def direct(model_and_tok, question: str, *, patching: bool, max_new_tokens: int = 8, **sampling) -> str:
    """The same request sent straight to AutoPatcher.generate (the reference for the server's answers)."""
    model, tok = model_and_tok
    enc = tok([FMT.render(question)], return_tensors="pt")
    patcher = AutoPatcher(model, tok, PROFILE)
    sampling = sampling or {"do_sample": False}
    out = patcher.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, patching=patching,
                           questions=[question], **sampling)
    return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def post(srv: BackgroundServer, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(srv.url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=60, **kwargs)


def sse_events(text: str) -> list:
    frames = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


# ---- the happy paths ------------------------------------------------------------------------


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == 128
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0


def test_disabled_patching_equals_plain_model_generate(client, model_and_tok):
    model, tok = model_and_tok
    resp = ask(client, extra_body={"autopatch": {"enabled": False}})
    enc = tok([FMT.render(TWO_HOP)], return_tensors="pt")
    plain = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert resp.choices[0].message.content == tok.decode(plain[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.role == "assistant"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (enc.input_ids.shape[1], 8)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    assert resp.autopatch["patched"] is False and "disabled" in resp.autopatch["reason"]


def test_two_hop_question_is_patched(client, model_and_tok):
    resp = ask(client, extra_body={"autopatch": {"enabled": True}})
    report = resp.autopatch
    assert report["located"] and report["patched"] and report["strategy"] == "reroute"
    assert report["location"]["span"] == "the country where the Colosseum is located"
    assert report["question"] == TWO_HOP and report["target_prompt"] == FMT.render("What is the capital of x?")
    content = resp.choices[0].message.content
    assert content == direct(model_and_tok, TWO_HOP, patching=True)
    assert content != direct(model_and_tok, TWO_HOP, patching=False)  # so the next tests can tell them apart
    assert ask(client).autopatch["patched"]  # patching is on by default


@pytest.mark.parametrize("enabled", [True, False])
def test_streaming_sends_the_answer_the_report_and_usage(client, model_and_tok, enabled):
    whole = ask(client, extra_body={"autopatch": {"enabled": enabled}})
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True},
                      extra_body={"autopatch": {"enabled": enabled}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == direct(model_and_tok, TWO_HOP, patching=enabled)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["autopatch"]["patched"] is enabled
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_frames_on_the_wire(served):
    resp = post(served, {"model": MODEL, "messages": [{"role": "user", "content": TWO_HOP}], "max_tokens": 4,
                         "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.endswith("data: [DONE]\n\n")
    events = sse_events(resp.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "usage" not in events[0]  # only with stream_options.include_usage
    assert events[-1]["choices"][0]["finish_reason"] and events[-1]["autopatch"]["patched"]


def test_strategy_override(client, model_and_tok):
    for strategy in ("backpatch", "verbalize"):
        report = ask(client, extra_body={"autopatch": {"strategy": strategy}}).autopatch
        assert report["strategy"] == strategy and report["patched"]
    assert ask(client).autopatch["strategy"] == "reroute"  # the override did not stick


def test_sampling_is_seeded_and_matches_direct_sampling(client, model_and_tok):
    kwargs = {"temperature": 1.3, "top_p": 0.9, "seed": 7, "extra_body": {"autopatch": {"enabled": False}}}
    first, second = ask(client, **kwargs), ask(client, **kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content
    torch.manual_seed(7)
    expected = direct(model_and_tok, TWO_HOP, patching=False, do_sample=True, temperature=1.3, top_p=0.9)
    assert first.choices[0].message.content == expected
    greedy = direct(model_and_tok, TWO_HOP, patching=True)
    assert ask(client, temperature=0).choices[0].message.content == greedy
    assert ask(client, temperature=1e-300, seed=3).choices[0].message.content == greedy  # no overflow: greedy


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("enabled", [False, True])
def test_stop_strings_cut_the_answer(client, model_and_tok, stream, enabled):
    answer = direct(model_and_tok, TWO_HOP, patching=enabled)
    stop = answer[3:5]  # a two-character stop string, so holding back a partial match matters
    cut = answer[: answer.find(stop)]
    kwargs = {"stop": ["never-produced", stop], "extra_body": {"autopatch": {"enabled": enabled}}}
    if stream:
        chunks = list(ask(client, stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        resp = ask(client, **kwargs)
        text, reason = resp.choices[0].message.content, [resp.choices[0].finish_reason]
    assert text == cut and reason == ["stop"]


def test_chat_history_and_unknown_fields_are_accepted(client, served):
    resp = client.chat.completions.create(
        model=MODEL, max_completion_tokens=4, presence_penalty=0.5, user="someone",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": [{"type": "text", "text": "What is the capital of "},
                                               {"type": "text", "text": "the country where the Colosseum is located?"}]}],
        extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert resp.usage.completion_tokens == 4
    assert resp.autopatch["question"] == TWO_HOP and resp.autopatch["located"]


# ---- errors ---------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hi"}]
ERRORS = [
    # (request body, HTTP status, error type, param)
    ("{not json", 400, "invalid_request_error", None),
    ("[1, 2]", 400, "invalid_request_error", None),
    ({"model": MODEL}, 400, "invalid_request_error", "messages"),
    ({"messages": []}, 400, "invalid_request_error", "messages"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "invalid_request_error", "messages[0].role"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, 400, "invalid_request_error", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "invalid_request_error", "messages[0].content"),
    ({"messages": USER, "max_tokens": "ten"}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": USER, "temperature": "hot"}, 400, "invalid_request_error", "temperature"),
    ({"messages": USER, "stream": "yes"}, 400, "invalid_request_error", "stream"),
    ({"messages": USER, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": USER, "max_tokens": 5000}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 126}, 400, "invalid_request_error", "max_completion_tokens"),
    ({"messages": USER, "temperature": 2.5}, 400, "invalid_request_error", "temperature"),
    ({"messages": USER, "n": 2}, 400, "invalid_request_error", "n"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, 400, "invalid_request_error", "stream_options"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request_error", "stop"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, 400, "context_length_exceeded", "messages"),
    ({"messages": USER, "model": "gpt-4o"}, 404, "not_found_error", "model"),
    ({"messages": USER, "autopatch": {"strategy": "teleport"}}, 400, "invalid_request_error", "autopatch.strategy"),
    ({"messages": USER, "autopatch": {"enabeld": False}}, 400, "invalid_request_error", "autopatch.enabeld"),
    ({"messages": USER, "autopatch": {"threshold": 0.3}}, 400, "invalid_request_error", "autopatch.threshold"),
]


@pytest.mark.parametrize("body,status,kind,param", ERRORS, ids=[f"{i}-{e[1]}-{e[3]}" for i, e in enumerate(ERRORS)])
def test_errors_have_openai_shape(served, body, status, kind, param):
    resp = post(served, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (kind, param)
    assert error["message"] and "Traceback" not in error["message"]


def test_threshold_error_names_the_gate_that_has_none(served):
    message = post(served, {"messages": USER, "autopatch": {"threshold": 0.3}}).json()["error"]["message"]
    assert "needs a learned gate" in message and "(AlwaysPatch) has no threshold" in message


def test_openai_client_raises_the_matching_exceptions(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=MODEL, messages=USER, n=3)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 400}])
    assert err.value.code == "context_length_exceeded"


def test_unknown_route_and_method_use_the_error_shape(served):
    assert httpx.get(served.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    resp = httpx.get(served.url + "/v1/chat/completions")
    assert resp.status_code == 405 and resp.json()["error"]["message"]
    assert httpx.get(served.url + "/v1/models/other").status_code == 404


# ---- concurrency, queueing, timeouts, failures ------------------------------------------------


def test_concurrent_requests_equal_sequential_ones(client):
    jobs = [(QUESTIONS[i % len(QUESTIONS)], i % 3 != 0, i % 4 == 1) for i in range(16)]  # question, patch, stream

    def run(job):
        question, enabled, stream = job
        if stream:
            chunks = list(ask(client, question, stream=True, extra_body={"autopatch": {"enabled": enabled}}))
            report = next(c.model_extra["autopatch"] for c in chunks if c.choices and c.choices[0].finish_reason)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), report["patched"]
        resp = ask(client, question, extra_body={"autopatch": {"enabled": enabled}})
        return resp.choices[0].message.content, resp.autopatch["patched"]

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(run, jobs))
    assert concurrent == sequential
    assert {patched for _, patched in sequential} == {True, False}


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_full_queue_answers_503(gated):
    gate, srv = gated.gate, gated.srv
    gate.entered.clear()
    gate.release.clear()
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(ask, gated.client)  # blocks inside the gate: the worker is busy
        assert gate.entered.wait(10)
        waiting = pool.submit(ask, gated.client)  # fills the queue (max_queue=1)
        _wait_for(lambda: httpx.get(srv.url + "/health").json()["queue_depth"] == 1)
        refused = post(srv, {"messages": [{"role": "user", "content": TWO_HOP}], "max_tokens": 2})
        gate.release.set()
        assert running.result().choices and waiting.result().choices
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "unavailable_error"
    assert refused.headers["retry-after"] == "1"


def test_timeout_answers_504_and_the_worker_carries_on(gated):
    gate = gated.gate
    gate.release.clear()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            ask(gated.client)
        assert err.value.status_code == 504 and err.value.body["type"] == "timeout_error"
    finally:
        gate.release.set()
    assert ask(gated.client).choices[0].finish_reason in ("stop", "length")


def test_gate_threshold_override_applies_to_one_request(gated):
    assert ask(gated.client).autopatch["patched"]  # score 0.5 >= threshold 0.5
    report = ask(gated.client, extra_body={"autopatch": {"threshold": 0.9}}).autopatch
    assert not report["patched"] and report["gate_score"] == 0.5
    assert ask(gated.client).autopatch["patched"] and gated.gate.threshold == 0.5


def test_a_failing_generation_is_a_500_or_an_error_frame_and_the_worker_survives(gated):
    gated.gate.fail = True
    try:
        plain = post(gated.srv, {"messages": [{"role": "user", "content": TWO_HOP}], "max_tokens": 2})
        streamed = post(gated.srv, {"messages": [{"role": "user", "content": TWO_HOP}], "max_tokens": 2, "stream": True})
        with pytest.raises(openai.APIError, match="internal error"):
            list(ask(gated.client, stream=True))
    finally:
        gated.gate.fail = False
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
    assert "test gate failed" not in plain.text and "Traceback" not in plain.text
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert sse_events(streamed.text)[-1]["error"]["type"] == "server_error"
    assert ask(gated.client).choices[0].message.content is not None


def test_an_api_key_guards_every_route_but_health_and_big_bodies_get_413(model_and_tok):
    model, tok = model_and_tok
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, api_key="s3cret", max_body_bytes=2000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": TWO_HOP}], "max_tokens": 2}
    with BackgroundServer(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, headers=key).status_code == 200
        big = {**body, "messages": [{"role": "user", "content": "x" * 5000}]}
        too_large = httpx.post(srv.url + "/v1/chat/completions", json=big, headers=key)
        assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield json.dumps(big).encode()

        chunked = httpx.post(srv.url + "/v1/chat/completions", content=chunks(),
                             headers={**key, "Content-Type": "application/json"})
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
        assert httpx.get(srv.url + "/docs", headers=key).status_code == 404  # its assets need a CDN; off
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert client.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("field,value", [("logprobs", True), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("tool_choice", "required"),
                                         ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}})])
def test_fields_that_change_the_answer_are_refused_not_ignored(served, field, value):
    body = {"model": MODEL, "messages": [{"role": "user", "content": TWO_HOP}], "max_tokens": 2, field: value}
    resp = post(served, body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    harmless = {**body, field: {"logprobs": False, "tools": [], "tool_choice": "none",
                                "response_format": {"type": "text"}}[field]}
    assert post(served, harmless).status_code == 200


def test_overlong_stop_strings_are_refused(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": TWO_HOP}], "max_tokens": 2, "stop": ["x" * 300]}
    resp = post(served, body)
    assert resp.status_code == 400 and "at most 256 characters" in resp.json()["error"]["message"]
