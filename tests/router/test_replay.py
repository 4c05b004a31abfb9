"""`triage replay`: stored traffic through a candidate config, checked against numbers worked out by hand."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from router.__main__ import main
from router.config import Config
from router.records import ShadowRecord
from router.replay import replay
from router.store.schema import StoredRequest
from tests.conftest import GatewayFactory, Upstreams
from tests.router.stored_traffic import ask, serve_and_store

# Prices per token: the student 1e-6 in, 2e-6 out; the teacher 1e-5 in, 2e-5 out. Every
# attempt below is 1000 prompt and 500 completion tokens, so one student attempt costs
# $0.002 and one teacher attempt (or a served answer's teacher equivalent) $0.02.
STUDENT, TEACHER = 0.002, 0.02


def config(max_score: float) -> Config:
    return Config.model_validate(
        {
            "models": [
                {
                    "name": "small",
                    "role": "student",
                    "endpoints": ["http://127.0.0.1:9/v1"],
                    "upstream_model": "s",
                    "max_score": max_score,
                    "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
                },
                {
                    "name": "teacher",
                    "role": "teacher",
                    "endpoints": ["http://127.0.0.1:9/v1"],
                    "upstream_model": "t",
                    "price": {"input_per_mtok": 10.0, "output_per_mtok": 20.0},
                },
            ],
            "classifier": {"kind": "heuristic"},
        }
    )


def stored(
    n: int, score: float | None, attempted: tuple[str, ...], agreement: float | None = None, **fields: Any
) -> StoredRequest:
    """Request `rN`: served by the last model attempted, 1000/500 tokens per attempt."""
    cost = sum(STUDENT if m == "small" else TEACHER for m in attempted)
    values: dict[str, Any] = {
        "ts": 1_700_000_000.0 + n,
        "request_id": f"r{n}",
        "key": "team-a",
        "api": "chat",
        "requested": "auto",
        "model": attempted[-1],
        "attempted": attempted,
        "reason": "classifier",
        "score": score,
        "threshold_factor": 1.0,
        "status": 200,
        "stream": False,
        "prompt_tokens": 1000 * len(attempted),
        "completion_tokens": 500 * len(attempted),
        "cost_usd": cost,
        "teacher_cost_usd": TEACHER,
        "latency_ms": 10.0,
        "ttft_ms": None,
        "upstream_ms": 9.0,
        "fallback": None,
        "error": None,
        "quality": "passed" if attempted[0] == "small" else None,
        "shadowed": agreement is not None,
    }
    values.update(fields)
    rec = StoredRequest(**values)
    if agreement is not None:
        rec.shadows = [ShadowRecord(values["ts"] + 1, rec.request_id, "small", agreement, None, 1000, 500)]
    return rec


def traffic() -> list[StoredRequest]:
    """Ten requests served under `config(0.4)`.

    Score bands (tenths of the stored score):
      band 1: r1, r2 to the student, no escalation, shadow agreement 1.0 and 0.5 → mean 0.75;
              expected agreement of a student route 0 × 1 + 1 × 0.75 = 0.75
      band 3: r3, r4, r5 to the student, r4 escalated (1/3), one shadow (r5) at 0.8;
              expected agreement 1/3 × 1 + 2/3 × 0.8 = 13/15
      bands 4, 5, 7: r6, r7, r8 to the teacher: no shadow samples, so no estimate.
    r9 was pinned and r10 failed: not replayed.
    """
    return [
        stored(1, 0.10, ("small",), 1.0, family="chat", prompt="hello there", captured=True),
        stored(2, 0.15, ("small",), 0.5, family="chat"),
        stored(3, 0.35, ("small",), family="chat"),
        stored(4, 0.38, ("small", "teacher"), family="chat", quality="refusal", fallback="refusal"),
        stored(5, 0.32, ("small",), 0.8, family="code"),
        stored(6, 0.45, ("teacher",), family="code", key="team-b"),
        stored(7, 0.55, ("teacher",), family="code", key="team-b"),
        stored(8, 0.75, ("teacher",), family="code", key="team-b", prompt="what is 2+2", captured=True),
        stored(9, None, ("teacher",), family="chat", reason="pinned", requested="teacher"),
        stored(10, 0.2, ("small",), key=None, model=None, status=502, cost_usd=0.0, teacher_cost_usd=0.0),
    ]


class FixedScorer:
    """A scorer with a fixed score for each known text (the candidate's classifier)."""

    name = "fixed"

    def __init__(self, scores: Mapping[str, float]) -> None:
        self.scores = scores

    def score_text(self, text: str) -> float:
        return self.scores[text]

    def score(self, messages: Sequence[Mapping[str, Any]]) -> float:  # pragma: no cover - unused
        raise NotImplementedError


def test_a_candidate_that_rescores_and_raises_the_threshold_matches_the_hand_computation() -> None:
    # The candidate sends scores below 0.5 to the student, and its classifier rescores the
    # two captured prompts: r1 ("hello there") to 0.9, the teacher; r8 ("what is 2+2") to 0.05,
    # the student. r6 (0.45) moves to the student on its stored score.
    scorer = FixedScorer({"hello there": 0.9, "what is 2+2": 0.05})
    result = replay(traffic(), config(0.4), config(0.5), scorer)
    assert (result.rescored, result.stored_scores) == (2, 6)
    assert dict(result.not_replayed) == {"pinned": 1, "failed": 1}
    assert (result.moved_to_student, result.moved_to_teacher) == (2, 1)

    h = result.happened
    assert h.requests == 8
    assert h.student_share == 5 / 8  # r1-r5
    assert h.served_share == 4 / 8  # r4 was escalated
    assert h.spend_usd == pytest.approx(4 * STUDENT + (STUDENT + TEACHER) + 3 * TEACHER)  # 0.09
    assert h.teacher_spend_usd == pytest.approx(8 * TEACHER)  # 0.16
    assert h.savings_ratio == pytest.approx(0.07 / 0.16)
    # r1, r2: 0.75; r3-r5: 13/15; r6-r8: the teacher, 1.
    assert h.agreement_n == 8
    assert h.agreement == pytest.approx((2 * 0.75 + 3 * 13 / 15 + 3) / 8)  # 0.8875

    c = result.candidate
    assert c.requests == 8
    assert c.student_share == 6 / 8  # r2-r6, r8
    # r4 keeps its route and its outcome (escalated); r6 and r8 land in bands with no
    # escalations, so each is expected to be served by the student.
    assert c.served_share == 5 / 8
    # r1 at the teacher's price; r2, r3, r5 as they were; r4 as it was (student + teacher);
    # r6 and r8 at the student's price on their tokens (+ 0 escalations); r7 as it was.
    assert c.spend_usd == pytest.approx(TEACHER + 3 * STUDENT + (STUDENT + TEACHER) + 2 * STUDENT + TEACHER)
    assert c.spend_usd == pytest.approx(0.072)
    assert c.savings_usd == pytest.approx(0.088)
    # r6 and r8 are in bands without shadow samples: no estimate for them.
    assert c.agreement_n == 6
    assert c.agreement == pytest.approx((1 + 0.75 + 3 * 13 / 15 + 1) / 6)

    chat = result.by_family.rows["chat"]  # r1-r4 and the pinned r9
    assert (chat.requests, chat.student_first, chat.student_served, chat.escalations) == (5, 4, 3, 1)
    assert (chat.shadows, chat.agreement) == (2, 0.75)
    assert chat.savings_usd == pytest.approx(5 * TEACHER - (3 * STUDENT + STUDENT + TEACHER + TEACHER))
    assert chat.candidate_share == 3 / 5  # r2, r3, r4
    assert chat.candidate_cost_usd == pytest.approx(TEACHER + 2 * STUDENT + STUDENT + TEACHER + TEACHER)
    code = result.by_family.rows["code"]  # r5-r8
    assert (code.requests, code.student_served, code.escalation_rate, code.agreement) == (4, 1, 0.0, 0.8)
    assert code.savings_usd == pytest.approx(4 * TEACHER - (STUDENT + 3 * TEACHER))
    assert code.candidate_share == 3 / 4
    assert code.candidate_savings_usd == pytest.approx(4 * TEACHER - (STUDENT + STUDENT + TEACHER + STUDENT))
    unknown = result.by_family.rows["unknown"]  # r10: nothing captured, no tag
    assert (unknown.requests, unknown.student_served, unknown.cost_usd) == (1, 0, 0.0)
    by_key = result.by_key.rows
    assert {k: r.requests for k, r in by_key.items()} == {"team-a": 6, "team-b": 3, "(no key)": 1}
    assert by_key["team-b"].student_share == 0.0 and by_key["team-b"].candidate_share == 2 / 3

    text = "\n".join(result.render("fixed"))
    assert (
        "replayed 8 score-routed requests: 2 rescored by the candidate's fixed scorer, 6 on their stored"
        in text
    )
    assert "student share (routed)               62.5%         75.0%" in text
    assert "spend                              $0.0900       $0.0720" in text
    assert "0.30-0.40           3          3     33.3%        1     0.800" in text


def test_a_candidate_with_a_lower_threshold_on_stored_scores() -> None:
    # Below 0.3: only r1 and r2 stay with the student; r3, r4 and r5 move to the teacher
    # and cost their teacher equivalent; every teacher route agrees with itself.
    result = replay(traffic(), config(0.4), config(0.3), None)
    assert (result.rescored, result.stored_scores) == (0, 8)
    assert (result.moved_to_student, result.moved_to_teacher) == (0, 3)
    c = result.candidate
    assert (c.student_share, c.served_share) == (2 / 8, 2 / 8)
    assert c.spend_usd == pytest.approx(2 * STUDENT + 6 * TEACHER)  # 0.124
    assert c.savings_ratio == pytest.approx(0.036 / 0.16)
    assert c.agreement == pytest.approx((2 * 0.75 + 6) / 8)  # 0.9375


def test_replay_reads_a_gateways_store(
    upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def send(client: openai.OpenAI) -> None:
        for i in range(4):
            ask(client, f"thanks {i}")
        client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": "pinned"}])

    raw, current = serve_and_store(upstreams, make_gateway, tmp_path, send, shadows=4)
    for model in raw["models"]:  # the candidate sends nothing to the students
        if model["role"] == "student":
            model["max_score"] = 0.01
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(raw))
    assert main(["replay", "--config", str(candidate), "--current", str(current)]) == 0
    text = capsys.readouterr().out
    assert "replayed 4 score-routed requests: 4 rescored by the candidate's heuristic scorer" in text
    assert "not replayed: 1 (pinned 1)" in text
    assert "routes changed: 0 to a student, 4 to the teacher" in text
    assert "student share (routed)              100.0%          0.0%" in text


def test_a_candidates_share_controller_moves_its_thresholds_as_it_replays() -> None:
    # 400 requests with scores spread over [0, 1); the student's threshold is 0.4 and the
    # candidate aims at a 70% student share: its controller raises the threshold as it goes,
    # so the candidate routes more than 40% (the fixed threshold's share) to the student.
    scores = [((i * 37) % 400) / 400 for i in range(400)]
    records = [stored(i, s, ("small",) if s < 0.4 else ("teacher",)) for i, s in enumerate(scores)]
    fixed = replay(records, config(0.4), config(0.4), None)
    assert fixed.candidate.student_share == fixed.happened.student_share == 0.4
    steered = config(0.4)
    routing = steered.routing.model_copy(update={"target_student_share": 0.7, "share_window": 100})
    steered = steered.model_copy(update={"routing": routing})
    result = replay(records, config(0.4), steered, None)
    assert 0.55 < result.candidate.student_share < 0.75
    assert result.moved_to_student > 0 and result.moved_to_teacher == 0


def test_records_a_store_should_not_hold_are_counted_apart_not_a_crash() -> None:
    # PostgreSQL keeps a NaN score; another writer may leave odd text or messages.
    odd = [
        stored(1, math.nan, ("small",)),
        stored(2, math.inf, ("small",)),
        stored(3, 0.2, ("small",), prompt=5, messages="not a list", captured=True),
        stored(4, 0.2, ("small",), messages=[None, "x"], captured=True),
    ]
    result = replay(odd, config(0.4), config(0.3), FixedScorer({}))
    assert result.not_replayed == {"unscored": 2}
    assert (result.happened.requests, result.rescored, result.stored_scores) == (2, 0, 2)
    assert result.by_family.rows["unknown"].requests == 4
