"""One record per request, with what it cost and how it went, handed to the recorder's sinks."""

from __future__ import annotations

import math
import time

import httpx2 as httpx
import openai
import pytest

from router.records import RequestRecord, ShadowRecord
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_config
from tests.fake_upstream import Mode


class ListSink:
    """Keeps every record it is given; captures what `capture` says."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.requests: list[RequestRecord] = []
        self.shadows: list[ShadowRecord] = []

    def sample_capture(self) -> bool:
        return self.capture

    def request(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def shadow(self, record: ShadowRecord) -> None:
        self.shadows.append(record)


def _sink(gw: Gateway, capture: bool) -> ListSink:
    sink = ListSink(capture)
    gw.app.state.recorder.sinks.append(sink)
    return sink


def _easy(stream: bool = False) -> dict[str, object]:
    return {"model": "auto", "messages": [{"role": "user", "content": "thanks"}], "stream": stream}


def test_a_served_request_is_recorded_with_its_cost(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        sink = _sink(gw, capture=False)
        with httpx.Client(base_url=gw.url) as client:
            resp = client.post("/v1/chat/completions", json=_easy(), headers={"x-request-id": "r-1"})
        assert resp.status_code == 200
        (rec,) = sink.requests
        assert (rec.request_id, rec.api, rec.requested, rec.model, rec.reason) == (
            "r-1",
            "chat",
            "auto",
            "student-small",
            "classifier",
        )
        assert rec.status == 200 and rec.attempted == ("student-small",) and not rec.stream
        assert rec.score is not None and abs(rec.score - float(resp.headers["x-triage-score"])) < 1e-3
        usage = resp.json()["usage"]
        assert (rec.prompt_tokens, rec.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        # The student's price, and the teacher's for the same tokens as the counterfactual.
        assert (
            abs(rec.cost_usd - (usage["prompt_tokens"] * 0.1 + usage["completion_tokens"] * 0.2) / 1e6)
            < 1e-12
        )
        teacher = (usage["prompt_tokens"] * 3.0 + usage["completion_tokens"] * 15.0) / 1e6
        assert abs(rec.teacher_cost_usd - teacher) < 1e-12
        assert rec.quality == "passed" and rec.fallback is None and rec.ttft_ms is None
        assert rec.threshold_factor == 1.0 and abs(rec.ts - time.time()) < 30
        assert not rec.captured and rec.prompt is None and rec.answer is None
        assert list(gw.app.state.recorder.recent) == [rec]


def test_an_escalation_records_both_attempts(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    upstreams.small.text = "I'm sorry, but I cannot help with that."
    with make_gateway(base_config(upstreams.urls)) as gw:
        sink = _sink(gw, capture=True)
        with httpx.Client(base_url=gw.url) as client:
            resp = client.post("/v1/chat/completions", json=_easy())
        assert resp.headers["x-triage-model"] == "teacher"
        (rec,) = sink.requests
        assert rec.model == "teacher" and rec.attempted == ("student-small", "teacher")
        assert rec.quality == "refusal" and rec.fallback == "refusal"
        # Both attempts are paid for; only the teacher's served answer counts as the counterfactual.
        student_tokens = upstreams.small.prompt_tokens + upstreams.small.completion_tokens
        assert rec.prompt_tokens + rec.completion_tokens > student_tokens
        cost = gw.metric("triage_cost_usd_total", {"model": "student-small"}) + gw.metric(
            "triage_cost_usd_total", {"model": "teacher"}
        )
        assert abs(rec.cost_usd - cost) < 1e-12
        equivalent = gw.metric("triage_teacher_equivalent_cost_usd_total", {"model": "teacher"})
        assert abs(rec.teacher_cost_usd - equivalent) < 1e-12
        assert rec.captured and rec.prompt == "thanks"
        assert rec.messages == [{"role": "user", "content": "thanks"}]
        assert rec.answer == resp.json()["choices"][0]["message"]["content"]


def test_a_stream_records_its_first_token_and_answer(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    upstreams.small.text = "one two three"
    with make_gateway(base_config(upstreams.urls)) as gw:
        sink = _sink(gw, capture=True)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "thanks"}], stream=True
            )
            if chunk.choices
        )
        (rec,) = sink.requests
        assert rec.stream and rec.status == 200 and rec.model == "student-small"
        assert rec.ttft_ms is not None and 0 < rec.ttft_ms <= rec.latency_ms
        assert rec.answer == text and text.split() == ["one", "two", "three"]


def test_a_shadow_comparison_follows_its_request(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    upstreams.small.text = "The answer is 42."
    upstreams.teacher.text = "So we get 42"
    with make_gateway(base_config(upstreams.urls, shadow_rate=1.0)) as gw:
        sink = _sink(gw, capture=True)
        with httpx.Client(base_url=gw.url) as client:
            client.post("/v1/chat/completions", json=_easy(), headers={"x-request-id": "r-2"})
        deadline = time.monotonic() + 5
        while not sink.shadows and time.monotonic() < deadline:
            time.sleep(0.02)
        (rec,) = sink.requests
        (shadow,) = sink.shadows
        assert rec.shadowed and shadow.request_id == "r-2" and shadow.student == "student-small"
        assert shadow.agreement == 1.0 and shadow.teacher_answer == "So we get 42"
        assert shadow.teacher_prompt_tokens == upstreams.teacher.prompt_tokens


def test_a_rejected_request_makes_no_record(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        sink = _sink(gw, capture=False)
        with httpx.Client(base_url=gw.url) as client:
            assert client.post("/v1/chat/completions", json={"model": "auto"}).status_code == 400
            assert client.post("/v1/chat/completions", json=_easy()).status_code == 200
        assert [r.status for r in sink.requests] == [200]


def test_the_clients_workload_tag_is_recorded(upstreams: Upstreams, make_gateway: GatewayFactory) -> None:
    with make_gateway(base_config(upstreams.urls)) as gw:
        sink = _sink(gw, capture=False)
        with httpx.Client(base_url=gw.url) as client:
            ok = client.post("/v1/chat/completions", json=_easy(), headers={"x-triage-family": "Support-Bot"})
            bad = client.post("/v1/chat/completions", json=_easy(), headers={"x-triage-family": "a b"})
            plain = client.post("/v1/chat/completions", json=_easy())
        assert (ok.status_code, bad.status_code, plain.status_code) == (200, 400, 200)
        assert bad.json()["error"]["param"] == "x-triage-family"
        assert [r.family for r in sink.requests] == ["support-bot", None]


@pytest.mark.parametrize(
    ("header", "value"),
    [("x-triage-family", "not a tag"), ("x-triage-escalation-budget-usd", "-1")],
)
def test_a_refused_header_is_refused_before_the_request_is_scored_or_routed(
    upstreams: Upstreams, make_gateway: GatewayFactory, header: str, value: str
) -> None:
    # Every routed request moves the share controller (here: at each request).
    raw = base_config(upstreams.urls, target_student_share=0.5, share_update_every=1)
    with make_gateway(raw) as gw:
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            with pytest.raises(openai.BadRequestError) as refused:
                sdk.chat.completions.create(
                    model="auto",
                    messages=[{"role": "user", "content": "thanks"}],
                    extra_headers={header: value},
                )
            assert refused.value.param == header
        # A refused request leaves no trace in the scores, the decisions or the controller.
        assert gw.metric("triage_classifier_score_count") == 0
        share = gw.registry.get_sample_value("triage_student_share")
        assert share is not None and math.isnan(share)
        decisions = [
            s.value
            for m in gw.registry.collect()
            for s in m.samples
            if s.name == "triage_routing_decisions_total"
        ]
        assert decisions and not any(decisions)
        sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "thanks"}])
        assert gw.metric("triage_classifier_score_count") == 1
        assert gw.registry.get_sample_value("triage_student_share") == 1.0


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [
        ("cut_stream", 502, "unreachable"),
        ("stall", 504, "did not answer in time"),
        ("no_done", 502, "ended its stream before completing"),
    ],
)
def test_a_stream_that_fails_after_its_start_says_why_in_its_one_record(
    upstreams: Upstreams, make_gateway: GatewayFactory, mode: Mode, status: int, error: str
) -> None:
    raw = base_config(upstreams.urls)
    raw["models"][0]["read_timeout_s"] = 1.0
    upstreams.small.mode = mode
    upstreams.small.chunks = 20  # fails at the tenth, after the hold-back window
    with make_gateway(raw) as gw:
        sink = _sink(gw, capture=False)
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        stream = sdk.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "thanks"}], stream=True
        )
        with pytest.raises(openai.APIError, match=error):
            for _ in stream:
                pass
        (rec,) = sink.requests
        assert (rec.status, rec.model, rec.stream) == (status, "student-small", True)
        assert rec.error is not None and error in rec.error


class BrokenSink:
    """A sink that breaks the protocol: every call raises."""

    def sample_capture(self) -> bool:
        raise RuntimeError("sampler broken")

    def request(self, record: RequestRecord) -> None:
        raise RuntimeError("disk full")

    def shadow(self, record: ShadowRecord) -> None:
        raise RuntimeError("disk full")


def test_a_sink_that_raises_fails_no_request_and_no_other_sink(
    upstreams: Upstreams, make_gateway: GatewayFactory
) -> None:
    with make_gateway(base_config(upstreams.urls, shadow_rate=1.0)) as gw:
        gw.app.state.recorder.sinks.append(BrokenSink())
        sink = _sink(gw, capture=True)
        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        answer = sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "thanks"}])
        assert answer.choices[0].message.content
        chunks = sdk.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "thanks"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        deadline = time.monotonic() + 5
        while len(sink.shadows) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [(r.status, r.stream, r.captured) for r in sink.requests] == [
            (200, False, True),
            (200, True, True),
        ]
        assert len(sink.shadows) == 2
        assert list(gw.app.state.recorder.recent) == sink.requests
