"""`triage stats`: a terminal summary of a running gateway's `/metrics`.

It answers "what did routing save?" without a Prometheus server: requests and
share per model, student share, spend against the teacher-only counterfactual,
fallbacks, latency quantiles estimated from histogram buckets (the way
PromQL's `histogram_quantile` does), gateway overhead and upstream errors.
All numbers are totals since the gateway started.
"""

from __future__ import annotations

import argparse
import http.client
import math
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "Snapshot",
    "Summary",
    "add_subcommand",
    "fetch",
    "histogram_quantile",
    "render",
    "run",
    "summarize",
]

DEFAULT_URL = "http://127.0.0.1:8080"
_STATUS_CLASSES = ("2xx", "4xx", "5xx")


class StatsError(Exception):
    """The gateway could not be read, or what it returned is not Triage metrics."""


@dataclass
class Snapshot:
    """Every sample of one scrape, by sample name (`triage_requests_total`, `..._bucket`)."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str) -> Snapshot:
        """Parse the Prometheus text exposition format."""
        return cls.from_families(text_string_to_metric_families(text))

    @classmethod
    def from_families(cls, families: Iterable[Metric]) -> Snapshot:
        """Take the samples of collected metric families (a registry's `collect()`)."""
        snap = cls()
        for family in families:
            for s in family.samples:
                snap.samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return snap

    def get(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        """Samples of `name` whose labels include `match`."""
        return [
            (labels, value)
            for labels, value in self.samples.get(name, ())
            if all(labels.get(k) == v for k, v in match.items())
        ]

    def total(self, name: str, **match: str) -> float:
        """Sum of the matching samples (0 when none)."""
        return sum(v for _, v in self.get(name, **match))

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        """Matching samples summed per value of `label`."""
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.get(name, **match):
            out[labels.get(label, "")] += value
        return dict(out)

    def value(self, name: str, **match: str) -> float | None:
        """The single matching sample's value, or None when absent."""
        found = self.get(name, **match)
        return found[0][1] if found else None

    def buckets(self, name: str, **match: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) pairs of a histogram, summed over other labels."""
        acc: dict[float, float] = defaultdict(float)
        for labels, value in self.get(name + "_bucket", **match):
            acc[float(labels["le"])] += value
        return sorted(acc.items())


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Estimate the q-quantile from cumulative buckets, as PromQL's `histogram_quantile` does.

    Linear interpolation inside the bucket that holds the rank; the lowest
    bucket starts at 0; a rank in the `+Inf` bucket returns the highest finite
    bound. None when the histogram is empty.
    """
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return None
    total = pairs[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in pairs:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


@dataclass
class ModelRow:
    """Totals for one model."""

    name: str
    requests: float
    by_status: dict[str, float]
    cost: float
    teacher_equivalent: float
    prompt_tokens: float
    completion_tokens: float
    latency_p50: float | None
    latency_p95: float | None
    ttft_p50: float | None
    ttft_p95: float | None


@dataclass
class Summary:
    """What `triage stats` prints, computed from one snapshot."""

    models: list[ModelRow]
    teacher: str | None
    student_share: float | None
    student_share_classifier: float | None
    share_target: float | None
    share_window: float | None
    cost: float
    teacher_equivalent: float
    shadow_cost: float
    fallbacks: dict[tuple[str, str], float]
    upstream_errors: dict[tuple[str, str], float]
    overhead_p50: float | None
    overhead_p99: float | None
    version: str | None
    config_hash: str | None

    @property
    def requests(self) -> float:
        """Requests answered, all models."""
        return sum(m.requests for m in self.models)

    @property
    def savings(self) -> float:
        """USD saved against sending every answered request to the teacher."""
        return self.teacher_equivalent - self.cost

    @property
    def savings_ratio(self) -> float | None:
        """Savings as a fraction of the teacher-only spend; None before any spend."""
        return self.savings / self.teacher_equivalent if self.teacher_equivalent > 0 else None


def _find_teacher(snap: Snapshot, explicit: str | None, models: Iterable[str]) -> str | None:
    if explicit:
        return explicit
    for labels, value in snap.get("triage_model_info"):
        if labels.get("role") == "teacher" and value:
            return labels.get("model")
    # Only the teacher is billed at the teacher's own prices, so its spend equals
    # its teacher-equivalent spend exactly; students are cheaper.
    cost = snap.by("triage_cost_usd_total", "model")
    equiv = snap.by("triage_teacher_equivalent_cost_usd_total", "model")
    matches = [
        m for m in models if equiv.get(m, 0.0) > 0 and math.isclose(cost.get(m, 0.0), equiv[m], rel_tol=1e-9)
    ]
    return matches[0] if len(matches) == 1 else None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summarize(snap: Snapshot, teacher: str | None = None) -> Summary:
    """Turn one scrape into the numbers `triage stats` shows."""
    if "triage_requests_total" not in snap.samples:
        raise StatsError("no triage_requests_total in the metrics; is this a Triage gateway?")
    requests = snap.by("triage_requests_total", "model")
    names = list(requests)
    rows = []
    for name in names:
        rows.append(
            ModelRow(
                name=name,
                requests=requests[name],
                by_status={
                    c: snap.total("triage_requests_total", model=name, status_class=c)
                    for c in _STATUS_CLASSES
                },
                cost=snap.total("triage_cost_usd_total", model=name),
                teacher_equivalent=snap.total("triage_teacher_equivalent_cost_usd_total", model=name),
                prompt_tokens=snap.total("triage_prompt_tokens_total", model=name),
                completion_tokens=snap.total("triage_completion_tokens_total", model=name),
                latency_p50=histogram_quantile(
                    0.5, snap.buckets("triage_request_duration_seconds", model=name)
                ),
                latency_p95=histogram_quantile(
                    0.95, snap.buckets("triage_request_duration_seconds", model=name)
                ),
                ttft_p50=histogram_quantile(
                    0.5, snap.buckets("triage_time_to_first_token_seconds", model=name)
                ),
                ttft_p95=histogram_quantile(
                    0.95, snap.buckets("triage_time_to_first_token_seconds", model=name)
                ),
            )
        )
    who = _find_teacher(snap, teacher, names)
    total = sum(requests.values())
    share = share_cls = None
    if who is not None and total > 0:
        share = (total - requests.get(who, 0.0)) / total
        cls = snap.by("triage_requests_total", "model", reason="classifier")
        cls_total = sum(cls.values())
        if cls_total > 0:
            share_cls = (cls_total - cls.get(who, 0.0)) / cls_total
    target = _finite(snap.value("triage_student_share_target"))
    # The controller's window share means nothing until a target is configured.
    window = _finite(snap.value("triage_student_share")) if target else None
    build = snap.get("triage_build_info")
    overhead = snap.buckets("triage_overhead_seconds")
    return Summary(
        models=rows,
        teacher=who,
        student_share=share,
        student_share_classifier=share_cls,
        share_target=target if target else None,
        share_window=window,
        cost=snap.total("triage_cost_usd_total"),
        teacher_equivalent=snap.total("triage_teacher_equivalent_cost_usd_total"),
        shadow_cost=snap.total("triage_shadow_cost_usd_total"),
        fallbacks=_nonzero(snap, "triage_fallbacks_total", "model", "reason"),
        upstream_errors=_nonzero(snap, "triage_upstream_errors_total", "model", "type"),
        overhead_p50=histogram_quantile(0.5, overhead),
        overhead_p99=histogram_quantile(0.99, overhead),
        version=build[0][0].get("version") if build else None,
        config_hash=build[0][0].get("config_hash") if build else None,
    )


def _nonzero(snap: Snapshot, name: str, a: str, b: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = defaultdict(float)
    for labels, value in snap.get(name):
        if value:
            out[(labels.get(a, ""), labels.get(b, ""))] += value
    return dict(out)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.2f} ms"


def _usd(x: float) -> str:
    return f"${x:,.4f}"


def _grouped(counts: Mapping[tuple[str, str], float], key: int) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for k, v in counts.items():
        out[k[key]] += v
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def render(s: Summary, url: str) -> str:
    """The text report."""
    lines = [
        f"Triage at {url}" + (f"  (version {s.version}, config {s.config_hash})" if s.version else ""),
        "",
    ]
    width = max([len("model"), *(len(m.name) for m in s.models)]) + 2
    lines.append(
        f"{'model':<{width}}{'requests':>9}{'share':>8}{'2xx':>7}{'4xx':>6}{'5xx':>6}"
        f"{'spend':>12}{'teacher-only':>14}"
    )
    for m in s.models:
        share = m.requests / s.requests if s.requests else None
        role = " (teacher)" if m.name == s.teacher else ""
        lines.append(
            f"{m.name:<{width}}{m.requests:>9.0f}{_pct(share):>8}"
            + "".join(f"{m.by_status[c]:>{7 if c == '2xx' else 6}.0f}" for c in _STATUS_CLASSES)
            + f"{_usd(m.cost):>12}{_usd(m.teacher_equivalent):>14}{role}"
        )
    lines.append(
        f"{'all':<{width}}{s.requests:>9.0f}{_pct(1.0 if s.requests else None):>8}"
        + "".join(
            f"{sum(m.by_status[c] for m in s.models):>{7 if c == '2xx' else 6}.0f}" for c in _STATUS_CLASSES
        )
        + f"{_usd(s.cost):>12}{_usd(s.teacher_equivalent):>14}"
    )
    lines.append("")
    if s.student_share is None:
        share_line = "unknown (pass --teacher NAME)" if s.requests else "-"
    else:
        share_line = (
            f"{_pct(s.student_share)} of all requests, "
            f"{_pct(s.student_share_classifier)} of classifier-routed"
        )
    if s.share_target is not None:
        share_line += f"; target {_pct(s.share_target)}, controller window {_pct(s.share_window)}"
    lines.append(f"Student share     {share_line}")
    lines.append(f"Spend             {_usd(s.cost)} actual vs {_usd(s.teacher_equivalent)} teacher-only")
    lines.append(f"Savings           {_usd(s.savings)} ({_pct(s.savings_ratio)})")
    if s.shadow_cost:
        # Shadow teacher calls are real spend outside triage_cost_usd_total.
        net = s.savings - s.shadow_cost
        lines.append(f"Shadow spend      {_usd(s.shadow_cost)}; net savings {_usd(net)}")
    lines.append("")
    fb_total = sum(s.fallbacks.values())
    by_reason = ", ".join(f"{r} {n:.0f}" for r, n in _grouped(s.fallbacks, 1).items())
    lines.append(
        f"Fallbacks         {fb_total:.0f}"
        + (f" ({by_reason})" if by_reason else "")
        + (f" = {_pct(fb_total / s.requests)} of requests" if s.requests else "")
    )
    errs = ", ".join(f"{m} {t} {n:.0f}" for (m, t), n in sorted(s.upstream_errors.items()))
    lines.append(f"Upstream errors   {sum(s.upstream_errors.values()):.0f}" + (f" ({errs})" if errs else ""))
    lines.append("")
    lines.append(f"{'latency (s)':<{width}}{'p50':>8}{'p95':>8}{'TTFT p50':>10}{'TTFT p95':>10}")
    for m in s.models:
        lines.append(
            f"{m.name:<{width}}{_secs(m.latency_p50):>8}{_secs(m.latency_p95):>8}"
            f"{_secs(m.ttft_p50):>10}{_secs(m.ttft_p95):>10}"
        )
    lines.append(f"Gateway overhead  p50 {_ms(s.overhead_p50)}, p99 {_ms(s.overhead_p99)}")
    lines.append("Quantiles are estimated from histogram buckets; totals are since the gateway started.")
    return "\n".join(lines) + "\n"


def fetch(url: str, timeout_s: float = 5.0) -> Snapshot:
    """Scrape `<url>/metrics`; raise `StatsError` when it cannot be read."""
    target = url.rstrip("/") + "/metrics"
    if not target.startswith(("http://", "https://")):
        raise StatsError(f"{url} is not an http:// or https:// URL")
    # The standard library's client: `triage` must run on the runtime dependencies alone
    # (the test extra's HTTP client is not one of them), and one GET needs no pool.
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        raise StatsError(f"{target} answered HTTP {exc.code}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StatsError(f"cannot reach {target}: {reason or type(exc).__name__}") from None
    if status != 200:
        raise StatsError(f"{target} answered HTTP {status}")
    try:
        return Snapshot.from_text(body.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise StatsError(f"{target} did not return Prometheus metrics: {exc}") from None


def run(url: str, teacher: str | None = None, timeout_s: float = 5.0) -> int:
    """Print the summary for the gateway at `url`; 0 on success, 1 when it cannot be read."""
    try:
        summary = summarize(fetch(url, timeout_s), teacher)
    except StatsError as exc:
        print(f"triage stats: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    sys.stdout.write(render(summary, url))
    return 0


def _main(args: argparse.Namespace) -> int:
    return run(args.url, args.teacher, args.timeout_s)


def add_subcommand(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `triage stats` on the CLI's subparsers (`func` returns the exit code)."""
    stats = subparsers.add_parser("stats", help="summarize a running gateway's metrics")
    stats.add_argument("--url", default=DEFAULT_URL, help=f"gateway base URL (default {DEFAULT_URL})")
    stats.add_argument("--teacher", help="teacher model name (default: read from the metrics)")
    stats.add_argument("--timeout-s", type=float, default=5.0, help="HTTP timeout in seconds")
    stats.set_defaults(func=_main)
