"""Token-bucket rate limits: the limits of joining, and the bucket arithmetic in pure Python.

The buckets live in Redis and are updated by Lua (``lua/bucket.lua``, spliced into
``join.lua``) so that every process shares them. :func:`take` is the
same arithmetic without I/O, step for step: the tests drive both with the same clock and
check they agree, and the HTTP layer uses :class:`Decision` to render the headers.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; a request
costs one token. A full bucket and an absent one are the same, so keys expire once full.
"""

from __future__ import annotations

import math

import msgspec


class Limit(msgspec.Struct, frozen=True):
    """``rate`` tokens per second, at most ``burst`` at once."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise ValueError(f"a limit needs rate > 0 and burst >= 1, got {self}")


#: Joins per client IP (per event): a household or an office behind one NAT still fits.
JOIN_PER_IP = Limit(rate=20.0, burst=40)
#: Joins per fan identity (per event): a join is idempotent, so retrying faster is abuse.
JOIN_PER_FAN = Limit(rate=2.0, burst=5)

#: Requests per client address (per event) that are not joins: polls of ``queue/me``,
#: WebSocket handshakes and challenges. The page polls every 2 s only when its WebSocket
#: fails, so 50/s sustains some 100 polling fans behind one NAT address (far more on
#: WebSockets, which cost one handshake each); the burst of 200 absorbs an office reloading.
ADDRESS_REQUESTS = Limit(rate=50.0, burst=200)

#: Float slack of the comparisons, as in bucket.lua (0.1/s * 10 s is not exactly 1.0).
_SLACK = 1e-6


class BucketState(msgspec.Struct, frozen=True):
    """What Redis stores: tokens left after the last write and that write's time."""

    tokens: float
    at_ms: int


class Decision(msgspec.Struct, frozen=True):
    """The outcome of asking a bucket for tokens."""

    allowed: bool
    limit: int
    remaining: int
    retry_after_ms: int
    reset_ms: int

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-*`` headers: the burst, whole tokens left, seconds until full."""
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.remaining)),
            "X-RateLimit-Reset": str(math.ceil(self.reset_ms / 1000)),
        }


def _whole(tokens: float) -> int:
    return math.floor(tokens + _SLACK)


def take(
    state: BucketState | None, limit: Limit, now_ms: int, cost: int = 1
) -> tuple[BucketState | None, Decision]:
    """Ask a bucket in ``state`` for ``cost`` tokens at ``now_ms``; the new state and decision.

    Mirrors ``bucket.lua``: a caller whose clock lags the last write refills nothing.
    """
    if state is None:
        tokens, at = float(limit.burst), now_ms
    elif now_ms > state.at_ms:
        tokens, at = state.tokens + (now_ms - state.at_ms) * limit.rate / 1000, now_ms
    else:
        tokens, at = state.tokens, state.at_ms
    tokens = min(float(limit.burst), tokens)
    if tokens + _SLACK < cost:
        return state, Decision(
            allowed=False,
            limit=limit.burst,
            remaining=_whole(tokens),
            retry_after_ms=math.ceil((cost - tokens) * 1000 / limit.rate),
            reset_ms=math.ceil((limit.burst - tokens) * 1000 / limit.rate),
        )
    # Redis stores the level with six decimals; round the same way to stay in step.
    left = float(f"{tokens - cost:.6f}")
    return BucketState(left, at), Decision(
        allowed=True,
        limit=limit.burst,
        remaining=_whole(tokens - cost),
        retry_after_ms=0,
        reset_ms=math.ceil((limit.burst - (tokens - cost)) * 1000 / limit.rate),
    )
