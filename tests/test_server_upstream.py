"""Decomposition in front of an OpenAI-compatible server (``autopatch serve --upstream``), tested against a real
server process of this package (patching off) on a tiny model: its answers equal the local ``decompose``, it passes
through what it cannot read unchanged, streams, refuses hidden-state strategies, and turns every upstream failure
into an OpenAI-shaped 502/504 in time, never echoing the upstream's key."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from autopatch.gating import AlwaysPatch
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from server import create_app
from server.runner import BackgroundServer
from server.upstream import UpstreamDecomposer, create_proxy_app
from tests.tiny_models import CHAT_TEMPLATE, byte_tokenizer, tiny_model_for_bytes

TWO_HOP = "What is the capital of the country where the Colosseum is located?"
PLAIN = "Write a haiku about the sea."
FMT = PromptFormat(kind="chat", demonstrations=())
KEY = "upstream-secret-key-123"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs a tiny model (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def model_and_tok():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tiny_model_for_bytes("llama", seed=1, max_position_embeddings=1024), tok


@pytest.fixture(scope="module")
def upstream(model_and_tok):
    model, tok = model_and_tok
    profile = PatchProfile(source_layer=2, target_layer=1, prompt_format=FMT)
    with BackgroundServer(create_app(model, tok, model_name="tiny", profile=profile, patching_default=False,
                                     api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def proxy(upstream):
    with BackgroundServer(create_proxy_app(upstream.url, upstream_api_key=KEY, timeout_s=60, fmt=FMT)) as srv:
        yield srv


def chat(srv, content, **extra) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
                            **extra})


def test_the_proxied_answer_equals_the_local_decompose(model_and_tok, proxy):
    model, tok = model_and_tok
    local = AutoPatcher(model, tok, PatchProfile(strategy="decompose", source_layer=2, target_layer=1, prompt_format=FMT),
                        gate=AlwaysPatch()).answer(TWO_HOP, max_new_tokens=6)[0]
    response = chat(proxy, TWO_HOP)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["autopatch"]["patched"] and data["autopatch"]["bridge"] == local.report.bridge
    assert data["choices"][0]["message"]["content"].strip() == local.text


def test_what_it_cannot_read_passes_through_unchanged(upstream, proxy):
    direct = httpx.post(upstream.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                        json={"messages": [{"role": "user", "content": PLAIN}], "max_tokens": 6, "temperature": 0})
    proxied = chat(proxy, PLAIN)
    assert proxied.status_code == 200 and "autopatch" not in proxied.json() or not proxied.json()["autopatch"]["patched"]
    assert proxied.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]


def test_streaming_relays_the_upstream_stream_for_both_routes(proxy):
    for question in (PLAIN, TWO_HOP):
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": question}], "max_tokens": 6,
                                "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in lines[:-1] if json.loads(line[6:]).get("choices"))
        assert streamed.strip() == chat(proxy, question).json()["choices"][0]["message"]["content"].strip()


def test_hidden_state_strategies_are_refused_with_the_reason(proxy):
    response = chat(proxy, TWO_HOP, autopatch={"strategy": "verbalize"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "autopatch.strategy" and "hidden states" in error["message"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _Bad:
    """A raw HTTP upstream that misbehaves in one way: hangs, answers 500 or non-JSON, or cuts its stream."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            if self.mode == "hang":
                time.sleep(30)
            elif self.mode == "500":
                body = json.dumps({"error": {"message": f"boom {KEY}"}}).encode()
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
            elif self.mode == "garbage":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\nnot json!")
            elif self.mode == "cut":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                             b'data: {"choices": [{"delta": {"content": "Ro"}}]}\n\n')
            conn.close()


@pytest.mark.parametrize("mode, status", [("refused", 502), ("hang", 504), ("500", 502), ("garbage", 502)])
def test_upstream_failures_are_openai_shaped_502_or_504_in_time_without_the_key(mode, status):
    url = f"http://127.0.0.1:{_closed_port()}" if mode == "refused" else _Bad(mode).url
    with BackgroundServer(create_proxy_app(url, upstream_api_key=KEY, timeout_s=1.5)) as srv:
        started = time.monotonic()
        for question in (PLAIN, TWO_HOP):  # passed through, and decomposed
            response = chat(srv, question)
            assert response.status_code == status
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
            assert KEY not in response.text
        assert time.monotonic() - started < 10


def test_a_stream_cut_short_ends_with_an_error_event():
    with BackgroundServer(create_proxy_app(_Bad("cut").url, timeout_s=5)) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": PLAIN}], "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and "upstream_stream_cut" in lines[-2]


def test_the_client_object_answers_like_the_endpoint(upstream, proxy):
    client = UpstreamDecomposer(upstream.url + "/v1", api_key=KEY, fmt=FMT)
    text, report = client.answer([{"role": "user", "content": TWO_HOP}], max_tokens=6)
    assert report["patched"] and text == chat(proxy, TWO_HOP).json()["choices"][0]["message"]["content"]
    client.close()


def test_serve_upstream_with_no_screen_loads_no_model_and_answers_502_for_a_dead_upstream():
    import os
    import subprocess
    import sys

    port = _closed_port()
    env = dict(os.environ, UPSTREAM_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "autopatch", "serve", "--upstream", f"http://127.0.0.1:{_closed_port()}",
                             "--port", str(port), "--timeout", "2", "--log-level", "warning", "--no-screen"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": TWO_HOP}]})
        assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unreachable"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert KEY not in output and "Loading weights" not in output


class _Screen:
    """A stand-in for server.screening.LocalScreen: passes the requests whose text contains ``passes``."""

    name = "stub"

    def __init__(self, passes: str):
        self.passes, self.seen = passes, []
        self.screen = type("Gate", (), {"threshold": 0.5})()

    def verdict(self, messages):
        self.seen.append(messages[-1]["content"])
        return (0.9, True) if self.passes in messages[-1]["content"] else (0.1, False)


def test_a_located_request_the_screen_turns_away_is_passed_through_unchanged(upstream):
    other = "What is the capital of the country where the Eiffel Tower is located?"  # located; the stub turns it away
    screen = _Screen(passes="Colosseum")
    with BackgroundServer(create_proxy_app(upstream.url, upstream_api_key=KEY, timeout_s=60, fmt=FMT,
                                           screen=screen)) as proxied:
        turned = chat(proxied, other).json()
        direct = httpx.post(upstream.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                            timeout=120, json={"messages": [{"role": "user", "content": other}], "max_tokens": 6,
                                               "temperature": 0}).json()
        assert turned["choices"][0]["message"] == direct["choices"][0]["message"]
        assert turned.get("autopatch") == direct.get("autopatch")  # the upstream's own body, no proxy report
        passed = chat(proxied, TWO_HOP).json()
        assert passed["autopatch"]["patched"] and passed["autopatch"]["screen_passed"] is True
        assert passed["autopatch"]["screen_score"] == 0.9
        chat(proxied, PLAIN)  # not located: the screen is not even asked
    assert screen.seen == [other, TWO_HOP]
    client = UpstreamDecomposer(upstream.url, api_key=KEY, fmt=FMT, screen=_Screen(passes="Colosseum"))
    text, report = client.answer([{"role": "user", "content": other}], max_tokens=6)
    assert report["patched"] is False and report["screen_passed"] is False and "screen (stub)" in report["reason"]


def test_the_local_screen_scores_a_request_on_its_model_s_prefill(model_and_tok):
    import numpy as np

    from classifiers.features import FeatureSpec, extract_prompt_features
    from classifiers.gate import PatchGate, model_fingerprint
    from server.screening import LocalScreen

    model, tok = model_and_tok
    spec = FeatureSpec(layers=(1,), positions=("last",), use_states=True, use_scalars=True)
    width = spec.width(model.config.hidden_size)
    rng = np.random.default_rng(0)
    arrays = {"scaler_mean": np.zeros(width), "scaler_scale": np.ones(width), "pca_mean": np.zeros(width),
              "pca_components": np.eye(width)[:4], "coef": rng.normal(size=4), "intercept": np.zeros(1)}
    profile = PatchProfile(source_layer=1, target_layer=1, prompt_format=FMT)
    gate = PatchGate(arrays, 0.5, spec, profile, model_fingerprint(model), {"kind": "screen"})
    screen = LocalScreen(model, tok, gate, profile, "tiny")
    messages = [{"role": "user", "content": TWO_HOP}]
    score, passed = screen.verdict(messages)
    from autopatch.prompts import render_chat

    prompt = render_chat(messages, tok, FMT)
    expected = float(gate.scores(extract_prompt_features(model, tok, [prompt.text], [prompt.question], spec,
                                                         profile=profile)[0])[0])
    assert score == pytest.approx(expected) and passed == (expected >= 0.5)
