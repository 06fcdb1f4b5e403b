"""Schema-driven fuzzing with schemathesis: requests generated from the app's own OpenAPI schema never get a 5xx.

Both bodies that fit the schema and bodies that break it are generated, and the
ASGI app is called in-process (its lifespan runs around each call, so this also
exercises stopping and restarting the generation worker).
"""

from __future__ import annotations

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.test_server_fuzz import tiny_app


@pytest.fixture(scope="module")
def app_schema():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_server.py: one thread is far faster for tiny models here
    app = tiny_app()
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    loaded.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                                    max_examples=30, deterministic=True, database="none")
    yield loaded
    app.state.served.worker.close()
    torch.set_num_threads(before)


schema = schemathesis.pytest.from_fixture("app_schema")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzz_never_gets_a_server_error(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
