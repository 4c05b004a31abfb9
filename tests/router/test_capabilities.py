"""Capability-aware routing end to end: images, tools, JSON schemas and prompt size pick the model,
and a student's own "this input does not fit me" 400 falls back to the teacher.

Clients are the official OpenAI and Anthropic SDKs over real sockets; the upstreams are the
fake models of `tests/fake_upstream.py`, plus a fake here that answers every request with a
fixed error status and body, as vLLM does for a prompt past `max_model_len`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import yaml
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionToolParam
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.config import API_NAMES, Config, ConfigError, load_config
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.loopback import serve

# --- helpers -------------------------------------------------------------------------------


def model_entry(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The config entry of one model, to edit in place."""
    entry: dict[str, Any] = next(m for m in raw["models"] if m["name"] == name)
    return entry


def oai(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="any", max_retries=0, timeout=20)


def ant(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="any", max_retries=0, timeout=20)


@dataclass
class Served:
    """What the client saw: the status, the x-triage-* headers and the model that answered."""

    status: int
    headers: Mapping[str, str]
    text: str = ""  # the answer text, on success
    error: Any = None  # the error body, on failure


def chat(gw: Gateway, content: str | list[ChatCompletionContentPartParam], **extra: Any) -> Served:
    """A non-streaming chat request for `model: auto` through the OpenAI SDK."""
    raw = oai(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": content}], **extra
    )
    answer = raw.parse().choices[0].message.content or ""
    return Served(raw.status_code, raw.headers, answer)


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def image_part(size: int = 64) -> ChatCompletionContentPartParam:
    """An `image_url` part carrying a data URL of about `size` base64 characters."""
    raw = PNG_HEADER + bytes(i % 251 for i in range(size * 3 // 4))
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def picture_question(size: int = 64) -> list[ChatCompletionContentPartParam]:
    # A short plain question: the heuristic scorer puts it well under student-small's 0.3.
    return [{"type": "text", "text": "What is in this picture?"}, image_part(size)]


# --- images ------------------------------------------------------------------------------


def test_image_request_skips_text_only_students(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        served = chat(gw, picture_question())
    assert served.headers["x-triage-model"] == "teacher"
    assert served.headers["x-triage-reason"] == "capability"
    assert float(served.headers["x-triage-score"]) < 0.3  # the classifier chose student-small
    assert served.text.startswith("teacher-0")
    assert upstreams.small.requests == [] and upstreams.large.requests == []
    # The teacher gets the image part as the client sent it.
    assert upstreams.teacher.requests[0]["messages"][0]["content"][1]["type"] == "image_url"
    assert gw.metric("triage_routing_decisions_total", {"model": "teacher", "reason": "capability"}) == 1


def test_image_request_goes_to_a_vision_student(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    small = model_entry(raw, "student-small")
    small["capabilities"] = {"vision": True}
    small["context_window"] = 2000  # room for one image (1000 tokens)
    with make_gateway(raw) as gw:
        served = chat(gw, picture_question())
        text_only = chat(gw, "What is in this picture?")
    assert served.headers["x-triage-model"] == "student-small"
    assert served.headers["x-triage-reason"] == "classifier"
    assert served.text.startswith("small-0")
    assert upstreams.small.requests[0]["messages"][0]["content"][1]["type"] == "image_url"
    assert text_only.headers["x-triage-model"] == "student-small"
    assert upstreams.teacher.requests == []


def big_image_config(upstreams: Upstreams, **routing: Any) -> dict[str, Any]:
    raw = base_config(upstreams.urls, **routing)
    for name in ("student-small", "student-large"):
        model_entry(raw, name)["capabilities"] = {"vision": True}
    assert model_entry(raw, "student-large")["context_window"] == 8000
    return raw


def test_image_counts_as_image_tokens_not_its_bytes(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    question = picture_question(200_000)
    url = question[1]["image_url"]["url"]  # type: ignore[typeddict-item]
    assert len(url) > 200_000  # ~50k tokens if its characters were counted as text
    with make_gateway(big_image_config(upstreams)) as gw:
        served = chat(gw, question)
    # student-small (200 tokens) cannot hold one image of 1000 tokens; student-large can.
    assert served.headers["x-triage-model"] == "student-large"
    assert served.headers["x-triage-reason"] == "context"
    assert upstreams.large.requests[0]["messages"][0]["content"][1]["image_url"]["url"] == url
    assert upstreams.small.requests == [] and upstreams.teacher.requests == []


def test_image_tokens_setting_sizes_an_image(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(big_image_config(upstreams, image_tokens=9000)) as gw:
        big = chat(gw, picture_question(200_000))
        small = chat(gw, picture_question(64))
    # 9000 tokens per image: past student-large's 8000 whatever the image's bytes.
    for served in (big, small):
        assert served.headers["x-triage-model"] == "teacher"
        assert served.headers["x-triage-reason"] == "context"
    assert upstreams.small.requests == [] and upstreams.large.requests == []


# --- tools -------------------------------------------------------------------------------

_DESCRIPTION = (
    "Looks up one record in the warehouse inventory by its stock keeping unit and returns the "
    "quantity on hand, the bin location, the supplier and the date of the last count. "
) * 8


def many_tools(count: int = 53) -> list[ChatCompletionToolParam]:
    """Function tools with long descriptions, as agent frameworks send them."""
    return [
        {
            "type": "function",
            "function": {
                "name": f"inventory_lookup_{i}",
                "description": _DESCRIPTION,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "description": "The stock keeping unit."},
                        "warehouse": {"type": "string", "enum": ["north", "south", "east", "west"]},
                    },
                    "required": ["sku"],
                },
            },
        }
        for i in range(count)
    ]


def test_tool_schemas_count_toward_the_prompt_size(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    tools = many_tools()
    size = len(orjson.dumps(tools))
    assert 80_000 < size < 95_000  # ~21k tokens at 4 characters a token
    with make_gateway(base_config(upstreams.urls)) as gw:
        with_tools = chat(gw, "Where is SKU 4411?", tools=tools)
        without = chat(gw, "Where is SKU 4411?")
    assert with_tools.headers["x-triage-model"] == "teacher"
    assert with_tools.headers["x-triage-reason"] == "context"
    assert float(with_tools.headers["x-triage-score"]) < 0.3
    assert len(upstreams.teacher.requests[0]["tools"]) == 53
    assert without.headers["x-triage-model"] == "student-small"
    assert without.headers["x-triage-reason"] == "classifier"
    assert len(upstreams.small.requests) == 1 and upstreams.large.requests == []


def test_tools_skip_a_student_without_tools(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    model_entry(raw, "student-small")["capabilities"] = {"tools": False}
    with make_gateway(raw) as gw:
        served = chat(gw, "Where is SKU 4411?", tools=many_tools(1))
        plain = chat(gw, "Where is SKU 4411?")
    assert served.headers["x-triage-model"] == "student-large"
    assert served.headers["x-triage-reason"] == "capability"
    assert upstreams.large.requests[0]["tools"][0]["function"]["name"] == "inventory_lookup_0"
    assert plain.headers["x-triage-model"] == "student-small"
    assert "tools" not in upstreams.small.requests[0]


# --- structured output -------------------------------------------------------------------

_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "part",
        "schema": {
            "type": "object",
            "required": ["sku", "count"],
            "properties": {"sku": {"type": "string"}, "count": {"type": "integer"}},
        },
    },
}


def test_json_schema_skips_a_student_without_it(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    raw = base_config(upstreams.urls)
    model_entry(raw, "student-small")["capabilities"] = {"json_schema": False}
    upstreams.large.text = '{"sku": "4411", "count": 3}'
    upstreams.small.text = '{"sku": "4411", "count": 3}'
    with make_gateway(raw) as gw:
        served = chat(gw, "Count SKU 4411.", response_format=_SCHEMA_FORMAT)
        as_object = chat(gw, "Count SKU 4411.", response_format={"type": "json_object"})
    assert served.headers["x-triage-model"] == "student-large"
    assert served.headers["x-triage-reason"] == "capability"
    assert orjson.loads(served.text) == {"sku": "4411", "count": 3}
    assert upstreams.large.requests[0]["response_format"] == _SCHEMA_FORMAT
    # Plain JSON mode needs no schema support.
    assert as_object.headers["x-triage-model"] == "student-small"
    assert len(upstreams.small.requests) == 1


# --- a student's own "does not fit" 400 ---------------------------------------------------


def vllm_error(message: str) -> dict[str, Any]:
    """vLLM's error body (`ErrorResponse`)."""
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}


STUDENT_TOO_LONG = (
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
    "(4000 in the messages, 1000 in the completion). Please reduce the length of the messages "
    "or completion."
)
TEACHER_TOO_LONG = "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens"
NOT_MULTIMODAL = "Qwen2ForCausalLM is not a multimodal model"
BAD_TEMPERATURE = "temperature must be between 0 and 2, got 7"


@dataclass
class Rejecting:
    """A fake chat-completions server that answers every request with one error."""

    status: int = 400
    body: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)


def rejecting_app(state: Rejecting) -> Starlette:
    async def completion(request: Request) -> Response:
        state.requests.append(await request.json())
        return JSONResponse(state.body, state.status)

    return Starlette(routes=[Route("/v1/chat/completions", completion, methods=["POST"])])


@dataclass
class Rejecters:
    student: Rejecting
    teacher: Rejecting
    urls: dict[str, str]


@pytest.fixture(scope="module")
def _rejecting_servers() -> Iterator[Rejecters]:
    student, teacher = Rejecting(), Rejecting()
    with serve(rejecting_app(student)) as s_url, serve(rejecting_app(teacher)) as t_url:
        yield Rejecters(student, teacher, {"student": s_url, "teacher": t_url})


@pytest.fixture
def rejecters(_rejecting_servers: Rejecters) -> Rejecters:
    for state in (_rejecting_servers.student, _rejecting_servers.teacher):
        state.status, state.body, state.requests = 400, {}, []
    return _rejecting_servers


def rejecting_config(
    upstreams: Upstreams, rejecters: Rejecters, teacher_rejects: bool = False
) -> dict[str, Any]:
    """base_config with student-small on the rejecting fake (and the teacher too, if asked)."""
    raw = base_config(upstreams.urls)
    model_entry(raw, "student-small")["endpoints"] = [rejecters.urls["student"] + "/v1"]
    if teacher_rejects:
        model_entry(raw, "teacher")["endpoints"] = [rejecters.urls["teacher"] + "/v1"]
    return raw


FORMATS = ("chat", "chat-stream", "messages")


def ask(gw: Gateway, fmt: str, model: str = "auto", headers: dict[str, str] | None = None) -> Served:
    """One short request in the format; the status, headers and answer text or error body it got."""
    try:
        if fmt == "messages":
            raw_msg = ant(gw).messages.with_raw_response.create(
                model=model,
                max_tokens=50,  # inside student-small's 200-token window
                messages=[{"role": "user", "content": "hi"}],
                extra_headers=headers,
            )
            blocks = raw_msg.parse().content
            text = "".join(b.text for b in blocks if b.type == "text")
            return Served(raw_msg.status_code, raw_msg.headers, text)
        client = oai(gw)
        if fmt == "chat-stream":
            raw_stream = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True, extra_headers=headers
            )
            chunks = list(raw_stream.parse())
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return Served(raw_stream.status_code, raw_stream.headers, text)
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
        return Served(raw.status_code, raw.headers, raw.parse().choices[0].message.content or "")
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        return Served(exc.status_code, exc.response.headers, error=exc.response.json())


def fallbacks(gw: Gateway, model: str, reason: str) -> float:
    return gw.metric("triage_fallbacks_total", {"model": model, "reason": reason})


def error_message(served: Served, fmt: str) -> str:
    """The error's message, after checking the body has the envelope of the client's format."""
    body = served.error
    if fmt == "messages":
        assert body["type"] == "error", body
        assert body["error"]["type"] == "invalid_request_error", body
    else:
        assert set(body) == {"error"}, body
    message: str = body["error"]["message"]
    return message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("message", "reason"),
    [(STUDENT_TOO_LONG, "context_length"), (NOT_MULTIMODAL, "unsupported_input")],
)
def test_student_input_rejection_falls_back_to_teacher(
    upstreams: Upstreams,
    rejecters: Rejecters,
    make_gateway: GatewayFactory,
    fmt: str,
    message: str,
    reason: str,
) -> None:
    rejecters.student.body = vllm_error(message)
    with make_gateway(rejecting_config(upstreams, rejecters)) as gw:
        served = ask(gw, fmt)
        assert served.status == 200, served.error
        assert served.headers["x-triage-model"] == "teacher"
        assert served.headers["x-triage-reason"] == "fallback"
        assert served.headers["x-triage-fallback"] == reason
        assert served.headers["x-triage-attempted"] == "student-small,teacher"
        assert served.text.startswith("teacher-0")
        assert fallbacks(gw, "student-small", reason) == 1
        # Counted under its own reason, not as an upstream failure.
        assert fallbacks(gw, "student-small", "upstream_error") == 0
    assert len(rejecters.student.requests) == 1  # no retry of the same input on the student
    assert len(upstreams.teacher.requests) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_unrelated_student_400_is_the_clients(
    upstreams: Upstreams, rejecters: Rejecters, make_gateway: GatewayFactory, fmt: str
) -> None:
    rejecters.student.body = vllm_error(BAD_TEMPERATURE)
    with make_gateway(rejecting_config(upstreams, rejecters)) as gw:
        served = ask(gw, fmt)
        assert served.status == 400
        assert error_message(served, fmt) == BAD_TEMPERATURE
        assert served.headers["x-triage-model"] == "student-small"
        assert "x-triage-fallback" not in served.headers
        assert fallbacks(gw, "student-small", "context_length") == 0
    assert len(rejecters.student.requests) == 1
    assert upstreams.teacher.requests == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_teacher_context_400_is_passed_through(
    upstreams: Upstreams, rejecters: Rejecters, make_gateway: GatewayFactory, fmt: str
) -> None:
    rejecters.student.body = vllm_error(STUDENT_TOO_LONG)
    rejecters.teacher.body = vllm_error(TEACHER_TOO_LONG)
    with make_gateway(rejecting_config(upstreams, rejecters, teacher_rejects=True)) as gw:
        after_student = ask(gw, fmt)
        pinned = ask(gw, fmt, model="teacher")
        # The student's rejection sent it on; the teacher's own is the answer, once.
        assert after_student.status == 400
        assert error_message(after_student, fmt) == TEACHER_TOO_LONG
        assert after_student.headers["x-triage-model"] == "teacher"
        assert after_student.headers["x-triage-fallback"] == "context_length"
        assert fallbacks(gw, "student-small", "context_length") == 1
        assert fallbacks(gw, "teacher", "context_length") == 0
        # A request pinned to the teacher has nowhere further to go.
        assert pinned.status == 400
        assert error_message(pinned, fmt) == TEACHER_TOO_LONG
        assert pinned.headers["x-triage-reason"] == "pinned"
        assert "x-triage-fallback" not in pinned.headers
    assert len(rejecters.student.requests) == 1
    assert len(rejecters.teacher.requests) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_fallback_off_passes_the_student_400_on(
    upstreams: Upstreams, rejecters: Rejecters, make_gateway: GatewayFactory, fmt: str
) -> None:
    rejecters.student.body = vllm_error(STUDENT_TOO_LONG)
    with make_gateway(rejecting_config(upstreams, rejecters)) as gw:
        served = ask(gw, fmt, headers={"x-triage-fallback": "off"})
        assert served.status == 400
        assert error_message(served, fmt) == STUDENT_TOO_LONG
        assert served.headers["x-triage-model"] == "student-small"
        assert "x-triage-fallback" not in served.headers
        assert fallbacks(gw, "student-small", "context_length") == 0
    assert upstreams.teacher.requests == []


# --- config validation -------------------------------------------------------------------


def test_teacher_must_speak_chat(upstreams: Upstreams) -> None:
    raw = base_config(upstreams.urls)
    model_entry(raw, "teacher")["api"] = "anthropic"
    with pytest.raises(ValidationError, match="'teacher': the teacher's api must include chat"):
        Config.model_validate(raw)
    model_entry(raw, "teacher")["api"] = ["messages", "chat"]
    assert Config.model_validate(raw).teacher.apis == {"messages", "chat"}


def test_api_shorthands(upstreams: Upstreams) -> None:
    raw = base_config(upstreams.urls)
    model_entry(raw, "student-small")["api"] = "vllm"
    model_entry(raw, "student-large")["api"] = "anthropic"
    model_entry(raw, "teacher")["api"] = "openai"
    config = Config.model_validate(raw)
    small, large, teacher = config.models
    assert small.apis == set(API_NAMES) == {"chat", "completions", "responses", "messages", "embeddings"}
    assert large.apis == {"messages"}
    assert teacher.apis == {"chat", "completions", "embeddings"}


def test_unknown_api_name_names_its_field(upstreams: Upstreams, tmp_path: Path) -> None:
    raw = base_config(upstreams.urls)
    model_entry(raw, "student-large")["api"] = ["chat", "grpc"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert (
        "models.1.api.1  Input should be 'chat', 'completions', 'responses', 'messages' or 'embeddings'"
        in str(err.value)
    )
    model_entry(raw, "student-large")["api"] = "grpc"  # neither a format nor a shorthand
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"models\.1\.api\.0  Input should be 'chat'"):
        load_config(path, environ={})


def test_embedding_model_takes_no_max_score(upstreams: Upstreams) -> None:
    raw = base_config(upstreams.urls)
    embedder = {
        "name": "embedder",
        "role": "embedding",
        "endpoints": [upstreams.urls["large"] + "/v1"],
        "upstream_model": "up-embed",
        "max_score": 0.2,
    }
    raw["models"].append(embedder)
    with pytest.raises(
        ValidationError, match="max_score applies to students only; remove it from the embedding"
    ):
        Config.model_validate(raw)
    del embedder["max_score"]
    assert Config.model_validate(raw).model("embedder") is not None
