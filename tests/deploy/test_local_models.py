"""Real CPU inference from the embedded local models (``deploy/local``), driven by the openai SDK.

Skipped unless ``bash deploy/local/setup.sh`` has built llama-server and fetched the models.
Select or drop with ``-m local_models`` / ``-m "not local_models"``.
"""

from __future__ import annotations

import threading

import httpx2 as httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.deploy.conftest import LocalModels

pytestmark = pytest.mark.local_models

ROLES = ["student", "teacher"]
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}
]


def _target(models: LocalModels, role: str) -> tuple[str, str]:
    if role == "student":
        return models.student_url, models.student_model
    return models.teacher_url, models.teacher_model


def _client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("role", ROLES)
def test_models_endpoint_lists_served_name(local_models: LocalModels, role: str) -> None:
    base_url, model = _target(local_models, role)
    ids = [m.id for m in _client(base_url).models.list()]
    assert model in ids


@pytest.mark.parametrize("role", ROLES)
def test_chat_completion(local_models: LocalModels, role: str) -> None:
    base_url, model = _target(local_models, role)
    resp = _client(base_url).chat.completions.create(
        model=model, messages=PROMPT, max_tokens=16, temperature=0
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 16


@pytest.mark.parametrize("role", ROLES)
def test_stream_reports_usage(local_models: LocalModels, role: str) -> None:
    base_url, model = _target(local_models, role)
    stream = _client(base_url).chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(text)
    assert usage is not None, "no usage chunk although stream_options.include_usage was set"
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 16


def test_two_requests_run_in_parallel_slots(local_models: LocalModels) -> None:
    client = _client(local_models.student_url)
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            resp = client.chat.completions.create(
                model=local_models.student_model,
                messages=PROMPT,
                max_tokens=8,
            )
            assert resp.choices[0].message.content
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    props = httpx.get(local_models.student_url.removesuffix("/v1") + "/props").json()
    assert props["total_slots"] == 2


@pytest.mark.parametrize("role", ROLES)
def test_metrics_endpoint(local_models: LocalModels, role: str) -> None:
    base_url, _ = _target(local_models, role)
    body = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
    assert "llamacpp:prompt_tokens_total" in body
