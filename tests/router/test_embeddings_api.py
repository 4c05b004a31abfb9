"""End to end: embeddings (`POST /v1/embeddings`) through the gateway, with the official `openai` SDK.

Embeddings go to the configured embedding model without scoring (routing reason
`unscored`); they are metered like any answer, and their teacher-equivalent cost is
their own cost, since there is no teacher to save against.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import serving
from tests.router.test_responses_api import sdk

EMBEDDER = "embedder"


def embedding_config(urls: dict[str, str]) -> dict[str, Any]:
    """The three chat models plus an embedding model, served by the "large" fake."""
    raw = base_config(urls)
    raw["models"].append(
        {
            "name": EMBEDDER,
            "role": "embedding",
            "endpoints": [urls["large"] + "/v1"],
            "upstream_model": "up-embed",
            "price": {"input_per_mtok": 0.02},
        }
    )
    return raw


@pytest.fixture(scope="module")
def triage_serve(_upstream_servers: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `triage serve` process for the module, in front of the session's fake upstreams."""
    with serving(embedding_config(_upstream_servers.urls), tmp_path_factory.mktemp("embeddings")) as url:
        yield url


def test_auto_and_named_embedding_model(triage_serve: str, upstreams: Upstreams) -> None:
    with sdk(triage_serve) as client:
        raw = client.embeddings.with_raw_response.create(model="auto", input=["a b", "c"])
        got = raw.parse()
        assert raw.headers["x-triage-model"] == EMBEDDER
        assert raw.headers["x-triage-reason"] == "unscored"
        assert "x-triage-score" not in raw.headers
        assert [e.index for e in got.data] == [0, 1]
        assert [e.embedding for e in got.data] == [[0.25, -0.5, 0.0], [0.25, -0.5, 1.0]]
        assert got.model == "up-embed"
        assert (got.usage.prompt_tokens, got.usage.total_tokens) == (3, 3)
        sent = upstreams.large.requests[-1]
        assert sent["model"] == "up-embed" and sent["input"] == ["a b", "c"]

        raw = client.embeddings.with_raw_response.create(model=EMBEDDER, input="one two three four")
        named = raw.parse()
        assert raw.headers["x-triage-model"] == EMBEDDER
        assert raw.headers["x-triage-reason"] == "pinned"
        assert len(named.data) == 1 and named.usage.prompt_tokens == 4
    assert len(upstreams.large.requests) == 2
    assert upstreams.small.requests == [] and upstreams.teacher.requests == []


def test_chat_student_does_not_serve_embeddings(triage_serve: str, upstreams: Upstreams) -> None:
    with sdk(triage_serve) as client, pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="student-small", input="hello")
    assert err.value.param == "model"
    assert "does not serve the embeddings API" in err.value.message
    assert upstreams.small.requests == [] and upstreams.large.requests == []


def test_upstream_errors_reach_the_client(triage_serve: str, upstreams: Upstreams) -> None:
    upstreams.large.mode = "status"
    upstreams.large.status = 500
    with sdk(triage_serve) as client:
        # There is no teacher for embeddings: the embedding model's own status is the answer.
        with pytest.raises(openai.InternalServerError) as err:
            client.embeddings.create(model="auto", input="hello")
        assert err.value.status_code == 500
        assert err.value.message == "Error code: 500 - large failed"  # the upstream's own message
        assert err.value.response.headers["x-triage-model"] == EMBEDDER
        assert err.value.response.headers["x-triage-reason"] == "unscored"

        upstreams.large.status = 422
        with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
            client.embeddings.create(model="auto", input="hello")
        assert unprocessable.value.response.headers["x-triage-model"] == EMBEDDER
    assert upstreams.teacher.requests == [] and upstreams.small.requests == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "auto", "input": []}, "input"),
        ({"model": "auto", "input": 5}, "input"),
        ({"model": "auto", "input": ""}, "input"),
        ({"model": "auto", "input": ["a", ""]}, "input"),
        ({"model": "auto", "input": [[1, 2], []]}, "input"),
        ({"input": ["a"]}, "model"),
        ({"model": "", "input": ["a"]}, "model"),
    ],
    ids=[
        "empty_list",
        "number",
        "empty_string",
        "empty_string_in_list",
        "empty_token_list",
        "no_model",
        "empty_model",
    ],
)
def test_bad_bodies_get_openai_errors(
    triage_serve: str, upstreams: Upstreams, body: dict[str, Any], field: str
) -> None:
    got = httpx.post(triage_serve + "/v1/embeddings", json=body, timeout=10)
    assert got.status_code == 400
    error = got.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    # The field at fault (an `input` error may name an item inside it).
    assert isinstance(error["param"], str) and error["param"].split(".")[0] == field
    assert upstreams.large.requests == []


@pytest.mark.parametrize(
    "body",
    [{"model": "auto", "input": []}, {"model": "auto", "input": 5}],
    ids=["empty_list", "number"],
)
def test_bad_input_error_names_the_input_field(
    triage_serve: str, upstreams: Upstreams, body: dict[str, Any]
) -> None:
    got = httpx.post(triage_serve + "/v1/embeddings", json=body, timeout=10)
    assert got.status_code == 400
    error = got.json()["error"]
    assert error["param"] == "input"
    assert "constrained" not in error["message"] and "list[" not in error["message"]


# --- metrics (in-process gateway, its registry read directly) -------------------------------


def _counts(gw: Gateway) -> dict[str, float]:
    return {
        "decisions": gw.metric("triage_routing_decisions_total", {"model": EMBEDDER, "reason": "unscored"}),
        "requests": gw.metric(
            "triage_requests_total", {"model": EMBEDDER, "reason": "unscored", "status_class": "2xx"}
        ),
        "prompt": gw.metric("triage_prompt_tokens_total", {"model": EMBEDDER, "estimated": "false"}),
        "completion": gw.metric("triage_completion_tokens_total", {"model": EMBEDDER, "estimated": "false"}),
        "cost": gw.metric("triage_cost_usd_total", {"model": EMBEDDER}),
        "teacher_cost": gw.metric("triage_teacher_equivalent_cost_usd_total", {"model": EMBEDDER}),
        "scored": gw.metric("triage_classifier_duration_seconds_count"),
        "scores": gw.metric("triage_classifier_score_count"),
    }


def test_embeddings_are_metered_and_not_scored(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(embedding_config(upstreams.urls)) as gw, sdk(gw.url) as client:
        before = _counts(gw)
        got = client.embeddings.create(model="auto", input=["a b", "c d e", "f"])
        assert got.usage.prompt_tokens == 6
        after = _counts(gw)
    moved = {k: after[k] - before[k] for k in after}
    cost = 6 * 0.02 / 1e6
    assert moved == {
        "decisions": 1,
        "requests": 1,
        "prompt": 6,
        "completion": 0,
        "cost": pytest.approx(cost),
        # What the answer would have cost without routing is what it cost: no savings claimed.
        "teacher_cost": pytest.approx(cost),
        "scored": 0,
        "scores": 0,
    }


def test_no_embedding_model_is_model_not_found(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw, sdk(gw.url) as client:
        with pytest.raises(openai.NotFoundError) as err:
            client.embeddings.create(model="auto", input="hello")
        assert err.value.code == "model_not_found"
        assert "No configured model serves embeddings" in err.value.message
        assert gw.metric("triage_rejected_requests_total", {"code": "404"}) == 1
    assert upstreams.small.requests == [] and upstreams.large.requests == []
    assert upstreams.teacher.requests == []
