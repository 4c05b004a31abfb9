"""Client authentication and per-key limits.

Keys are compared by their SHA-256 digest, so a keys file never holds a key in
clear and the gateway keeps only digests in memory. Each key has a name from
config; names, never key values, appear in metrics and logs.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from router.config import AuthConfig
from router.errors import AuthError, RateLimited
from router.limits import SharedLimits

__all__ = ["Authenticator", "KeyState", "check_token", "load_keys", "retry_after_header"]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(config: AuthConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Digest → key name, from `keys_env` and `keys_file`."""
    env = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    if config.keys_env:
        for i, item in enumerate(p.strip() for p in env.get(config.keys_env, "").split(",")):
            if not item:
                continue
            name, sep, key = item.partition(":")
            if not sep:
                name, key = f"key{i + 1}", item
            keys[_digest(key)] = name
    if config.keys_file:
        for n, line in enumerate(Path(config.keys_file).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[1]) != 64:
                raise ValueError(f"{config.keys_file}:{n}: expected `name sha256-hex`")
            keys[parts[1].lower()] = parts[0]
    return keys


class _Bucket:
    """A token bucket of `per_minute` capacity refilled continuously; may go negative."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def wait_s(self, need: float) -> float:
        """Seconds until `need` tokens are there (0 when they are now)."""
        self._refill()
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.tokens -= amount


@dataclass
class KeyState:
    """One key's identity, buckets and spend; with `shared`, its limits and spend live in Redis."""

    name: str
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    spent_usd: float = 0.0
    budget_usd: float | None = None
    shared: SharedLimits | None = None

    def admit(self) -> None:
        """Take one request from the limits or raise RateLimited with a Retry-After."""
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            raise RateLimited(
                f"API key {self.name!r} has spent its ${self.budget_usd:g} budget.",
                "budget_exceeded",
                None,
            )
        if self.tokens is not None:
            wait = self.tokens.wait_s(1.0)
            if wait > 0:
                raise RateLimited(
                    f"API key {self.name!r} is over its tokens-per-minute limit.",
                    "tokens_per_minute",
                    wait,
                )
        if self.requests is not None:
            wait = self.requests.wait_s(1.0)
            if wait > 0:
                raise RateLimited(
                    f"API key {self.name!r} is over its requests-per-minute limit.",
                    "requests_per_minute",
                    wait,
                )
            self.requests.take(1.0)

    def charge(self, tokens: int, usd: float) -> None:
        """Count what a finished attempt used (in Redis too, when the limits are shared)."""
        if self.tokens is not None:
            self.tokens.take(tokens)
        self.spent_usd += usd
        if self.shared is not None:
            self.shared.charge(self.name, tokens, usd)


class Authenticator:
    """Checks bearer keys and holds each key's limit state.

    With `shared` (the `state:` section) the limits and spend are kept in Redis for every
    worker and replica; otherwise in this process (the embedded default).
    """

    def __init__(
        self,
        config: AuthConfig,
        environ: Mapping[str, str] | None = None,
        shared: SharedLimits | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self._keys = load_keys(config, env)
        self.enabled = bool(config.keys_env or config.keys_file)
        limits = config.limits
        local = shared is None
        self._states = {
            name: KeyState(
                name,
                _Bucket(limits.requests_per_minute) if local and limits.requests_per_minute else None,
                _Bucket(limits.tokens_per_minute) if local and limits.tokens_per_minute else None,
                budget_usd=limits.budget_usd if local else None,
                shared=shared,
            )
            for name in set(self._keys.values())
        }
        self.metrics_token = env.get(config.metrics_token_env) if config.metrics_token_env else None
        self.admin_token = env.get(config.admin_token_env) if config.admin_token_env else None

    @property
    def names(self) -> list[str]:
        """Every key name (for pre-created metric labels)."""
        return sorted(self._states)

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> KeyState | None:
        """The caller's key state; None when auth is off; AuthError when the key is bad.

        The key comes as `Authorization: Bearer <key>` (OpenAI's clients) or as
        `x-api-key: <key>` (Anthropic's); either works on every endpoint.
        """
        if not self.enabled:
            return None
        key = _bearer(authorization) or (api_key.strip() if api_key else None)
        if not key:
            raise AuthError("Missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`.")
        name = self._keys.get(_digest(key))
        if name is None:
            raise AuthError("Incorrect API key provided.")
        return self._states[name]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def check_token(expected: str | None, authorization: str | None) -> None:
    """Require `Bearer <expected>` when a token is configured."""
    if expected is None:
        return
    given = _bearer(authorization)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthError("This endpoint needs its own bearer token.")


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """A Retry-After header (whole seconds, at least 1) when a wait is known."""
    return {} if seconds is None else {"retry-after": str(max(1, math.ceil(seconds)))}
