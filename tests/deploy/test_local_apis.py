"""Triage's Responses, Anthropic Messages and embeddings APIs in front of the real local CPU models.

The official ``openai`` and ``anthropic`` SDKs talk to a gateway whose student and teacher are the
llama-servers from ``deploy/local``. Each generative API runs twice: translated to chat completions
(the default for a model without that ``api``) and passed through to llama-server's own
``/v1/responses`` or ``/v1/messages`` (the student listing that ``api``). Which path served a reply
shows in its id: the translations mint ``resp_``/``msg_`` plus 32 hex digits, llama-server does not.

Embeddings come from a third llama-server started here: the SmolLM2 student GGUF with
``--embeddings --pooling mean`` (a generative model, mean-pooled, not a dedicated embedding model).
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.deploy.conftest import LocalModels, local_settings, sdk_client, shipped_config
from tests.loopback import free_port

pytestmark = pytest.mark.local_models

STUDENT = "student-small"
EMBEDDER = "embedder"
PROMPT = "Say hello"
# At temperature 0 the student rambles past 16 tokens on PROMPT and stops after 8 on SHORT.
SHORT = "What is 2+2? Answer with a number only."
GATEWAY_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
GATEWAY_MESSAGE_ID = re.compile(r"msg_[0-9a-f]{32}")
NO_FALLBACK = {"x-triage-fallback": "off"}
# The anthropic SDK no longer takes `temperature` as an argument; the Messages API still does.
GREEDY = {"temperature": 0}
# The student's `api` for each run: None translates to chat; a list naming the format passes through.
RESPONSES_APIS = pytest.mark.parametrize(
    "student_api", [None, ["chat", "completions", "responses"]], ids=["translated", "native"]
)
MESSAGES_APIS = pytest.mark.parametrize(
    "student_api", [None, ["chat", "completions", "messages"]], ids=["translated", "native"]
)


@dataclass(frozen=True)
class Embedder:
    """A llama-server answering /v1/embeddings: its OpenAI base URL and served model name."""

    url: str
    model: str


@pytest.fixture(scope="module")
def embedder(local_models: LocalModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedder]:
    """The student GGUF served for embeddings (mean pooling) on a free port, until the module ends."""
    settings = local_settings()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("embedder") / "embedder.log"
    cmd = [
        settings["LLAMA_SERVER_BIN"],
        "-m",
        settings["STUDENT_GGUF"],
        "--alias",
        settings["STUDENT_MODEL_NAME"],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        "512",
        "--parallel",
        "1",
        "--threads",
        "1",
        "--no-webui",
        "--embeddings",
        "--pooling",
        "mean",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(base, proc, log)
        served = [m["id"] for m in httpx.get(base + "/v1/models", timeout=5).json()["data"]]
        assert served == [settings["STUDENT_MODEL_NAME"]]
        yield Embedder(base + "/v1", served[0])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("embedding llama-server did not come up:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)


def gateway_config(
    models: LocalModels, student_api: list[str] | None = None, embedder: Embedder | None = None
) -> dict[str, Any]:
    """The shipped config on the test's ports; the student may list native APIs, an embedder may join."""
    raw = shipped_config(models.student_url, models.teacher_url)
    if student_api is not None:
        raw["models"][0]["api"] = student_api
    if embedder is not None:
        raw["models"].append(
            {
                "name": EMBEDDER,
                "role": "embedding",
                "endpoints": [embedder.url],
                "upstream_model": embedder.model,
                "price": {"input_per_mtok": 0.01},
            }
        )
    return raw


def anthropic_client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.url, api_key="local", max_retries=0, timeout=120, default_headers=NO_FALLBACK
    )


def tokens(gw: Gateway, kind: str, model: str = STUDENT) -> float:
    """Exact (upstream-reported) tokens the gateway metered for a model."""
    return gw.metric(f"triage_{kind}_tokens_total", {"model": model, "estimated": "false"})


def settled(gw: Gateway, kind: str, expected: float) -> float:
    """The metered completion tokens once a stream's accounting, done as it closes, has landed."""
    deadline = time.monotonic() + 10
    while (value := tokens(gw, kind)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@RESPONSES_APIS
def test_responses_api(
    local_models: LocalModels, make_gateway: GatewayFactory, student_api: list[str] | None
) -> None:
    with make_gateway(gateway_config(local_models, student_api)) as gw:
        client = sdk_client(gw.url)
        raw = client.responses.with_raw_response.create(
            model="auto", input=PROMPT, max_output_tokens=16, temperature=0
        )
        response = raw.parse()
        assert raw.headers["x-triage-model"] == STUDENT
        assert response.output_text.strip()
        assert response.usage is not None
        assert response.usage.input_tokens > 0 and response.usage.output_tokens == 16
        if student_api is None:
            # Cut off at max_output_tokens: OpenAI's status (llama-server says "completed" here).
            assert response.status == "incomplete"
            assert response.incomplete_details is not None
            assert response.incomplete_details.reason == "max_output_tokens"
        assert bool(GATEWAY_RESPONSE_ID.fullmatch(response.id)) == (student_api is None)
        assert tokens(gw, "prompt") > 0
        assert tokens(gw, "completion") == response.usage.output_tokens

        with client.responses.with_streaming_response.create(
            model="auto", input=SHORT, max_output_tokens=16, temperature=0, stream=True
        ) as streamed:
            assert streamed.headers["x-triage-model"] == STUDENT
            events = list(streamed.parse())
        last = events[-1]
        assert last.type == "response.completed"
        assert last.response.status == "completed"
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas.strip()
        assert last.response.output_text == deltas
        assert last.response.usage is not None and 0 < last.response.usage.output_tokens < 16
        assert bool(GATEWAY_RESPONSE_ID.fullmatch(last.response.id)) == (student_api is None)
        expected = response.usage.output_tokens + last.response.usage.output_tokens
        assert settled(gw, "completion", expected) == expected


@MESSAGES_APIS
def test_anthropic_messages(
    local_models: LocalModels, make_gateway: GatewayFactory, student_api: list[str] | None
) -> None:
    short: list[anthropic.types.MessageParam] = [{"role": "user", "content": SHORT}]
    with make_gateway(gateway_config(local_models, student_api)) as gw:
        client = anthropic_client(gw)
        raw = client.messages.with_raw_response.create(
            model="auto", max_tokens=16, messages=[{"role": "user", "content": PROMPT}], extra_body=GREEDY
        )
        message = raw.parse()
        assert raw.headers["x-triage-model"] == STUDENT
        text = "".join(b.text for b in message.content if b.type == "text")
        assert text.strip()
        assert message.stop_reason == "max_tokens"
        # llama-server counts a prompt it had cached as cache reads, not input tokens.
        assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 0
        assert message.usage.output_tokens == 16
        assert bool(GATEWAY_MESSAGE_ID.fullmatch(message.id)) == (student_api is None)
        assert tokens(gw, "prompt") > 0
        assert tokens(gw, "completion") == message.usage.output_tokens

        with client.messages.stream(model="auto", max_tokens=16, messages=short, extra_body=GREEDY) as stream:
            assert stream.response.headers["x-triage-model"] == STUDENT
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed.strip()
        assert "".join(b.text for b in final.content if b.type == "text") == streamed
        assert final.stop_reason == "end_turn"
        assert 0 < final.usage.output_tokens < 16
        assert bool(GATEWAY_MESSAGE_ID.fullmatch(final.id)) == (student_api is None)
        expected = message.usage.output_tokens + final.usage.output_tokens
        assert settled(gw, "completion", expected) == expected

        # The gateway answers count_tokens itself, with the estimate routing uses.
        assert client.messages.count_tokens(model="auto", messages=short).input_tokens > 0


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings(local_models: LocalModels, embedder: Embedder, make_gateway: GatewayFactory) -> None:
    with make_gateway(gateway_config(local_models, embedder=embedder)) as gw:
        client = sdk_client(gw.url)
        raw = client.embeddings.with_raw_response.create(model="auto", input=["hello world", "goodbye"])
        result = raw.parse()
        assert raw.headers["x-triage-model"] == EMBEDDER
        assert raw.headers["x-triage-reason"] == "unscored"
        assert [d.index for d in result.data] == [0, 1]
        first, second = (d.embedding for d in result.data)
        assert len(first) == len(second) > 0
        assert first != second
        assert result.usage.prompt_tokens > 0
        assert tokens(gw, "prompt", EMBEDDER) == result.usage.prompt_tokens
        assert gw.metric("triage_cost_usd_total", {"model": EMBEDDER}) > 0
        assert tokens(gw, "prompt") == 0  # the student was not asked

        same, paraphrase, unrelated, again = (
            d.embedding
            for d in client.embeddings.create(
                model="auto",
                input=[
                    "The cat sat on the mat.",
                    "A cat was sitting on the mat.",
                    "Quarterly revenue grew by eight percent.",
                    "The cat sat on the mat.",
                ],
            ).data
        )
        assert _cosine(same, again) > 0.999
        assert _cosine(same, paraphrase) > _cosine(same, unrelated)
