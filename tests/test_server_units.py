"""Server parts without a model: prompt building, the answer streamer, gate thresholds, ``autopatch serve``, the
background runner."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from autopatch.prompts import PromptFormat
from server.app import gate_with_threshold
from server.batching import AnswerStream
from server.errors import ApiError
from server.prompting import build_prompt
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

Q = "What is the capital of the country where the Colosseum is located?"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# ---- prompts --------------------------------------------------------------------------------


def test_fallback_single_turn_is_exactly_the_patcher_format():
    fmt = PromptFormat()
    prompt = build_prompt([user(f"  {Q}\n")], byte_tokenizer(), fmt)
    assert prompt.text == fmt.render(Q) and prompt.question == Q
    assert prompt.template == "fewshot-qa" and prompt.add_special_tokens


def test_fallback_keeps_system_text_and_earlier_turns_as_qa_pairs():
    fmt = PromptFormat(demonstrations=(("Demo?", "Yes"),))
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "developer", "content": "No lists."},
                user("First?"), {"role": "assistant", "content": "One"}, user("Unanswered?"),
                {"role": "assistant", "content": "Two"}, {"role": "assistant", "content": "Extra"}, user(Q)]
    prompt = build_prompt(messages, byte_tokenizer(), fmt)
    assert prompt.text == ("Answer briefly.\n\nNo lists.\n\n"
                           "Q: Demo?\nA: Yes\n\nQ: First?\nA: One\n\nQ: Unanswered?\nA: Two\n\nQ: \nA: Extra\n\n"
                           f"Q: {Q}\nA:")
    two_users = build_prompt([user("Earlier"), user(Q)], byte_tokenizer(), PromptFormat(demonstrations=()))
    assert two_users.text == f"Q: Earlier\nA: \n\nQ: {Q}\nA:"


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = build_prompt([{"role": "developer", "content": "Be brief."}, user(Q)], tok, PromptFormat())
    assert prompt.text == f"<system>Be brief.\n<user>{Q}\n<assistant>"
    assert prompt.template == "chat-template" and not prompt.add_special_tokens and prompt.question == Q


def test_template_errors_and_a_final_assistant_turn_are_400s():
    tok = byte_tokenizer()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ApiError, match="roles must alternate") as err:
        build_prompt([user(Q)], tok, PromptFormat())
    assert err.value.status == 400
    with pytest.raises(ApiError, match="last message") as err:
        build_prompt([user(Q), {"role": "assistant", "content": "Rome"}], byte_tokenizer(), PromptFormat())
    assert err.value.param == "messages"


# ---- the answer streamer --------------------------------------------------------------------


def feed(text: str, stop=()) -> tuple[AnswerStream, list[str]]:
    """The answer's tokens given one more at a time, as a batch row grows (the prompt is never given)."""
    tok = byte_tokenizer()
    deltas: list[str] = []
    stream = AnswerStream(tok, stop, on_delta=deltas.append)
    ids = tok(text).input_ids
    for k in range(1, len(ids) + 1):
        if stream.stopped:
            break
        stream.advance(ids[:k])
    stream.finish()
    return stream, deltas


def test_stream_without_stop_emits_everything_once():
    stream, deltas = feed(" Rome, Italy")
    assert "".join(deltas) == stream.finish() == " Rome, Italy" and len(deltas) == len(" Rome, Italy")


def test_stream_cuts_at_a_stop_string_and_holds_back_partial_matches():
    stream, deltas = feed(" Rome\n\nQ: next", stop=["\n\nQ:"])
    assert stream.stopped and stream.finish() == " Rome" and "".join(deltas) == " Rome"
    assert len(stream.ids) == len(" Rome\n\nQ:")  # generation stopped right after the stop string
    stream, deltas = feed(" Rome\nParis", stop=["\n\nQ:"])  # a partial match that fails is released
    assert not stream.stopped and "".join(deltas) == " Rome\nParis"


def test_stream_never_emits_half_a_character():
    _, deltas = feed(" Zürich ✓")
    assert "".join(deltas) == " Zürich ✓" and not any("\ufffd" in d for d in deltas)


# ---- gate thresholds ------------------------------------------------------------------------


@dataclass
class DataclassGate:
    threshold: float
    feature_layers: tuple = ()


class PlainGate:
    feature_layers: tuple = ()

    def __init__(self):
        self.threshold = 0.5


def test_threshold_override_copies_a_gate_that_declares_with_threshold():
    from dataclasses import replace

    class Declared(DataclassGate):
        def with_threshold(self, threshold: float):
            return replace(self, threshold=threshold)

    gate = Declared(0.5)
    other = gate_with_threshold(gate, 0.8)
    assert other.threshold == 0.8 and gate.threshold == 0.5 and type(other) is Declared


@pytest.mark.parametrize("gate", [DataclassGate(0.5), PlainGate()])
def test_a_threshold_attribute_alone_is_not_taken_for_an_override(gate):
    from server.errors import ApiError

    with pytest.raises(ApiError, match=f"\\({type(gate).__name__}\\) has no threshold"):
        gate_with_threshold(gate, 0.8)


# ---- autopatch serve ------------------------------------------------------------------------


def test_serve_subcommand_loads_once_and_runs_uvicorn(monkeypatch):
    import uvicorn

    import autopatch.loading
    from autopatch.cli import build_parser

    loads, runs = [], []
    monkeypatch.setattr(autopatch.loading, "load_model",
                        lambda name=None, quantize=None, batch_invariant=False: loads.append((name, quantize, batch_invariant))
                        or (tiny_model_for_bytes("llama"), byte_tokenizer()))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    args = build_parser().parse_args(["serve", "--model", "/models/tiny", "--quantize", "int8", "--port", "9123", "--max-queue", "3",
                                      "--timeout", "5", "--no-patching", "--max-batch-size", "4",
                                      "--batch-window-ms", "20", "--max-batch-wait-ms", "250", "--max-prompt-tokens", "0", "--batch-invariant"])
    assert args.run(args) == 0
    (app, kwargs), = runs
    served = app.state.served
    assert loads == [("/models/tiny", "int8", True)] and served.name == "/models/tiny"
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 9123)
    assert served.worker.max_queue == 3 and served.request_timeout_s == 5 and not served.patching_default
    assert (served.worker.max_batch_size, served.max_prompt_tokens) == (4, None)
    assert (served.worker.window.gap_s, served.worker.window.max_wait_s) == (0.02, 0.25)
    assert (kwargs["timeout_keep_alive"], kwargs["limit_concurrency"]) == (5.0, 256)
    assert type(served.base.gate).__name__ == "AlwaysPatch"
    served.worker.close()


def test_fallback_template_stops_at_the_next_few_shot_turn():
    from autopatch.prompts import FEWSHOT_STOP_STRINGS, PromptFormat
    from server.prompting import build_prompt

    class NoTemplate:
        chat_template = None

    prompt = build_prompt([{"role": "user", "content": "What is the capital of France?"}], NoTemplate(), PromptFormat())
    assert prompt.stop == FEWSHOT_STOP_STRINGS == PromptFormat().stop_strings
    assert PromptFormat(kind="chat").stop_strings == ()


# ---- the background runner -----------------------------------------------------------------


async def _ok_app(scope, receive, send):
    """An ASGI app that answers every HTTP request "ok"."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _nodelay_flags(server, port: int) -> list[int]:
    """Two requests on one keep-alive connection to ``server`` (a started ``uvicorn.Server``) on ``port``, each
    answered "ok"; then each accepted connection's TCP_NODELAY, read while the connection is still open."""
    import http.client
    import socket

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(2):
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"ok"
        return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for c in server.server_state.connections]
    finally:
        conn.close()


def test_background_server_connections_send_without_nagle():
    """Each accepted connection has TCP_NODELAY, as under ``uvicorn.run``: with Nagle on, a response's body waited
    for the client's delayed ACK of its headers (40 ms on every request after a connection's first)."""
    from server.runner import BackgroundServer

    with BackgroundServer(_ok_app) as srv:
        flags = _nodelay_flags(srv.server, srv.port)
    assert flags and all(flags)


def test_uvicorn_run_s_own_socket_has_nagle_off_as_autopatch_serve_binds_it():
    """``autopatch serve`` lets uvicorn bind host and port itself (``uvicorn.run``): its connections get TCP_NODELAY
    from asyncio, so it never had the runner's 40 ms."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(_ok_app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        flags = _nodelay_flags(server, server.servers[0].sockets[0].getsockname()[1])
        assert flags and all(flags)
    finally:
        server.should_exit = True
        thread.join(30)
