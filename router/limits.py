"""Per-key limits and spend in Redis, one set for every worker and replica.

Requests and tokens per minute are GCRA (the generic cell rate algorithm): per key and limit,
Redis holds one number, the theoretical arrival time (TAT) at which the key's bucket would be
full again. That is the in-process token bucket exactly (capacity = the per-minute limit,
refilled continuously), kept in one key with an expiry instead of a count and a timestamp.
A request is admitted while the bucket holds one more unit (TAT - now <= (limit - 1) periods,
a period being 60 s / limit); admitting one request moves the requests TAT one period on, and
the tokens of an answer move the tokens TAT on by that many periods after the fact (the
bucket may go negative, as in process). Time is Redis's own clock (`TIME`), so replicas with
skewed clocks still share one window. The spend per key is an `INCRBYFLOAT` counter with no
expiry: budgets hold across restarts of every gateway (and of Redis, when it persists).

One Lua script does a whole batch: the charges (tokens and spend) of answers finished since
the last batch, then the admission of every request that arrived in the meantime, in one
round trip. A batch is gathered while the event loop runs the handlers that are ready, so one
round trip serves as many requests as arrived together. A charge waits up to
`CHARGE_DELAY_S` for the next admission to ride with (under steady traffic a request costs
one round trip, not two); the charges always go before the admissions of their batch.

Charges are fire-and-forget for the request but never dropped: a charge Redis does not take is
kept (`triage_shared_state_pending_usd`) and sent again with the next batch, after
`state.retry_s`, and once more when the gateway stops. A batch whose answer was lost in a
timeout may have been applied, so a retried charge can count twice: spend errs high, never low.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from router.config import Limits
from router.errors import RateLimited
from router.logs import event
from router.metrics import Metrics
from router.state import SharedState, Unavailable

__all__ = ["Admission", "SharedLimits"]

log = logging.getLogger("triage.state")

# KEYS: three per key name (requests TAT, tokens TAT, spend), a name's slot s at 3s+1..3s+3.
# ARGV: requests/min, tokens/min, budget USD (0 = off), the number of charges C, then C
# triples (slot, tokens, usd), then one slot per admission. Returns (code, wait ms) per
# admission: 0 admitted, 1 budget spent, 2 tokens per minute, 3 requests per minute.
_BATCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then return now end
  return tat
end
local function advance(key, tat, cells, per_min)
  tat = tat + cells * 60000 / per_min
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.max(1, math.ceil(tat - now)))
end
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local base, tokens = tonumber(ARGV[i]) * 3, tonumber(ARGV[i + 1])
  if tpm > 0 and tokens > 0 then advance(KEYS[base + 2], tat_of(KEYS[base + 2]), tokens, tpm) end
  if tonumber(ARGV[i + 2]) > 0 then redis.call('INCRBYFLOAT', KEYS[base + 3], ARGV[i + 2]) end
  i = i + 3
end
local out = {}
while i <= #ARGV do
  local base = tonumber(ARGV[i]) * 3
  local code, wait = 0, 0
  if budget > 0 and (tonumber(redis.call('GET', KEYS[base + 3])) or 0) >= budget then
    code = 1
  end
  if code == 0 and tpm > 0 then
    local over = tat_of(KEYS[base + 2]) - now - (tpm - 1) * 60000 / tpm
    if over > 0 then code, wait = 2, over end
  end
  if code == 0 and rpm > 0 then
    local tat = tat_of(KEYS[base + 1])
    local over = tat - now - (rpm - 1) * 60000 / rpm
    if over > 0 then code, wait = 3, over else advance(KEYS[base + 1], tat, 1, rpm) end
  end
  out[#out + 1] = code
  out[#out + 1] = math.ceil(wait)
  i = i + 1
end
return out
"""

# What an admission resolves to: (code, wait in ms); see `SharedLimits.check`.
Admission = asyncio.Future[tuple[int, int]]

# Longest a charge waits for an admission batch to go with, before it goes alone. Tokens and
# spend are charged after the answer in any case; this delays what other replicas see of them
# by at most 20 ms, and saves a round trip a request under steady traffic.
CHARGE_DELAY_S = 0.02

_ADMITTED = 0
_UNAVAILABLE = -1
_LIMITS = {1: "budget_exceeded", 2: "tokens_per_minute", 3: "requests_per_minute"}


@dataclass(slots=True)
class _Charge:
    tokens: int = 0
    usd: float = 0.0


class SharedLimits:
    """Admits requests against their key's limits in Redis and charges what answers used."""

    def __init__(self, state: SharedState, limits: Limits, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        self._limits = (
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.budget_usd or 0,
        )
        self._budget = limits.budget_usd
        self._fail_open = state.config.on_failure == "fail_open"
        self._script = state.script(_BATCH)
        self._admits: list[tuple[str, Admission]] = []
        self._charges: dict[str, _Charge] = {}
        self._gathering = False
        self._retry: asyncio.TimerHandle | None = None
        self._soon: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._keys: dict[str, tuple[str, str, str]] = {}

    def _keys_of(self, name: str) -> tuple[str, str, str]:
        keys = self._keys.get(name)
        if keys is None:
            key = self.state.key
            keys = self._keys[name] = (
                key("limits", name, "requests"),
                key("limits", name, "tokens"),
                key("spend", name),
            )
        return keys

    def admit(self, name: str) -> Admission:
        """Start the admission of one request of key `name`; `check` its result later.

        The batch goes out at the caller's next await, so the round trip overlaps what the
        request does until it needs the answer.
        """
        fut: Admission = asyncio.get_running_loop().create_future()
        if self.state.skipping:
            fut.set_result((_UNAVAILABLE, 0))
            return fut
        self._admits.append((name, fut))
        self._gather()
        return fut

    async def check(self, name: str, admission: Admission) -> None:
        """Wait for an admission; raise RateLimited when a limit (or, fail_closed, Redis) refuses."""
        code, wait_ms = await admission
        if code == _ADMITTED:
            return
        if code == _UNAVAILABLE:
            if self._fail_open:
                self.metrics.state_unchecked.labels("served").inc()
                return
            self.metrics.state_unchecked.labels("refused").inc()
            raise RateLimited(
                "The gateway cannot check this key's limits right now; retry shortly.",
                "shared_state_unavailable",
                max(self.state.retry_in_s(), 1.0),
            )
        if code == 1:
            raise RateLimited(
                f"API key {name!r} has spent its ${self._budget:g} budget.", "budget_exceeded", None
            )
        which = _LIMITS[code].replace("_", "-")
        raise RateLimited(f"API key {name!r} is over its {which} limit.", _LIMITS[code], wait_ms / 1000)

    def charge(self, name: str, tokens: int, usd: float) -> None:
        """Count what a finished attempt used; written with the next batch."""
        pending = self._charges.get(name)
        if pending is None:
            pending = self._charges[name] = _Charge()
        pending.tokens += tokens
        pending.usd += usd
        if not self._gathering and self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(CHARGE_DELAY_S, self._gather)

    def _gather(self) -> None:
        # The first admission or charge of a batch starts its task; the others of the same
        # turn of the event loop join it before the task first runs.
        if not self._gathering:
            self._gathering = True
            task = asyncio.get_running_loop().create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        self._gathering = False
        if self._soon is not None:
            self._soon.cancel()  # the charges go with this batch
            self._soon = None
        admits, self._admits = self._admits, []
        charges, self._charges = self._charges, {}
        if not admits and not charges:
            return
        slots: dict[str, int] = {}
        keys: list[str] = []

        def slot(name: str) -> int:
            s = slots.get(name)
            if s is None:
                s = slots[name] = len(slots)
                keys.extend(self._keys_of(name))
            return s

        args: list[object] = [*self._limits, len(charges)]
        for name, c in charges.items():
            args += (slot(name), c.tokens, f"{c.usd:.12f}")
        args += [slot(name) for name, _ in admits]
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result = await self.state.eval(self._script, keys, args, "limits")
            self.metrics.state_duration.observe(loop.time() - started)
            self.metrics.state_pending_usd.set(sum(c.usd for c in self._charges.values()))
            for n, (_, fut) in enumerate(admits):
                if not fut.done():
                    fut.set_result((int(result[2 * n]), int(result[2 * n + 1])))
        except Unavailable:
            self._keep(charges)
        finally:
            # Whatever went wrong (cancelled at shutdown included), no request waits forever.
            for _, fut in admits:
                if not fut.done():
                    fut.set_result((_UNAVAILABLE, 0))

    def _keep(self, charges: dict[str, _Charge]) -> None:
        """Charges Redis did not take go back in the queue, and are sent again after retry_s."""
        if not charges:
            return
        for name, c in charges.items():
            pending = self._charges.setdefault(name, _Charge())
            pending.tokens += c.tokens
            pending.usd += c.usd
        self.metrics.state_pending_usd.set(sum(c.usd for c in self._charges.values()))
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(self.state.config.retry_s, self._retried)

    def _retried(self) -> None:
        self._retry = None
        if self._charges:
            self._gather()

    async def aclose(self) -> None:
        """Send what is still queued (one last try), then stop retrying."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._charges:
            self.state.try_now()  # one last try, even right after a failure
            await self._send()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._charges:
            event(
                log,
                logging.ERROR,
                "spend not written to the shared state",
                keys=",".join(sorted(self._charges)),
                usd=f"{sum(c.usd for c in self._charges.values()):.6f}",
            )
