"""End to end: the official OpenAI SDK against `triage serve` running as a real process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Upstreams, base_config
from tests.loopback import serving


@pytest.fixture
def triage_serve(upstreams: Upstreams, tmp_path: Path) -> Iterator[str]:
    with serving(base_config(upstreams.urls), tmp_path) as url:
        yield url


def test_openai_sdk_unchanged(triage_serve: str) -> None:
    client = openai.OpenAI(base_url=triage_serve + "/v1", api_key="any", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello"}]
    )
    completion = raw.parse()
    assert raw.headers["x-triage-model"] == "student-small"
    assert completion.choices[0].message.content == "small-0 small-1 small-2 small-3 small-4 "
    assert completion.usage is not None and completion.usage.total_tokens == 16

    stream = client.chat.completions.create(
        model="teacher",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("teacher-0")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    legacy = client.completions.create(model="auto", prompt="hi")
    assert legacy.choices[0].text.startswith("small-0")

    models = client.models.list()
    assert {m.id for m in models} == {"auto", "student-small", "student-large", "teacher"}

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[])


def test_openai_sdk_sees_mid_stream_error(triage_serve: str, upstreams: Upstreams) -> None:
    upstreams.small.mode = "cut_stream"
    upstreams.small.chunks = 30  # the cut comes after the hold-back window
    client = openai.OpenAI(base_url=triage_serve + "/v1", api_key="any", max_retries=0)
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
