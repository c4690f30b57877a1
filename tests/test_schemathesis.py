"""Property tests of the HTTP API against its own OpenAPI schema (schemathesis, in process over ASGI).

A bounded, derandomized run: every endpoint gets a few dozen generated requests, valid and not, and no answer
may be a 5xx or break the schema the server publishes. A tiny llama is served under the alias ``tiny`` and a
share of the generated bodies name it, so the inference endpoints run a model, not only validation.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serverutil import HANG_S
from test_models import app_with

TINY = "tiny"
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance]


@pytest.fixture(scope="module")
def api_app(tiny_models):
    app = app_with(aliases={TINY: str(tiny_models["llama"])}, max_models=2)
    yield app


@pytest.fixture(scope="module")
def api_schema(api_app):
    return schemathesis.openapi.from_asgi("/schema/openapi.json", api_app)


_turn = itertools.count()


def aim_at_tiny(case) -> None:
    """Every other body that names a model names the tiny one (a made-up id only ever tests the 404 path)."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and next(_turn) % 2 == 0:
        case.body["model"] = TINY
    if case.path_parameters and "model_id" in case.path_parameters and next(_turn) % 4 == 0:
        case.path_parameters["model_id"] = TINY


def test_api_conforms_to_its_schema(api_schema):
    """Each operation in turn (schemathesis' pytest plugin does not run on this pytest), failures gathered."""
    failures = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 10
    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing to make invalid: no body, and a path parameter may be any string

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=20 if mode is GenerationMode.POSITIVE else 10,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            aim_at_tiny(case)
            case.call_and_validate(checks=CHECKS, timeout=HANG_S)  # schemathesis' 10 s would be a speed claim

        try:
            run()
        except Exception as exc:
            failures[f"{operation.label} ({mode.value})"] = exc
    assert not failures, "\n\n".join(f"{label}: {exc}" for label, exc in failures.items())


@pytest.mark.parametrize("api_key", [None, "secret"])
def test_every_operation_documents_its_problems(api_key):
    """Every operation lists 500 and 503; one with a body the body's problems and the model's; 401 with a key."""
    from litestar.testing import TestClient

    app = app_with(api_key=api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with TestClient(app) as client:
        doc = client.get("/schema/openapi.json", headers=headers).json()
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            codes = {int(c) for c in op["responses"] if c.isdigit()}
            assert {500, 503} <= codes, (method, path)
            assert (401 in codes) == bool(api_key), (method, path)
            if "requestBody" in op:
                # OpenAI's statuses on its endpoints: a bad field or a too-large body is a 400 there.
                openai = path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
                assert ({400, 404, 429} if openai else {400, 404, 413, 422, 429, 507}) <= codes, (method, path)
                assert not (openai and codes & {413, 415, 422, 424, 507}), (method, path)
            for code in codes - {200, 201, 204}:
                content = op["responses"][str(code)]["content"]
                assert list(content) == ["application/problem+json"], (method, path, code)
