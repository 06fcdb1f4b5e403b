"""Micro-batching in the server: batched answers equal one-at-a-time answers, row by row.

A gate that waits for permits (:class:`PermitGate`) holds the worker, so the
test decides what is queued when a batch forms instead of relying on timing.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from autopatch.errors import ConfigError
from autopatch.gating import GateDecision
from autopatch.patcher import AutoPatcher
from server import create_app
from server.batching import RowHalt, compatible, confirmed_ids, left_padded, run_batch
from server.jobs import GenerationJob
from server.runner import BackgroundServer
from server.worker import BatchWindow, GenerationWorker
from tests.test_server import FMT, MODEL, PROFILE, TWO_HOP, ask
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

IPHONE = "Who founded the company that makes the iPhone?"
FILM = "Who directed the film that won the award?"
EIFFEL = "What is the capital of the country where the Eiffel Tower is located?"  # the request that gets cancelled


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs a tiny model (see conftest.one_torch_thread)."""


class PermitGate:
    """Patches every located row; while ``hold`` is set, each ``decide`` call waits for a permit."""

    feature_layers: tuple[int, ...] = ()
    threshold = 0.5

    def __init__(self) -> None:
        self.hold = False
        self.permits, self.entries = threading.Semaphore(0), threading.Semaphore(0)

    def decide(self, inputs):
        self.entries.release()
        if self.hold and not self.permits.acquire(timeout=30):
            raise RuntimeError("the test never released the permit gate")
        return [GateDecision(True, 0.5, "permit gate") for _ in inputs]

    def hold_from_now(self) -> None:
        """From now on each ``decide`` waits for a permit; permits and entries of earlier calls are forgotten."""
        self.hold = True
        for semaphore in (self.permits, self.entries):
            while semaphore.acquire(blocking=False):
                pass

    def let_go(self) -> None:
        self.hold = False
        self.permits.release(1000)


def wait_for(condition, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; a guard against hanging, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def open_request(srv: BackgroundServer, body: dict) -> socket.socket:
    """Send a chat request on a raw socket and leave the connection open (close it to disconnect)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((srv.host, srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def depth(srv: BackgroundServer) -> int:
    return httpx.get(srv.url + "/health").json()["queue_depth"]


class RecordingPatcher(AutoPatcher):
    """Records each batched call: its questions and how many new tokens its output has."""

    calls: list[tuple[list[str], int]] = []

    def generate_with_reports(self, inputs=None, *args, **kwargs):
        result = super().generate_with_reports(inputs, *args, **kwargs)
        RecordingPatcher.calls.append((list(kwargs["questions"]), result.output.shape[1] - inputs.shape[1]))
        return result


def answer_of(client: openai.OpenAI, spec: dict) -> tuple:
    resp = ask(client, spec["q"], max_tokens=spec["max_tokens"], stop=spec.get("stop"),
               extra_body={"autopatch": {"enabled": spec["enabled"]}})
    choice = resp.choices[0]
    return choice.message.content, choice.finish_reason, resp.usage.completion_tokens, resp.autopatch["patched"]


def test_sixteen_mixed_concurrent_requests_equal_one_at_a_time(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="autopatch.server")
    monkeypatch.setattr("server.batching.AutoPatcher", RecordingPatcher)
    RecordingPatcher.calls = []
    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    gate = PermitGate()
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, gate=gate, max_queue=32, max_batch_size=8)
    questions = [TWO_HOP, IPHONE, FILM, "What is 2+2?"]
    specs = [{"q": questions[i % 4], "enabled": i % 3 != 2, "max_tokens": (1, 3, 8, 12, 5)[i % 5]} for i in range(15)]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        gate.let_go()
        long_answer = answer_of(client, {"q": TWO_HOP, "enabled": True, "max_tokens": 12})[0]
        specs[0] = {"q": TWO_HOP, "enabled": True, "max_tokens": 12, "stop": [long_answer[3:5]]}
        sequential = [answer_of(client, spec) for spec in specs]
        assert sequential[0][1] == "stop" and len(sequential[0][0]) < len(long_answer)  # the stop string cut it
        assert {s[3] for s in sequential} == {True, False}
        RecordingPatcher.calls.clear()

        gate.hold_from_now()
        with ThreadPoolExecutor(max_workers=16) as pool:
            blocker = pool.submit(answer_of, client, {"q": TWO_HOP, "enabled": True, "max_tokens": 2})
            assert gate.entries.acquire(timeout=20)  # the blocker holds the worker
            doomed = open_request(srv, {"model": MODEL, "messages": [{"role": "user", "content": EIFFEL}],
                                        "max_tokens": 40, "autopatch": {"enabled": True}})
            wait_for(lambda: depth(srv) == 1)  # queued first: it heads the next batch
            futures = [pool.submit(answer_of, client, spec) for spec in specs]
            wait_for(lambda: depth(srv) == 16)
            gate.permits.release()  # the blocker's batch goes on; the next batch (with the doomed request) waits
            assert gate.entries.acquire(timeout=20)
            doomed.close()
            wait_for(lambda: any("disconnected before its answer" in r.getMessage() for r in caplog.records))
            gate.let_go()
            concurrent = [f.result() for f in futures]
            assert blocker.result()[0] is not None
    assert concurrent == sequential
    sizes = [len(questions) for questions, _ in RecordingPatcher.calls]
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == 17  # the blocker, the doomed one and the 15
    doomed_batch = [(qs, new) for qs, new in RecordingPatcher.calls if EIFFEL in qs]
    assert len(doomed_batch) == 1 and len(doomed_batch[0][0]) > 1
    assert doomed_batch[0][1] <= 12  # the cancelled row (max_tokens 40) stopped; the batch ran to its mates' limit


def job(prompt: list[int], **kwargs) -> GenerationJob:
    defaults = dict(question="q", max_new_tokens=4, profile=PROFILE, gate=None, patching=True, emit=lambda e: None)
    return GenerationJob(prompt_ids=prompt, **{**defaults, **kwargs})  # type: ignore[arg-type]


def test_only_greedy_jobs_with_the_same_settings_share_a_batch_streamed_or_not():
    gate, other_gate = object(), object()
    base = job([5, 6], gate=gate)
    assert compatible(base, job([7], gate=gate, max_new_tokens=9, stop=["x"]))
    assert compatible(base, job([7], gate=gate, stream=True))
    assert not compatible(base, job([7], gate=other_gate))  # e.g. a per-request threshold copies the gate
    assert not compatible(base, job([7], gate=gate, patching=False))
    assert not compatible(base, job([7], gate=gate, sampling={"do_sample": True, "temperature": 0.7}))
    assert not compatible(base, job([7], gate=gate, profile=PROFILE.__class__(source_layer=3, target_layer=1,
                                                                          prompt_format=FMT)))


def test_row_halt_stops_rows_one_by_one_and_finds_patched_rows_by_prompt():
    tok = byte_tokenizer()
    jobs = [job([5, 6, 7], max_new_tokens=2), job([5, 6, 7], max_new_tokens=3), job([9, 8], stop=["b"]),
            job([4], max_new_tokens=5)]
    prompts, mask = left_padded(jobs, pad=0)
    assert prompts.tolist() == [[5, 6, 7], [5, 6, 7], [0, 9, 8], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]]
    halt = RowHalt(jobs, prompts, tok)
    a, b = tok("a").input_ids[0], tok("b").input_ids[0]
    step = torch.cat([prompts, torch.tensor([[a, a]] * 4)], dim=1)
    assert halt(step, None).tolist() == [True, False, False, False]  # row 0 reached its 2 tokens
    step = torch.cat([prompts, torch.tensor([[a, a, a], [a, a, a], [a, a, b], [a, a, a]])], dim=1)
    assert halt(step, None).tolist() == [True, True, True, False]  # row 1: 3 tokens; row 2: its stop string
    jobs[3].cancelled.set()
    patched = torch.cat([prompts[[0, 1, 3]], torch.tensor([[a], [a], [a]])], dim=1)  # a caller view of 3 rows
    assert halt.rows_of(patched) == [0, 1, 3]  # the same prompt twice: matched in order
    assert halt(patched, None).tolist() == [False, False, True]  # the patched continuation restarts the count
    assert halt.abandoned_rows == {3} and not halt.all_abandoned()


def test_a_streamed_row_sends_only_what_is_certain_to_be_its_answer():
    pad, eos = 0, {2}
    assert confirmed_ids([7], pad, eos) == []  # the first token waits: the gate may end the row there
    assert confirmed_ids([7, 0, 0], pad, eos) == []  # a row the gate patched: its one unpatched token is never sent
    assert confirmed_ids([7, 8], pad, eos) == [7]
    assert confirmed_ids([7, 8, 2, 0], pad, eos) == [7, 8]  # the last token (here EOS) waits for the end
    assert confirmed_ids([7, 2, 9, 9], pad, eos) == [7, 2]  # nothing after EOS


def stream_of(client: openai.OpenAI, spec: dict) -> tuple:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": spec["q"]}], max_tokens=spec["max_tokens"], temperature=0,
        stream=True, extra_body={"autopatch": {"enabled": spec["enabled"]}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)


def test_streamed_requests_share_a_batch_and_stream_the_answer_they_get_alone(monkeypatch):
    monkeypatch.setattr("server.batching.AutoPatcher", RecordingPatcher)
    RecordingPatcher.calls = []
    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    gate = PermitGate()
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, gate=gate, max_queue=32, max_batch_size=8)
    specs = [{"q": q, "enabled": True, "max_tokens": n} for q, n in ((TWO_HOP, 9), (IPHONE, 5), (FILM, 12))]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        gate.let_go()
        alone = [answer_of(client, spec) for spec in specs]
        vanilla = [answer_of(client, {**spec, "enabled": False}) for spec in specs]
        assert all(a[3] for a in alone) and [a[0] for a in alone] != [v[0] for v in vanilla]  # patching changes them
        RecordingPatcher.calls.clear()

        gate.hold_from_now()
        with ThreadPoolExecutor(max_workers=8) as pool:
            blocker = pool.submit(answer_of, client, {"q": TWO_HOP, "enabled": True, "max_tokens": 2})
            assert gate.entries.acquire(timeout=20)  # the blocker holds the worker
            streamed = [pool.submit(stream_of, client, spec) for spec in specs]
            plain = [pool.submit(answer_of, client, spec) for spec in specs]
            wait_for(lambda: depth(srv) == 6)
            gate.let_go()
            assert [f.result() for f in streamed] == [a[:2] for a in alone]
            assert [f.result() for f in plain] == alone
            assert blocker.result()[0] is not None
    sizes = sorted(len(questions) for questions, _ in RecordingPatcher.calls)
    assert sizes == [1, 6]  # the blocker, then the three streams and their three non-streamed twins together


def test_a_streamed_row_sees_only_its_new_tokens_so_a_stop_string_inside_the_prompt_does_not_stop_it():
    tok = byte_tokenizer()
    deltas: list[str] = []
    streamed = job(tok("Q: x\nA:").input_ids, stop=["A:"], stream=True, max_new_tokens=8,
                   emit=lambda event: deltas.append(event[1]))
    prompts, _ = left_padded([streamed], pad=0)
    halt = RowHalt([streamed], prompts, tok, pad=0, eos=set())
    answer = tok(" Rome").input_ids
    for k in range(1, len(answer) + 1):
        assert halt(torch.cat([prompts, torch.tensor([answer[:k]])], dim=1), None).tolist() == [False]
    halt.finish(0, answer)
    assert not halt.streams[0].stopped and "".join(deltas) == " Rome"


# ---- the batch window ------------------------------------------------------------------------


def test_the_batch_window_closes_a_gap_after_the_last_join_unless_it_waits_for_the_last_batch_size():
    window = BatchWindow(gap_s=0.01, max_wait_s=0.1)
    assert window.closes_at(opened=0.0, joined=0.0, size=1, expected=1) == pytest.approx(0.01)
    assert window.closes_at(opened=0.0, joined=0.05, size=3, expected=1) == pytest.approx(0.06)  # each join extends
    assert window.closes_at(opened=0.0, joined=0.095, size=3, expected=1) == pytest.approx(0.1)  # never past the cap
    assert window.closes_at(opened=0.0, joined=0.02, size=3, expected=8) == pytest.approx(0.1)   # waits for 8
    assert window.closes_at(opened=0.0, joined=0.02, size=8, expected=8) == pytest.approx(0.03)
    assert BatchWindow(gap_s=0.2, max_wait_s=0.1).closes_at(opened=0.0, joined=0.0, size=1, expected=4) == 0.2
    assert window.expected(8, last_ended=5.0, now=5.5) == 8 and window.expected(8, last_ended=5.0, now=6.5) == 1
    with pytest.raises(ConfigError):
        BatchWindow(gap_s=-1)


@pytest.mark.parametrize("last_size, batched", [(0, 1), (3, 3)])
def test_the_worker_holds_a_batch_for_the_clients_of_the_last_one(last_size, batched):
    """Two jobs arrive 0.3 s after the first, far past the 10 ms gap: they join only when the batch that just
    ended had 3 jobs (its clients are expected back); with no recent batch the first job runs alone."""
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    worker = GenerationWorker(model, tok, window=BatchWindow(gap_s=0.01, max_wait_s=5.0))  # not started
    if last_size:
        worker._last = (last_size, time.monotonic())
    gate = object()
    worker.submit(job([5], gate=gate))
    late = threading.Timer(0.3, lambda: [worker.submit(job([6], gate=gate)) for _ in range(2)])
    late.start()
    try:
        assert len(worker._next_batch() or []) == batched
    finally:
        late.join()
    assert worker.depth == 3 - batched


def test_the_worker_holds_a_batch_for_a_job_still_being_prepared():
    """A request accepted but still being prepared (tokenized) counts as on its way: the batch holds for it past
    the 10 ms gap (within max_wait_s) even with no batch before it."""
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    worker = GenerationWorker(model, tok, window=BatchWindow(gap_s=0.01, max_wait_s=5.0))  # not started
    gate = object()
    worker.submit(job([5], gate=gate))
    started = threading.Event()

    def prepare_slowly() -> None:
        with worker.preparing():
            started.set()
            time.sleep(0.3)
            worker.submit(job([6], gate=gate))

    preparer = threading.Thread(target=prepare_slowly)
    preparer.start()
    assert started.wait(10)
    try:
        assert len(worker._next_batch() or []) == 2
    finally:
        preparer.join()
    assert worker.depth == 0 and worker._preparing == 0


# ---- rows answered before their batch ends -----------------------------------------------------


def test_a_row_the_gate_leaves_alone_is_answered_before_its_batch_mates_are_patched():
    """An ordinary request batched with a two-hop one gets its answer when the unpatched generation ends, not
    after the two-hop row's patched generation; it is the answer the request gets alone, and it comes once."""
    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    forwards: list[int] = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    log: list[tuple[int, tuple, int]] = []  # (job index, event, forward passes so far)
    gate = PermitGate()  # patches every located row: the two-hop one; "Name a colour." is not located

    def make(question: str, index: int, stream: bool = False) -> GenerationJob:
        return job(tok(FMT.render(question)).input_ids, question=question, max_new_tokens=6, gate=gate,
                   stream=stream, emit=lambda event: log.append((index, event, len(forwards))))

    assert run_batch(model, tok, [make("Name a colour.", 9)]) == [None]  # answered early, even alone
    ((kind, alone),) = [event for index, event, _ in log if index == 9]
    assert kind == "done" and not alone.report["patched"]
    for stream in (False, True):
        log.clear()
        jobs = [make(TWO_HOP, 0), make("Name a colour.", 1, stream=stream)]
        events = run_batch(model, tok, jobs)
        (event, at), = [(event, at) for index, event, at in log if index == 1 and event[0] == "done"]
        assert event[1] == alone and at < len(forwards)  # the patched row's own forward passes ran after it
        assert events[1] is None and jobs[1].answered and not jobs[0].answered
        assert events[0] is not None and events[0][0] == "done" and events[0][1].report["patched"]
        if stream:
            assert "".join(e[1] for i, e, _ in log if i == 1 and e[0] == "delta") == alone.text


def test_a_batch_that_fails_after_answering_a_row_retries_only_the_others(monkeypatch):
    import autopatch.patcher as patcher_module

    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    log: list[tuple[int, str]] = []
    gate = PermitGate()

    def make(question: str, index: int) -> GenerationJob:
        return job(tok(FMT.render(question)).input_ids, question=question, max_new_tokens=4, gate=gate,
                   emit=lambda event: log.append((index, event[0])))

    def broken(*args, **kwargs):
        raise RuntimeError("a patched stage failed")

    monkeypatch.setattr(patcher_module, "targets_for", broken)
    worker = GenerationWorker(model, tok)  # not started: _run is called directly
    worker._run([make(TWO_HOP, 0), make("Name a colour.", 1)])
    assert sorted(log) == [(0, "error"), (1, "done")]  # the answered row once; the failing one retried, then 500


@pytest.mark.parametrize("stream", [False, True])
def test_over_http_an_ordinary_request_is_answered_while_its_two_hop_batch_mate_is_still_being_patched(
        monkeypatch, stream):
    """The two-hop row is held just before its first hop (``targets_for``) until the ordinary answer has reached
    its client: without early answers the ordinary request would wait for the held row and the test would time out."""
    import autopatch.patcher as patcher_module

    release, original = threading.Event(), patcher_module.targets_for

    def held(*args, **kwargs):
        assert release.wait(60), "the test never released the two-hop row"
        return original(*args, **kwargs)

    monkeypatch.setattr(patcher_module, "targets_for", held)
    model, tok = tiny_model_for_bytes("llama", seed=1), byte_tokenizer()
    app = create_app(model, tok, model_name=MODEL, profile=PROFILE, gate=PermitGate(), max_batch_size=8,
                     batch_window_s=2.0)  # both requests surely share one batch
    try:
        with BackgroundServer(app) as srv, ThreadPoolExecutor(2) as pool:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)

            def ordinary() -> tuple[str, bool]:
                if stream:
                    chunks = list(ask(client, "Name a colour.", stream=True))
                    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), False
                resp = ask(client, "Name a colour.")
                return resp.choices[0].message.content or "", bool(resp.autopatch["patched"])

            two_hop = pool.submit(ask, client, TWO_HOP)
            text, patched = pool.submit(ordinary).result(timeout=60)  # while the two-hop row is held
            assert not two_hop.done() and not patched
            release.set()
            assert two_hop.result(timeout=60).autopatch["patched"]
            assert app.state.served.worker.batch_sizes == {2: 1}
            assert ask(client, "Name a colour.").choices[0].message.content == text  # its answer alone
    finally:
        release.set()
