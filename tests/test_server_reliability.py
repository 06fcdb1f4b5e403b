"""The server under clients that leave, stall or send too much, and deadlines that must bind inside a forward pass.

Every test runs a real uvicorn on loopback with a tiny model. Where a test needs
the worker to be busy at a known point it blocks it (a gate waiting for
permits, a hook waiting for an event) instead of relying on timing.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from autopatch.architectures import decoder_layers
from autopatch.patcher import AutoPatcher
from server import create_app
from server.errors import ApiError
from server.jobs import GenerationJob
from server.runner import BackgroundServer
from server.worker import GenerationWorker
from tests.test_server import MODEL, PROFILE, TWO_HOP, ask
from tests.test_server_batching import PermitGate, open_request, wait_for
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs a tiny model (see conftest.one_torch_thread)."""


@pytest.fixture
def server_log(caplog):
    caplog.set_level(logging.INFO, logger="autopatch.server")
    return lambda text: any(text in r.getMessage() for r in caplog.records)


def counting_lm_head(model) -> list[int]:
    """A list that grows by one per forward pass through the model's LM head (each decoding step)."""
    steps: list[int] = []
    model.lm_head.register_forward_hook(lambda *args: steps.append(1))
    return steps


def client_of(srv: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---- clients that leave ------------------------------------------------------------------------


@contextmanager
def _held_request(body: dict):
    """A server whose gate holds the first request right after its prefill: ``(srv, gate, sock, steps)``."""
    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    gate = PermitGate()
    steps = counting_lm_head(model)
    with BackgroundServer(create_app(model, tok, model_name=MODEL, profile=PROFILE, gate=gate)) as srv:
        gate.hold_from_now()
        sock = open_request(srv, {"model": MODEL, "messages": [{"role": "user", "content": TWO_HOP}],
                                  "max_tokens": 50, **body})
        assert gate.entries.acquire(timeout=20)  # generating: the gate runs right after the prefill
        yield srv, gate, sock, steps


def test_a_client_that_disconnects_cancels_its_non_streamed_request(server_log):
    with _held_request({"autopatch": {"enabled": True}}) as (srv, gate, sock, steps):
        sock.close()
        wait_for(lambda: server_log("disconnected before its answer was ready"))
        wait_for(lambda: server_log("-> 499"))  # the request log has its line
        steps.clear()
        gate.let_go()
        resp = ask(client_of(srv), max_tokens=1, extra_body={"autopatch": {"enabled": False}})
    assert resp.choices[0].finish_reason == "length"
    assert len(steps) == 1  # only the next request's step: the cancelled one (50 tokens) decoded nothing more


def test_a_dropped_stream_leaves_a_request_log_line_and_stops(server_log):
    with _held_request({"stream": True}) as (srv, gate, sock, steps):
        assert b"data: " in sock.recv(4096)  # the first frame (the role) is out
        sock.close()
        wait_for(lambda: server_log("dropped: the client disconnected"))
        steps.clear()
        gate.let_go()
        ask(client_of(srv), max_tokens=1, extra_body={"autopatch": {"enabled": False}})
    assert len(steps) == 1


def test_health_answers_while_a_huge_body_is_tokenized():
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE)
    served = app.state.served
    entered, release = threading.Event(), threading.Event()

    class SlowTokenizer:
        """The app's tokenizer, holding on to huge texts until released (as if they took that long)."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kwargs):
            if len(text) > 100_000:
                entered.set()
                release.wait(30)
            return self.inner(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    served.tokenizer = SlowTokenizer(served.tokenizer)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200_000}], "max_tokens": 2}
    with BackgroundServer(app) as srv, ThreadPoolExecutor(1) as pool:
        try:
            huge = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert entered.wait(20)
            health = httpx.get(srv.url + "/health", timeout=10)  # would time out if tokenizing blocked the loop
        finally:
            release.set()
        assert health.status_code == 200
        refused = huge.result()
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


# ---- requests that are refused -------------------------------------------------------------------


def test_json_errors_say_json_invalid_even_without_a_json_content_type():
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    with BackgroundServer(create_app(model, tok, model_name=MODEL, profile=PROFILE)) as srv:
        url = srv.url + "/v1/chat/completions"
        typed = httpx.post(url, content="{not json", headers={"content-type": "application/json"})
        untyped = httpx.post(url, content="{not json", headers={"content-type": "application/x-www-form-urlencoded"})
        valid_but_untyped = httpx.post(url, content='{"messages": []}', headers={"content-type": "text/plain"})
    for resp in (typed, untyped):
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "json_invalid"
    assert "Content-Type: application/json" in valid_but_untyped.json()["error"]["message"]


def test_prompts_over_max_prompt_tokens_get_400():
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, max_prompt_tokens=20)
    with BackgroundServer(app) as srv:
        client = client_of(srv)
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, TWO_HOP, max_tokens=2)
        assert ask(client, "Hi", max_tokens=2).choices  # "Q: Hi\nA:" is under 20 tokens
    error = err.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "--max-prompt-tokens" in error["message"]


# ---- slow and idle connections --------------------------------------------------------------------


def test_a_stalled_body_gets_408_and_idle_keep_alive_connections_are_closed():
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, body_timeout_s=0.5)
    with BackgroundServer(app, timeout_keep_alive=1) as srv:
        stalled = socket.create_connection((srv.host, srv.port), timeout=20)
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"messages\"")
        assert stalled.recv(4096).startswith(b"HTTP/1.1 408")
        idle = socket.create_connection((srv.host, srv.port), timeout=20)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while chunk := idle.recv(4096):  # ends when the server closes the idle connection
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        stalled.close()
        idle.close()


def test_the_cli_warns_when_binding_beyond_loopback(caplog):
    from server.cli import is_loopback, warn_if_exposed

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    with caplog.at_level(logging.WARNING, logger="autopatch.server"):
        warn_if_exposed("127.0.0.1", None)
        assert not caplog.records
        warn_if_exposed("0.0.0.0", "key")
        assert len(caplog.records) == 1 and "not loopback" in caplog.records[0].getMessage()
        warn_if_exposed("0.0.0.0", None)
        assert "without an API key" in caplog.records[-1].getMessage()


# ---- deadlines inside the forward pass --------------------------------------------------------------


def _block_layer(model, layer: int, armed: threading.Event, release: threading.Event):
    """Make decoder block ``layer`` wait for ``release`` while ``armed``, on the worker thread only."""

    def wait(module, args):
        if armed.is_set() and threading.current_thread().name == "autopatch-generate":
            release.wait(30)

    return decoder_layers(model)[layer].register_forward_pre_hook(wait)


def test_a_deadline_that_passes_during_the_prefill_frees_the_worker():
    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    armed, release = threading.Event(), threading.Event()
    _block_layer(model, 1, armed, release)
    steps = counting_lm_head(model)
    hooks_before = [len(block._forward_pre_hooks) for block in decoder_layers(model)]
    worker = GenerationWorker(model, tok)
    worker.start()
    events: list = []
    ids = tok(f"Q: {TWO_HOP}\nA:").input_ids
    job = GenerationJob(prompt_ids=ids, question=TWO_HOP, max_new_tokens=40, profile=PROFILE,
                        gate=worker_gate(model, tok), patching=True, emit=events.append,
                        deadline=time.monotonic() + 0.3)
    try:
        armed.set()
        worker.submit(job)
        wait_for(lambda: time.monotonic() > job.deadline + 0.1)  # the prefill is held in block 1 past the deadline
        release.set()
        wait_for(lambda: bool(events))
    finally:
        release.set()
        armed.clear()
    (kind, error), = events
    assert kind == "error" and error.status == 504 and not job.cancelled.is_set()  # the worker saw the deadline
    assert steps == []  # the prefill stopped in block 1: the LM head never ran
    done: list = []
    worker.submit(GenerationJob(prompt_ids=ids, question=TWO_HOP, max_new_tokens=2, profile=PROFILE,
                                gate=job.gate, patching=False, emit=done.append))
    wait_for(lambda: bool(done))
    worker.close()
    assert done[0][0] == "done" and done[0][1].completion_tokens == 2
    assert [len(block._forward_pre_hooks) for block in decoder_layers(model)] == hooks_before  # hooks removed


def worker_gate(model, tok):
    return AutoPatcher(model, tok, PROFILE).gate


def test_a_server_timeout_during_the_prefill_answers_504_and_serves_the_next_request():
    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    armed, release = threading.Event(), threading.Event()
    _block_layer(model, 1, armed, release)
    steps = counting_lm_head(model)
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, request_timeout_s=0.5)
    with BackgroundServer(app) as srv:
        client = client_of(srv)
        armed.set()
        try:
            with pytest.raises(openai.APIStatusError) as err:
                ask(client, max_tokens=40)
            steps.clear()  # still held in block 1: its LM head has not run
        finally:
            armed.clear()
            release.set()
        resp = ask(client, max_tokens=1, extra_body={"autopatch": {"enabled": False}})
    assert err.value.status_code == 504 and err.value.body["code"] == "timeout"
    assert resp.choices[0].finish_reason == "length" and len(steps) == 1  # nothing more of the timed-out prefill


def test_jobs_whose_clients_left_do_not_hold_places_in_the_queue():
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    worker = GenerationWorker(model, tok, max_queue=2)  # not started: jobs stay queued

    def queued() -> GenerationJob:
        job = GenerationJob(prompt_ids=[5], question="q", max_new_tokens=1, profile=PROFILE, gate=None,
                            patching=False, emit=lambda event: None)  # type: ignore[arg-type]
        worker.submit(job)
        return job

    first, _ = queued(), queued()
    first.cancelled.set()  # its client disconnected
    queued()  # takes the cancelled job's place
    with pytest.raises(ApiError) as full:
        queued()
    assert full.value.status == 503 and full.value.code == "queue_full" and worker.depth == 2
