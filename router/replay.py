"""`triage replay`: stored traffic re-routed through a candidate config, next to what happened.

Each stored request that the policy routed by its score (reason `classifier` or
`context`, answered) is decided again by the candidate's own policy code
(`router.policy.load_policy`), in time order, so a candidate's share controller moves
as it would have. Its score is the candidate scorer's score of the captured prompt
(`rescored`), or the stored score when no prompt was captured (`stored`: only the
candidate's thresholds apply). Requests pinned to a model, overridden, unscored,
refused for a capability (what they needed is not stored) or failed are not replayed;
they are counted apart and left out of both columns.

For a replayed request whose candidate route is the model it was first sent to, the
projection is what happened. Otherwise the estimates are:

- spend: the teacher → the request's teacher-equivalent cost (the teacher's price on
  the served answer's tokens); a student → its price on the request's tokens per
  attempt, plus the band's escalation rate times the teacher-equivalent cost;
- served by a student: a student route → 1 − the band's escalation rate;
- expected agreement with the teacher: a teacher route → 1; a student route →
  escalation rate × 1 + (1 − escalation rate) × the band's mean shadow agreement.

A band is a tenth of the score range (by default), over the stored score, so the
estimates describe the request, not the route. The band's escalation rate is over
requests first sent to a student; its agreement is over its shadow samples. A band
without shadow samples has no agreement estimate: its student-routed requests are
left out of the expected agreement (the output gives the coverage). Both columns use
these estimates for agreement, so they differ only where routes differ.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from classifiers import Scorer
from router.config import API_NAMES, ApiName, Config
from router.errors import GatewayError
from router.policy import RequestContext, load_policy
from router.records import RequestRecord, ShadowRecord
from router.workload import (
    StoreUnreadable,
    Workloads,
    add_store_command,
    load_stored,
    no_requests,
    percent,
    ratio,
    request_family,
    stored_traffic,
)

__all__ = ["BandStats", "Column", "Replay", "add_subcommand", "replay"]

REPLAYED_REASONS = frozenset({"classifier", "context"})
DEFAULT_BANDS = 10


@dataclass(slots=True)
class BandStats:
    """What stored traffic says about the requests in one score band."""

    requests: int = 0
    student_first: int = 0
    escalations: int = 0
    shadows: int = 0
    agreement_sum: float = 0.0

    @property
    def escalation_rate(self) -> float:
        """Share of the band's student-routed requests escalated (0 when none were)."""
        return self.escalations / self.student_first if self.student_first else 0.0  # (none to escalate)

    @property
    def agreement(self) -> float | None:
        """Mean shadow agreement in the band; None without shadow samples."""
        return None if not self.shadows else self.agreement_sum / self.shadows

    def expected_agreement(self) -> float | None:
        """Expected agreement with the teacher of a request routed to a student in this band."""
        agree = self.agreement
        if agree is None:
            return None
        esc = self.escalation_rate
        return esc + (1 - esc) * agree


@dataclass(slots=True)
class Column:
    """Totals of replayed requests under one routing: what happened, or the candidate."""

    requests: int = 0
    routed_student: int = 0
    served_student: float = 0.0
    spend_usd: float = 0.0
    teacher_spend_usd: float = 0.0
    agreement_sum: float = 0.0
    agreement_n: int = 0

    @property
    def student_share(self) -> float:
        """Share routed to a student."""
        return ratio(self.routed_student, self.requests)

    @property
    def served_share(self) -> float:
        """Share (expected to be) answered by a student."""
        return ratio(self.served_student, self.requests)

    @property
    def savings_usd(self) -> float:
        """Teacher-only spend minus spend."""
        return self.teacher_spend_usd - self.spend_usd

    @property
    def savings_ratio(self) -> float:
        """Savings as a share of the teacher-only spend."""
        return ratio(self.savings_usd, self.teacher_spend_usd)

    @property
    def agreement(self) -> float:
        """Mean expected agreement with the teacher over the requests with an estimate."""
        return ratio(self.agreement_sum, self.agreement_n)

    def add(self, student: bool, served: float, spend: float, teacher: float, agree: float | None) -> None:
        """Count one request."""
        self.requests += 1
        self.routed_student += student
        self.served_student += served
        self.spend_usd += spend
        self.teacher_spend_usd += teacher
        if agree is not None:
            self.agreement_sum += agree
            self.agreement_n += 1


@dataclass(slots=True)
class Replay:
    """A replay's result: both columns, the bands, what was not replayed, the workload tables."""

    happened: Column = field(default_factory=Column)
    candidate: Column = field(default_factory=Column)
    bands: list[BandStats] = field(default_factory=list)
    rescored: int = 0
    stored_scores: int = 0
    moved_to_student: int = 0
    moved_to_teacher: int = 0
    not_replayed: Counter[str] = field(default_factory=Counter)
    by_family: Workloads = field(default_factory=Workloads.by_family)
    by_key: Workloads = field(default_factory=Workloads.by_key)

    def render(self, scorer_name: str | None) -> list[str]:
        """The report `triage replay` prints."""
        h, c = self.happened, self.candidate
        lines = [
            f"replayed {h.requests:,} score-routed requests: {self.rescored:,} rescored"
            + (f" by the candidate's {scorer_name} scorer" if scorer_name else "")
            + f", {self.stored_scores:,} on their stored score (no captured prompt: thresholds only)",
        ]
        if self.not_replayed:
            parts = ", ".join(f"{k} {n:,}" for k, n in sorted(self.not_replayed.items()))
            lines.append(f"not replayed: {sum(self.not_replayed.values()):,} ({parts}), in neither column")
        lines.append(
            f"routes changed: {self.moved_to_student:,} to a student, "
            f"{self.moved_to_teacher:,} to the teacher"
        )
        lines += [
            "",
            f"{'':<28}{'happened':>14}{'candidate':>14}",
            f"{'student share (routed)':<28}{percent(h.student_share):>14}{percent(c.student_share):>14}",
            f"{'served by students':<28}{percent(h.served_share):>14}{percent(c.served_share):>14}",
            f"{'spend':<28}{_usd(h.spend_usd):>14}{_usd(c.spend_usd):>14}",
            f"{'teacher-only spend':<28}{_usd(h.teacher_spend_usd):>14}{_usd(c.teacher_spend_usd):>14}",
            f"{'savings':<28}{_usd(h.savings_usd):>14}{_usd(c.savings_usd):>14}",
            f"{'savings share':<28}{percent(h.savings_ratio):>14}{percent(c.savings_ratio):>14}",
            f"{'expected agreement':<28}{_num(h.agreement):>14}{_num(c.agreement):>14}",
            f"{'  (requests with estimate)':<28}{h.agreement_n:>14,}{c.agreement_n:>14,}",
            "",
            "by stored score band: what the estimates use",
            f"{'band':<12}{'requests':>9}{'to student':>11}{'escalated':>10}{'shadows':>9}{'agreement':>10}",
        ]
        n = len(self.bands)
        for i, band in enumerate(self.bands):
            if not band.requests:
                continue
            esc = percent(band.escalations / band.student_first) if band.student_first else "—"
            agree = band.agreement
            lines.append(
                f"{f'{i / n:.2f}-{(i + 1) / n:.2f}':<12}{band.requests:>9,}{band.student_first:>11,}"
                f"{esc:>10}{band.shadows:>9,}{'—' if agree is None else f'{agree:.3f}':>10}"
            )
        lines += [
            "",
            "by workload: every stored request; the candidate columns re-route the replayed ones "
            "and keep the others as they went",
        ]
        for table in (self.by_family, self.by_key):
            lines += ["", *table.render(candidate=True)]
        return lines


def _usd(value: float) -> str:
    return f"${value:,.4f}"


def _num(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def _band(score: float, bands: int) -> int:
    return min(max(int(score * bands), 0), bands - 1)


def _replayable(record: RequestRecord) -> str | None:
    """Why a record is not replayed, or None when it is."""
    if record.model is None or not record.attempted:
        return "failed"
    if record.reason not in REPLAYED_REASONS:
        return record.reason
    if record.score is None or not math.isfinite(record.score):  # (PostgreSQL keeps a NaN)
        return "unscored"
    if record.api not in API_NAMES:  # (written by a gateway that speaks more formats)
        return "unknown api"
    return None


def replay(
    traffic: Iterable[RequestRecord],
    current: Config,
    candidate: Config,
    scorer: Scorer | None,
    bands: int = DEFAULT_BANDS,
) -> Replay:
    """Re-route `traffic` (stored requests with their `shadows`, oldest first) through `candidate`.

    `current` is the config the traffic was served under: it says which models were
    students. `scorer` rescores captured prompts; None keeps every stored score.
    """
    result = Replay(bands=[BandStats() for _ in range(bands)])
    students_then = frozenset(m.name for m in current.students)
    policy = load_policy(candidate, lambda: None)
    # The band estimates need every request before the first is re-routed, so one pass
    # keeps what the second needs: the score, the size, and the record without its text.
    pending: list[tuple[RequestRecord, float, int]] = []
    for record in traffic:
        why = _replayable(record)
        if why is not None:
            result.not_replayed[why] += 1
            _as_it_happened(result, record, students_then)
            continue
        assert record.score is not None
        band = result.bands[_band(record.score, bands)]
        band.requests += 1
        if record.attempted[0] in students_then:
            band.student_first += 1
            band.escalations += record.escalated
        for shadow in _shadows(record):
            band.shadows += 1
            band.agreement_sum += shadow.agreement
        attempts = len(record.attempted)
        completion_est = math.ceil(record.completion_tokens / attempts)
        if scorer is not None and isinstance(record.prompt, str):
            score = scorer.score_text(record.prompt)
            needed = policy.estimate_tokens(len(record.prompt)) + completion_est
            result.rescored += 1
        else:
            score = record.score
            needed = math.ceil(record.prompt_tokens / attempts) + completion_est
            result.stored_scores += 1
        pending.append((_without_text(record), score, needed))
    alias = candidate.routing.alias
    teacher = candidate.teacher.name
    prices = {m.name: (m.price.input_per_mtok / 1e6, m.price.output_per_mtok / 1e6) for m in candidate.models}
    students_now = frozenset(m.name for m in candidate.students)
    for record, score, needed in pending:
        assert record.score is not None
        stats = result.bands[_band(record.score, bands)]
        attempts = len(record.attempted)
        prompt_tokens = record.prompt_tokens / attempts
        completion_tokens = record.completion_tokens / attempts
        ctx = RequestContext(cast(ApiName, record.api), alias, None, score, needed, frozenset(), record.key)
        try:
            model = policy.decide(ctx).model.name
        except GatewayError:
            result.not_replayed["refused by the candidate"] += 1
            _as_it_happened(result, record, students_then)
            continue
        first = record.attempted[0]
        was_student = first in students_then
        student = model in students_now
        happened_agree = stats.expected_agreement() if was_student else 1.0
        result.happened.add(
            was_student,
            float(record.model in students_then),
            record.cost_usd,
            record.teacher_cost_usd,
            happened_agree,
        )
        if model == first:
            spend = record.cost_usd
            served = float(record.model in students_then)
            agree = happened_agree
        elif model == teacher:
            spend, served, agree = record.teacher_cost_usd, 0.0, 1.0
            result.moved_to_teacher += was_student
        else:
            pin, pout = prices[model]
            esc = stats.escalation_rate
            spend = prompt_tokens * pin + completion_tokens * pout + esc * record.teacher_cost_usd
            served, agree = 1 - esc, stats.expected_agreement()
            result.moved_to_student += not was_student
        result.candidate.add(student, served, spend, record.teacher_cost_usd, agree)
        for table in (result.by_family, result.by_key):
            table.add(record, _shadows(record), students_then, student, spend)
    return result


def _as_it_happened(result: Replay, record: RequestRecord, students: frozenset[str]) -> None:
    """A request the candidate does not re-route: the workload tables count it as it went."""
    first_student = bool(record.attempted) and record.attempted[0] in students
    for table in (result.by_family, result.by_key):
        table.add(record, _shadows(record), students, first_student, record.cost_usd)


def _without_text(record: RequestRecord) -> RequestRecord:
    """A copy that keeps the request's family but none of its captured text (memory)."""
    shadows = [replace(s, teacher_answer=None) for s in _shadows(record)]
    light = replace(record, prompt=None, messages=None, answer=None, family=request_family(record))
    if shadows:
        light.shadows = shadows  # type: ignore[attr-defined]
    return light


def _shadows(record: RequestRecord) -> list[ShadowRecord]:
    shadows: list[ShadowRecord] = getattr(record, "shadows", [])
    return shadows


def _run(args: argparse.Namespace) -> int:
    from classifiers import load_scorer
    from router.__main__ import _load

    current = load_stored(args.current)
    candidate = _load(args.config, secrets_needed=False)
    if current is None or candidate is None or current.store is None:
        return 2
    try:
        traffic = stored_traffic(current.store, args.since, args.until)
        scorer = None
        if not args.stored_scores:
            try:
                scorer = load_scorer(candidate.classifier.kind, candidate.classifier.path)
            except Exception as exc:  # an unreadable artifact fails in many ways (pickle, joblib, numpy)
                detail = " ".join(str(exc).split()[:40])
                where = candidate.classifier.path or candidate.classifier.kind
                sys.stderr.write(
                    f"triage: cannot load the candidate's classifier {where}: {type(exc).__name__} {detail}\n"
                )
                return 2
        result = replay(traffic, current, candidate, scorer, args.bands)
    except StoreUnreadable as exc:
        sys.stderr.write(f"triage: {exc}\n")
        return 2
    if not result.happened.requests and not result.not_replayed:
        sys.stderr.write(f"triage: {no_requests(args.since, args.until)}\n")
        return 1
    lines = [f"candidate {args.config} against the traffic of {args.current}"]
    lines += result.render(None if scorer is None else candidate.classifier.kind)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def add_subcommand(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `triage replay`."""
    from router.__main__ import DEFAULT_CONFIG

    parser = add_store_command(
        sub,
        "replay",
        "re-route stored traffic through a candidate config; projected share, spend and quality",
        __doc__,
    )
    parser.add_argument("--config", type=Path, required=True, help="the candidate config")
    parser.add_argument(
        "--current",
        type=Path,
        default=DEFAULT_CONFIG,
        help="the config the traffic was served under (its store is read)",
    )
    parser.add_argument(
        "--stored-scores",
        action="store_true",
        help="keep every stored score (compare thresholds only, not the classifier)",
    )
    parser.add_argument(
        "--bands",
        type=int,
        choices=range(1, 101),
        default=DEFAULT_BANDS,
        metavar="N",
        help="score bands for the estimates (1-100)",
    )
    parser.set_defaults(func=_run)
