"""Per-connection message rate limit: a token bucket, and a second bucket that tells a
burst (answered with `rate_limited`) from a sustained flood (the socket is closed).

Written here rather than with `limits`: this state lives and dies with one socket, is
touched on every message and must cost a few attributes, not a storage backend.
"""

from __future__ import annotations

from enum import Enum


class Verdict(Enum):
    ALLOW = "allow"
    REJECT = "reject"  # over the rate: answer rate_limited, keep the socket
    CLOSE = "close"  # over the rate for long: close with 1008


class MessageRateLimiter:
    """`rate` messages per second with bursts of `2 * rate`. Rejections fill a strike
    bucket that drains at `rate / 2` per second; past `2 * rate` strikes the flood counts
    as sustained. A client at twice the rate is closed after about four seconds; one
    slightly over the rate only ever sees `rate_limited`."""

    __slots__ = ("_capacity", "_last", "_rate", "_strikes", "_tokens")

    def __init__(self, rate: float, now: float) -> None:
        self._rate = rate
        self._capacity = 2 * rate
        self._tokens = self._capacity
        self._strikes = 0.0
        self._last = now

    def admit(self, now: float) -> Verdict:
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
        self._strikes = max(0.0, self._strikes - elapsed * self._rate / 2)
        if self._tokens >= 1:
            self._tokens -= 1
            return Verdict.ALLOW
        self._strikes += 1
        return Verdict.CLOSE if self._strikes > self._capacity else Verdict.REJECT
