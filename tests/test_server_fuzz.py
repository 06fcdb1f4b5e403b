"""Property-based fuzzing of a real uvicorn server on loopback: no body, valid or not, may produce a 5xx.

hypothesis throws arbitrary JSON, near-miss chat requests and random bytes at
``POST /v1/chat/completions``; ``tests/test_server_schemas.py`` fuzzes from the
OpenAPI schema with schemathesis.
"""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from server import create_app
from server.runner import BackgroundServer
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

MODEL = "tiny-fuzz"
PROFILE = PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs a tiny model (see conftest.one_torch_thread)."""


def tiny_app():
    """A tiny-model app with small token limits, so that valid fuzzed requests stay cheap."""
    return create_app(tiny_model_for_bytes("llama"), byte_tokenizer(), model_name=MODEL, profile=PROFILE,
                      default_max_tokens=4, max_tokens_cap=16)


@pytest.fixture(scope="module")
def live(one_torch_thread):
    with BackgroundServer(tiny_app()) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        yield http


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
ANY = st.sampled_from([None, True, 0, -1, 1, 3, 2**70, 0.5, 2.5, "", "x", "ten", [], {}, [1], {"a": 1}])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 1]),
                                 "content": st.text(max_size=30) | ANY})
AUTOPATCH = st.fixed_dictionaries({}, optional={
    "enabled": ANY, "strategy": st.sampled_from(["reroute", "backpatch", "verbalize", "x"]), "threshold": ANY})
OPTIONAL = {k: ANY | JSON for k in ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                                     "seed", "n", "stream", "stream_options")}
NEAR_MISS = st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3) | ANY},
                                  optional={**OPTIONAL, "autopatch": AUTOPATCH | ANY})

@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(body=JSON | NEAR_MISS)
def test_random_json_bodies_never_get_a_server_error(live, body):
    resp = live.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(raw=st.binary(max_size=64))
def test_random_bytes_never_get_a_server_error(live, raw):
    resp = live.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code < 500, resp.text
