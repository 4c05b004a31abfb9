"""API fuzzing: schemathesis generates requests from the gateway's own OpenAPI schema.

Each documented operation gets up to 150 generated requests (valid and
invalid bodies, headers), sent over a real socket to a gateway in front of the
well-behaved fakes, so no upstream failure can explain a 5xx. Every response
must be a non-5xx whose status and body the schema documents.
"""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import pytest

# schemathesis is a test dependency; skip rather than fail collection where it is not installed.
pytest.importorskip("schemathesis")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from classifiers.heuristic import HeuristicScorer  # noqa: E402
from router.app import create_app  # noqa: E402
from router.config import Config  # noqa: E402
from tests.conftest import GatewayFactory, Upstreams, base_config  # noqa: E402

MAX_EXAMPLES = 150


def _operations() -> list[tuple[str, str]]:
    # Collected from the app itself (no server needed), so a new route is fuzzed automatically.
    urls = dict.fromkeys(("small", "large", "teacher"), "http://127.0.0.1:9")
    app = create_app(Config.model_validate(base_config(urls)), scorer=HeuristicScorer())
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]
    return [(path, method.upper()) for path, methods in paths.items() for method in methods]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolves(doc: dict[str, Any], ref: str) -> bool:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_route_is_fuzzed() -> None:
    assert {("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET")} <= set(
        _operations()
    )


def test_served_schema_refs_resolve(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        doc = httpx.get(gw.url + "/openapi.json").json()
    assert [r for r in _refs(doc) if not _resolves(doc, r)] == []


def test_schema_rejects_empty_prompt_list_as_the_gateway_does(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        resp = httpx.post(gw.url + "/v1/completions", json={"model": "auto", "prompt": []})
        doc = httpx.get(gw.url + "/openapi.json").json()
    assert resp.status_code == 400
    prompt = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"
    ]["prompt"]
    array = next(branch for branch in prompt["anyOf"] if branch.get("type") == "array")
    assert array.get("minItems") == 1


def test_schema_bounds_max_tokens_as_the_gateway_does(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    body = (
        b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
        + b"9" * 30
        + b"}"
    )
    with make_gateway(base_config(upstreams.urls)) as gw:
        resp = httpx.post(
            gw.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        doc = httpx.get(gw.url + "/openapi.json").json()
    assert resp.status_code == 400
    max_tokens = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["properties"]["max_tokens"]
    assert any("maximum" in branch for branch in max_tokens["anyOf"])


@pytest.mark.parametrize(("path", "method"), _operations())
def test_operation_conforms_and_never_fails_server_side(
    path: str, method: str, upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        doc = httpx.get(gw.url + "/openapi.json").json()
        operation = schemathesis.openapi.from_dict(doc)[path][method]
        calls = 0

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case[Any]) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=gw.url, timeout=30)

        check()
    assert calls > 0
