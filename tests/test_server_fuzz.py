"""Property-based fuzzing of the server: no request, valid or not, may produce a 5xx.

* schemathesis generates requests from the app's own OpenAPI schema (bodies
  that fit it and bodies that break it) and calls the ASGI app in-process;
* hypothesis throws arbitrary JSON (and near-miss chat requests) at a real
  uvicorn server on loopback.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from server import create_app
from server.runner import BackgroundServer
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

MODEL = "tiny-fuzz"
PROFILE = PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))


def _app():
    torch.set_num_threads(1)  # see tests/test_server.py: tiny models run far faster on one thread here
    torch.set_grad_enabled(False)
    return create_app(tiny_model_for_bytes("llama"), byte_tokenizer(), model_name=MODEL, profile=PROFILE,
                      default_max_tokens=4, max_tokens_cap=16)


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                                max_examples=30, deterministic=True)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzz_never_gets_a_server_error(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def live():
    with BackgroundServer(_app()) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            yield http


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
ANY = st.sampled_from([None, True, 0, -1, 1, 3, 2**70, 0.5, 2.5, "", "x", "ten", [], {}, [1], {"a": 1}])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 1]),
                                 "content": st.text(max_size=30) | ANY})
NEAR_MISS = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=3) | ANY},
    optional={k: ANY | JSON for k in ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                                       "seed", "n", "stream", "stream_options", "autopatch")}
    | {"autopatch": st.fixed_dictionaries({}, optional={"enabled": ANY, "strategy": st.sampled_from(
        ["reroute", "backpatch", "verbalize", "x"]), "threshold": ANY})}})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=JSON | NEAR_MISS)
def test_random_json_bodies_never_get_a_server_error(live, body):
    resp = live.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=64))
def test_random_bytes_never_get_a_server_error(live, raw):
    resp = live.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400 or (resp.status_code == 200 and json.loads(raw)), resp.text
