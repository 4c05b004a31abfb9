"""Soak: 100,000 requests through one `triage serve`; its memory and open files must stay flat.

Uses the load test's fakes and client (`bench/load.py`), by default with the same
10% injected student faults. After every batch (10,000 requests by default) it
samples the gateway process's RSS (`/proc/<pid>/status` VmRSS) and open file
descriptors (`/proc/<pid>/fd`). Passes when RSS at the end is within 10% of RSS
after the first batch, the fd count never grows more than 5 above the first batch's, and
every request got exactly one matching 200 (the load test's invariants).

    .venv/bin/python bench/soak.py --requests 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from load import Driver, Tally, free_port, gateway_config, new_loop, process_cpu_s, triage_serve

__all__ = ["Sample", "main", "rss_kib", "open_fds", "run_soak"]


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sample:
    """The gateway's footprint after `requests` requests."""

    requests: int
    rss_kib: int
    fds: int
    req_per_s: float


def run_soak(
    requests: int = 100_000,
    batch: int = 10_000,
    concurrency: int = 96,
    fault_every: int = 10,
    reset_every: int = 4,
    settle_s: float = 1.0,
) -> tuple[list[Sample], list[str]]:
    """Drive `requests` through one gateway in batches; (samples, broken invariants)."""
    loop = new_loop()
    driver = Driver(fault_every, reset_every)
    samples: list[Sample] = []
    try:
        loop.run_until_complete(driver.start())
        config = gateway_config(driver.urls["student-small"], driver.urls["teacher"], free_port())
        with triage_serve(config) as (url, pid):
            tally = Tally()
            total_s = 0.0
            cpu0 = process_cpu_s(pid), time.process_time()
            for first in range(0, requests, batch):
                count = min(batch, requests - first)
                _, seconds = loop.run_until_complete(
                    driver.drive(url, first, count, concurrency, tally=tally)
                )
                total_s += seconds
                # Let the gateway notice the client's closed connections before counting fds.
                time.sleep(settle_s)
                samples.append(Sample(first + count, rss_kib(pid), open_fds(pid), count / seconds))
            cpu = process_cpu_s(pid) - cpu0[0], time.process_time() - cpu0[1]
            report = driver.report(url, tally, total_s, requests, concurrency, cpu)
    finally:
        loop.run_until_complete(driver.aclose())
        loop.close()
    failures = report.failures()
    print("\n".join(report.lines()))
    return samples, failures + footprint_failures(samples)


def footprint_failures(samples: list[Sample], rss_ratio: float = 0.10, fd_slack: int = 5) -> list[str]:
    """RSS at the end within `rss_ratio` of the first sample; fds never more than `fd_slack` above it.

    Fewer fds than at the first sample is not a leak (the upstream pool shrinks
    as idle keep-alive connections expire), so only growth counts.
    """
    if len(samples) < 2:
        return ["need at least two samples (requests must exceed the batch size)"]
    first, last = samples[0], samples[-1]
    out = []
    growth = (last.rss_kib - first.rss_kib) / first.rss_kib
    if abs(growth) > rss_ratio:
        out.append(
            f"RSS went from {first.rss_kib} KiB at {first.requests} requests to "
            f"{last.rss_kib} KiB at {last.requests} ({growth:+.1%}, limit ±{rss_ratio:.0%})"
        )
    if max(s.fds for s in samples) - first.fds > fd_slack:
        out.append(f"open fds grew: {[s.fds for s in samples]} (limit +{fd_slack} over the first)")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print the footprint table; exit 1 when it grows or an invariant fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000, help="sample every N requests")
    parser.add_argument("--concurrency", type=int, default=96)
    parser.add_argument("--fault-every", type=int, default=10, help="one request in N faults (0 = none)")
    parser.add_argument("--reset-every", type=int, default=4)
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= args.requests <= 2_000_000:
        parser.error("need 1 <= --batch <= --requests <= 2,000,000")
    samples, failures = run_soak(
        args.requests, args.batch, args.concurrency, args.fault_every, args.reset_every
    )
    print(f"{'requests':>10} {'rss_kib':>10} {'rss_vs_first':>12} {'fds':>5} {'req_per_s':>9}")
    for s in samples:
        ratio = (s.rss_kib - samples[0].rss_kib) / samples[0].rss_kib
        print(f"{s.requests:>10} {s.rss_kib:>10} {ratio:>+12.1%} {s.fds:>5} {s.req_per_s:>9.0f}")
    for line in failures:
        print(f"FAIL: {line}")
    print("RESULT: " + ("FAIL" if failures else "PASS"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
