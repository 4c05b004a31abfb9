"""Hostile input: scorers return a probability for any conversation, and the gateway never 5xxs on it.

Scorers run on the event loop for every request, so besides never raising they
must stay fast on huge prompts (a 1 MB prompt is under the default 4 MB body limit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classifiers import Scorer, load_scorer
from classifiers.heuristic import HeuristicScorer
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config

ARTIFACT = Path(__file__).resolve().parents[2] / "classifiers" / "models" / "complexity.joblib"
MB = 1_000_000

ROLES = st.one_of(
    st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]),
    st.text(max_size=10),
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
)
TEXT = st.one_of(
    st.text(),  # any Unicode scalar value (hypothesis leaves out surrogates by default)
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"])),  # control and format chars
    st.text(st.characters(codec="utf-8"), min_size=1000, max_size=5000),
)
# JSON numbers as orjson writes them: 64-bit integers, finite floats.
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["image_url", "input_audio", "text"]), "text": JSON, "image_url": JSON}
    ),
    JSON,
)
CONTENT = st.one_of(TEXT, st.lists(PART, max_size=5), st.lists(st.lists(PART, max_size=3), max_size=3), JSON)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLES, "content": CONTENT}),
    st.dictionaries(st.text(max_size=8), JSON, max_size=3),
)
MESSAGES = st.lists(MESSAGE, max_size=8)


def _scorers() -> list[tuple[str, Callable[[], Scorer]]]:
    found: list[tuple[str, Callable[[], Scorer]]] = [("heuristic", HeuristicScorer)]
    if ARTIFACT.exists():
        found.append(("learned", lambda: load_scorer("learned", ARTIFACT)))
    return found


@pytest.fixture(scope="module", params=_scorers(), ids=lambda p: p[0])
def scorer(request: pytest.FixtureRequest) -> Scorer:
    make: Callable[[], Scorer] = request.param[1]
    return make()


def _assert_probability(value: float) -> None:
    assert isinstance(value, float)
    assert math.isfinite(value) and 0.0 <= value <= 1.0


def test_the_heuristic_scorer_is_always_fuzzed() -> None:
    # The learned artifact is optional; the fixture must never be empty.
    assert _scorers()[0][0] == "heuristic"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=MESSAGES)
def test_any_conversation_scores_in_unit_interval(scorer: Scorer, messages: list[Any]) -> None:
    _assert_probability(scorer.score(messages))


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_any_text_scores_in_unit_interval(scorer: Scorer, text: str) -> None:
    _assert_probability(scorer.score_text(text))
    _assert_probability(scorer.score([{"role": "user", "content": text}]))


HUGE = {
    "prose": "Prove that the integral of f converges, step by step. " * (MB // 55),
    "one_word": "a" * MB,
    "control": "\x00\x01\x1b\x7f\u200b\u2028" * (MB // 6),
    "astral": "\U0001f600\U00010348" * (MB // 2),
    "code": "def f(x):\n    return x ** 2  # {\n" * (MB // 34),
}


@pytest.mark.parametrize("kind", sorted(HUGE))
def test_one_megabyte_prompt_scores_fast(scorer: Scorer, kind: str) -> None:
    text = HUGE[kind]
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "user", "content": text}],
        [{"role": "system", "content": text}, {"role": "user", "content": text}],
        [{"role": "user", "content": [{"type": "text", "text": text}]}],
    ]
    for messages in conversations:
        start = time.perf_counter()
        value = scorer.score(messages)
        elapsed = time.perf_counter() - start
        _assert_probability(value)
        assert elapsed < 0.5, f"{kind}: {elapsed:.3f} s"


def test_many_turns_score_fast(scorer: Scorer) -> None:
    messages = [{"role": "user", "content": "x" * 1000}] * 1000  # 1 MB in 1,000 turns
    start = time.perf_counter()
    _assert_probability(scorer.score(messages))
    assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------- through the gateway


@pytest.fixture
def gw(upstreams: Upstreams, make_gateway: GatewayFactory) -> Iterator[Gateway]:
    with make_gateway(base_config(upstreams.urls)) as running:
        yield running


def _post(gw: Gateway, body: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(gw.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)


def _chat(content: Any, **extra: Any) -> bytes:
    return orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": content}], **extra})


def _nested(depth: int) -> bytes:
    return (
        b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "x": '
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


HOSTILE: dict[str, tuple[bytes, set[int]]] = {
    "one_megabyte_prompt": (_chat("Explain step by step. " * (MB // 22)), {200}),
    "one_megabyte_of_one_word": (_chat("a" * MB), {200}),
    "control_characters": (_chat("\x00\x01\x02\x1b[31m\x7f\u2028\u2029\ufeff"), {200}),
    "astral_and_rtl": (_chat("\U0001f600 \u202e\u0645\u0631\u062d\u0628\u0627 \U00010348"), {200}),
    "content_parts": (_chat([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]), {200}),
    "nested_content_parts": (_chat([{"type": "text", "text": [[["hi"]]]}, [[{"a": [{}]}]]]), {200, 400}),
    "nested_json_100": (_nested(100), {200, 400}),
    "nested_json_5000": (_nested(5000), {400}),
    "unknown_role": (
        orjson.dumps({"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]}),
        {400},
    ),
    "role_not_a_string": (
        orjson.dumps({"model": "auto", "messages": [{"role": ["user"], "content": "x"}]}),
        {400},
    ),
    "huge_n": (_chat("hi", n=10**9), {400}),
    "n_beyond_64_bits": (_chat("hi").rstrip(b"}") + b', "n": ' + b"9" * 40 + b"}", {400}),
    "negative_max_tokens": (_chat("hi", max_tokens=-1), {400}),
    "zero_max_completion_tokens": (_chat("hi", max_completion_tokens=0), {400}),
    "float_max_tokens": (_chat("hi", max_tokens=1e308), {400}),
    "max_tokens_a_string": (_chat("hi", max_tokens="12"), {200, 400}),
    "no_messages": (b'{"model": "auto", "messages": []}', {400}),
    "messages_not_a_list": (b'{"model": "auto", "messages": "hi"}', {400}),
    "model_not_a_string": (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', {400}),
    "unknown_model": (
        orjson.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        {404},
    ),
    "stream_not_a_bool": (_chat("hi", stream="yes"), {400}),
    "stream_options_not_an_object": (_chat("hi", stream=True, stream_options=[1]), {400}),
    "invalid_utf8": (b'{"model": "auto", "messages": [{"role": "user", "content": "\xff\xfe"}]}', {400}),
    "lone_surrogate_escape": (
        b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud800"}]}',
        {200, 400},
    ),
    "nul_in_body": (b"\x00" * 100, {400}),
    "top_level_array": (b"[]", {400}),
    "empty_body": (b"", {400}),
    "duplicate_keys": (
        b'{"model": "auto", "model": "auto", "messages": [{"role": "user", "content": "x"}]}',
        {200, 400},
    ),
    "huge_number": (_chat("hi").rstrip(b"}") + b', "temperature": 1' + b"0" * 400 + b"}", {200, 400}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_chat_body_gets_a_client_error_or_an_answer(gw: Gateway, name: str) -> None:
    body, expected = HOSTILE[name]
    resp = _post(gw, body)
    assert resp.status_code in expected, (name, resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("prompt", [[], [""], ["a" * MB], ["\x00"] * 1000, "\ud7ff\ue000"])
def test_hostile_completion_prompt(gw: Gateway, prompt: Any) -> None:
    resp = _post(gw, orjson.dumps({"model": "auto", "prompt": prompt}), "/v1/completions")
    assert resp.status_code in {200, 400}, resp.text[:300]


def test_body_over_the_limit_is_413(gw: Gateway) -> None:
    resp = _post(gw, _chat("a" * (gw.config.server.max_body_bytes + 1)))
    assert resp.status_code == 413, resp.text[:300]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    messages=MESSAGES,
    extra=st.dictionaries(
        st.sampled_from(
            [
                "n",
                "max_tokens",
                "max_completion_tokens",
                "stream",
                "stream_options",
                "model",
                "temperature",
                "logprobs",
                "tools",
            ]
        ),
        JSON,
        max_size=3,
    ),
)
def test_any_json_conversation_never_5xx(gw: Gateway, messages: list[Any], extra: dict[str, Any]) -> None:
    body = orjson.dumps({"model": "auto", "messages": messages, **extra})
    resp = _post(gw, body)
    assert resp.status_code < 500, (body[:300], resp.status_code, resp.text[:300])
