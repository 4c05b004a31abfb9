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

Leases. A round trip per request costs a fraction of a millisecond and a share of the CPU, so a
process reserves up to `state.lease_fraction` (1%) of a key's per-minute request limit at once
(the requests TAT moves on by that many periods, as far as the bucket holds) and admits from
that lease without asking Redis. The key's token and budget state comes back with every
reservation and is trusted for `state.lease_s` (50 ms). A lease is topped up in the background
when half of it is used or half its time is gone, so under steady traffic no request waits on
Redis. Every admission comes out of a reservation, so together the processes never admit more
than the limit. What leases cost is the other way round: requests one process holds and has not
used yet are not there for the others (at most one lease a process), and they go back to Redis
when the lease goes stale (`lease_s` without a top-up) or the gateway stops. A token or budget
limit that other replicas' answers crossed is seen up to `lease_s` (plus `CHARGE_DELAY_S`)
late, as an answer already in flight is. A key with no request limit has an uncounted lease:
its token and budget state only. A key whose lease would hold fewer than 2 requests (every key,
with `lease_fraction: 0`) asks Redis at each admission: exact to the request.

One Lua script does a whole batch: the charges (tokens and spend, and leased requests given
back) of answers finished since the last batch, then the admissions and lease top-ups that
arrived in the meantime, in one round trip. A batch is gathered while the event loop runs the
handlers that are ready, so one round trip serves as many requests as arrived together. A
charge waits up to `CHARGE_DELAY_S` for the next admission to ride with (under steady traffic
a request costs one round trip, not two); the charges always go before the admissions of
their batch.

Charges are fire-and-forget for the request but never dropped: a charge Redis does not take is
kept (`triage_shared_state_pending_usd`) and sent again with the next batch, after
`state.retry_s`, and once more when the gateway stops. A batch whose answer was lost in a
timeout may have been applied, so a retried charge can count twice: spend errs high, never low.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

from router.config import Limits
from router.errors import RateLimited
from router.logs import event
from router.metrics import Metrics
from router.state import SharedState, Unavailable

__all__ = ["Admission", "SharedLimits"]

log = logging.getLogger("triage.state")

# KEYS: three per key name (requests TAT, tokens TAT, spend), a name's slot s at 3s+1..3s+3.
# ARGV: requests/min, tokens/min, budget USD (0 = off), the number of charges C, then C
# quadruples (slot, tokens, usd, leased requests given back), then a pair per admission (slot,
# requests wanted: 1 for one request, a lease's top-up, or 0 for its token and budget state
# alone). Returns (code, wait ms, requests granted) per admission: code 0 admitted, 1 budget
# spent, 2 tokens per minute, 3 requests per minute (nothing granted but the wait until one is).
_BATCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then return now end
  return tat
end
local function store(key, tat)
  if tat > now then
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.max(1, math.ceil(tat - now)))
  else
    redis.call('DEL', key)
  end
end
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local base, tokens = tonumber(ARGV[i]) * 3, tonumber(ARGV[i + 1])
  if tpm > 0 and tokens > 0 then
    store(KEYS[base + 2], tat_of(KEYS[base + 2]) + tokens * 60000 / tpm)
  end
  if tonumber(ARGV[i + 2]) > 0 then redis.call('INCRBYFLOAT', KEYS[base + 3], ARGV[i + 2]) end
  local back = tonumber(ARGV[i + 3])
  if rpm > 0 and back > 0 then
    store(KEYS[base + 1], tat_of(KEYS[base + 1]) - back * 60000 / rpm)
  end
  i = i + 4
end
local out = {}
while i <= #ARGV do
  local base, want = tonumber(ARGV[i]) * 3, tonumber(ARGV[i + 1])
  local code, wait, granted = 0, 0, 0
  if budget > 0 and (tonumber(redis.call('GET', KEYS[base + 3])) or 0) >= budget then
    code = 1
  end
  if code == 0 and tpm > 0 then
    local over = tat_of(KEYS[base + 2]) - now - (tpm - 1) * 60000 / tpm
    if over > 0 then code, wait = 2, over end
  end
  if code == 0 and rpm > 0 then
    local period = 60000 / rpm
    local tat = tat_of(KEYS[base + 1])
    local over = tat - now - (rpm - 1) * period
    if over > 0 then
      code, wait = 3, over
    else
      -- The bucket holds this many requests now; a lease takes as many as it asked for of them.
      granted = math.min(want, math.floor(-over / period) + 1)
      if granted > 0 then store(KEYS[base + 1], tat + granted * period) end
    end
  end
  out[#out + 1] = code
  out[#out + 1] = math.ceil(wait)
  out[#out + 1] = granted
  i = i + 2
end
return out
"""

# What an admission resolves to: (code, wait in ms); see `SharedLimits.check`.
Admission = asyncio.Future[tuple[int, int]]

# Longest a charge waits for an admission batch to go with, before it goes alone. Tokens and
# spend are charged after the answer in any case; this delays what other replicas see of them
# by at most 20 ms, and saves a round trip a request under steady traffic.
CHARGE_DELAY_S = 0.02

_TIMER_SLACK_S = 0.002

_ADMITTED = 0
_UNAVAILABLE = -1
_BUDGET, _TOKENS, _REQUESTS = 1, 2, 3
_LIMITS = {_BUDGET: "budget_exceeded", _TOKENS: "tokens_per_minute", _REQUESTS: "requests_per_minute"}


@dataclass(slots=True)
class _Charge:
    tokens: int = 0
    usd: float = 0.0
    returned: int = 0  # leased requests given back


@dataclass(slots=True)
class _Lease:
    """What this process holds of one key: requests reserved in Redis, and how fresh its view is."""

    left: int = 0
    fresh_until: float = 0.0  # event-loop time; past it, the next admission asks Redis
    full_until: float = 0.0  # Redis had no request to spare before this time
    refused: tuple[int, float] | None = None  # a token or budget refusal (code, until)
    asking: bool = False  # a top-up is in a batch
    waiting: list[Admission] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class SharedLimits:
    """Admits requests against their key's limits in Redis and charges what answers used."""

    def __init__(self, state: SharedState, limits: Limits, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        rpm = limits.requests_per_minute or 0
        self._limits = (rpm, limits.tokens_per_minute or 0, limits.budget_usd or 0)
        self._budget = limits.budget_usd
        self._fail_open = state.config.on_failure == "fail_open"
        self._script = state.script(_BATCH)
        # A lease's size in requests (0: uncounted, the key has no request limit); None: no
        # leases, every admission asks Redis.
        fraction = state.config.lease_fraction
        block = int(rpm * fraction)
        self._block: int | None = None if fraction == 0 or (rpm and block < 2) else block
        self._lease_s = state.config.lease_s
        self._leases: dict[str, _Lease] = {}
        self._yes: Admission | None = None
        # Admissions of the next batch: a request's, or (None) a top-up of the key's lease.
        self._admits: list[tuple[str, Admission | None]] = []
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

        Admitted from the key's lease when it holds a request, at once; otherwise the batch
        goes out at the caller's next await, so the round trip overlaps what the request does
        until it needs the answer.
        """
        loop = asyncio.get_running_loop()
        if self._block is None:
            fut: Admission = loop.create_future()
            if self.state.skipping:
                fut.set_result((_UNAVAILABLE, 0))
            else:
                self._admits.append((name, fut))
                self._gather()
            return fut
        lease = self._leases.get(name)
        if lease is None:
            lease = self._leases[name] = _Lease()
        now = loop.time()
        if lease.refused is not None:
            code, until = lease.refused
            if now < until:
                return _answered(loop, code, until - now)
            lease.refused = None
        counted = self._block > 0
        if counted and lease.left == 0 and now < lease.full_until:
            return _answered(loop, _REQUESTS, lease.full_until - now)
        if now < lease.fresh_until and (lease.left or not counted):
            if counted:
                lease.left -= 1
            if now > lease.fresh_until - self._lease_s / 2 or lease.left * 2 < self._block:
                self._top_up(name, lease)
            if self._yes is None:
                self._yes = _answered(loop, _ADMITTED, 0)
            return self._yes
        fut = loop.create_future()
        if self.state.skipping:
            fut.set_result((_UNAVAILABLE, 0))
            return fut
        lease.waiting.append(fut)
        self._top_up(name, lease)
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
        if code == _BUDGET:
            raise RateLimited(
                f"API key {name!r} has spent its ${self._budget:g} budget.", "budget_exceeded", None
            )
        which = _LIMITS[code].replace("_", "-")
        raise RateLimited(f"API key {name!r} is over its {which} limit.", _LIMITS[code], wait_ms / 1000)

    def charge(self, name: str, tokens: int, usd: float) -> None:
        """Count what a finished attempt used; written with the next batch."""
        pending = self._charge_of(name)
        pending.tokens += tokens
        pending.usd += usd
        self._soon_send()

    def _charge_of(self, name: str) -> _Charge:
        pending = self._charges.get(name)
        if pending is None:
            pending = self._charges[name] = _Charge()
        return pending

    def _soon_send(self) -> None:
        if not self._gathering and self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(CHARGE_DELAY_S, self._gather)

    def _top_up(self, name: str, lease: _Lease) -> None:
        if not lease.asking:
            lease.asking = True
            self._admits.append((name, None))
            self._gather()

    def _want(self, lease: _Lease, now: float) -> int:
        """Requests a top-up asks for: enough to fill the lease and serve who waits for it."""
        if not self._block or now < lease.full_until:
            return 0  # the token and budget state only
        return max(0, self._block - lease.left) + len(lease.waiting)

    def _settle(self, name: str, code: int, wait_ms: int, granted: int) -> None:
        """Take a top-up's answer into the key's lease and answer the requests waiting for it."""
        lease = self._leases[name]
        lease.asking = False
        loop = asyncio.get_running_loop()
        now = loop.time()
        if code in (_ADMITTED, _REQUESTS):  # the token and budget limits hold
            lease.fresh_until = now + self._lease_s
            lease.left += granted
            if code == _REQUESTS:
                lease.full_until = now + wait_ms / 1000
            if lease.timer is None:
                lease.timer = loop.call_at(lease.fresh_until, self._expire, name)
        elif code != _UNAVAILABLE:
            # Refused for tokens or the budget: nothing is admitted until the wait is over
            # (the budget: until the next look), so the lease's requests go back.
            lease.refused = (code, now + (wait_ms / 1000 if code == _TOKENS else self._lease_s))
            self._give_back(name, lease)
        waiting, lease.waiting = lease.waiting, []
        for fut in waiting:
            if fut.done():
                continue  # the client left
            if code in (_UNAVAILABLE, _BUDGET, _TOKENS):
                fut.set_result((code, wait_ms))
            elif not self._block:
                fut.set_result((_ADMITTED, 0))
            elif lease.left:
                lease.left -= 1
                fut.set_result((_ADMITTED, 0))
            elif now < lease.full_until:
                fut.set_result((_REQUESTS, math.ceil((lease.full_until - now) * 1000)))
            else:
                lease.waiting.append(fut)  # more waited than Redis granted: ask again
        if lease.waiting:
            self._top_up(name, lease)

    def _expire(self, name: str) -> None:
        """A lease gone stale with no top-up: its unused requests go back for the others."""
        lease = self._leases[name]
        lease.timer = None
        loop = asyncio.get_running_loop()
        # uvloop's timers keep whole milliseconds and may fire up to one early: a lease that
        # has less than that left counts as stale, or re-arming would spin until it is.
        if lease.asking or loop.time() < lease.fresh_until - _TIMER_SLACK_S:
            if not lease.asking:
                lease.timer = loop.call_at(lease.fresh_until, self._expire, name)
            return  # topped up meanwhile (a top-up on its way re-arms it when it lands)
        self._give_back(name, lease)

    def _give_back(self, name: str, lease: _Lease) -> None:
        if lease.left:
            self._charge_of(name).returned += lease.left
            lease.left = 0
            self._soon_send()

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

        loop = asyncio.get_running_loop()
        started = loop.time()
        args: list[object] = [*self._limits, len(charges)]
        for name, c in charges.items():
            args += (slot(name), c.tokens, f"{c.usd:.12f}", c.returned)
        for name, fut in admits:
            args += (slot(name), 1 if fut is not None else self._want(self._leases[name], started))
        try:
            result = await self.state.eval(self._script, keys, args, "limits")
            self.metrics.state_duration.observe(loop.time() - started)
            self.metrics.state_pending_usd.set(sum(c.usd for c in self._charges.values()))
            for n, (name, fut) in enumerate(admits):
                code, wait_ms, granted = (int(v) for v in result[3 * n : 3 * n + 3])
                if fut is None:
                    self._settle(name, code, wait_ms, granted)
                elif not fut.done():
                    fut.set_result((code, wait_ms))
        except Unavailable:
            self._keep(charges)
        finally:
            # Whatever went wrong (cancelled at shutdown included), no request waits forever.
            for name, fut in admits:
                if fut is None:
                    if self._leases[name].asking:
                        self._settle(name, _UNAVAILABLE, 0, 0)
                elif not fut.done():
                    fut.set_result((_UNAVAILABLE, 0))

    def _keep(self, charges: dict[str, _Charge]) -> None:
        """Charges Redis did not take go back in the queue, and are sent again after retry_s."""
        if not charges:
            return
        for name, c in charges.items():
            pending = self._charge_of(name)
            pending.tokens += c.tokens
            pending.usd += c.usd
            pending.returned += c.returned
        self.metrics.state_pending_usd.set(sum(c.usd for c in self._charges.values()))
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(self.state.config.retry_s, self._retried)

    def _retried(self) -> None:
        self._retry = None
        if self._charges:
            self._gather()

    async def aclose(self) -> None:
        """Give the leases back and send what is still queued (one last try), then stop retrying."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for name, lease in self._leases.items():
            if lease.timer is not None:
                lease.timer.cancel()
                lease.timer = None
            self._give_back(name, lease)
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
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


def _answered(loop: asyncio.AbstractEventLoop, code: int, wait_s: float) -> Admission:
    """An admission decided here, without Redis."""
    fut: Admission = loop.create_future()
    fut.set_result((code, math.ceil(wait_s * 1000)))
    return fut
