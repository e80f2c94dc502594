"""Token buckets: the pure arithmetic, and bucket.lua (spliced into join.lua) agreeing with it
on real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from tests.queue_support import redis_client
from waitroom.core.keys import Keys
from waitroom.core.lua_scripts import Script
from waitroom.core.settings import Settings
from waitroom.line.ratelimit import JOIN_PER_FAN, JOIN_PER_IP, BucketState, Decision, Limit, take

T0 = 1_800_000_000_000

#: bucket.lua on its own, as join.lua uses it: take ``cost`` tokens if the bucket holds them.
_PROBE_BODY = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now_ms, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local assessed = bucket_assess(KEYS[1], rate, burst, now_ms, cost)
if not assessed.ok then
  return {0, bucket_whole(assessed.tokens), assessed.retry_ms,
          bucket_reset_ms(assessed.tokens, rate, burst)}
end
local left, reset_ms = bucket_take(KEYS[1], assessed, rate, burst, cost)
return {1, bucket_whole(left), 0, reset_ms}
"""


class _BucketProbe(Script):
    def __init__(self) -> None:
        super().__init__("waitroom.line.lua", "bucket.lua")
        self.name = "bucket-probe"
        self.source += _PROBE_BODY
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()


_PROBE = _BucketProbe()


async def take_in_redis(
    redis: Redis, key: str, limit: Limit, *, now_ms: int, cost: int = 1
) -> Decision:
    """Take ``cost`` tokens from the bucket at ``key`` with bucket.lua, in Redis."""
    allowed, remaining, retry_ms, reset_ms = await _PROBE(
        redis, [key], [limit.rate, limit.burst, now_ms, cost]
    )
    return Decision(
        allowed=allowed == 1,
        limit=limit.burst,
        remaining=int(remaining),
        retry_after_ms=int(retry_ms),
        reset_ms=int(reset_ms),
    )


def test_a_fresh_bucket_allows_a_burst_then_refuses() -> None:
    limit = Limit(rate=2, burst=5)
    state: BucketState | None = None
    for left in (4, 3, 2, 1, 0):
        state, decision = take(state, limit, T0)
        assert decision.allowed and decision.remaining == left
    state, decision = take(state, limit, T0)
    assert not decision.allowed
    assert (decision.remaining, decision.retry_after_ms, decision.reset_ms) == (0, 500, 2500)


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    limit = Limit(rate=2, burst=5)
    state = BucketState(tokens=0.0, at_ms=T0)
    assert not take(state, limit, T0 + 499)[1].allowed
    assert take(state, limit, T0 + 500)[1].allowed
    assert take(state, limit, T0 + 3_600_000)[1].remaining == 4  # capped at the burst


def test_a_lagging_clock_refills_nothing_and_does_not_move_time_back() -> None:
    limit = Limit(rate=1, burst=2)
    state, _ = take(BucketState(1.0, T0), limit, T0 - 5000)
    assert state == BucketState(0.0, T0)


def test_fractional_rates_do_not_lose_a_token_to_rounding() -> None:
    limit = Limit(rate=0.1, burst=1)
    state, decision = take(None, limit, T0)
    assert decision.allowed
    assert take(state, limit, T0 + 10_000)[1].allowed


def test_the_headers_show_the_burst_what_is_left_and_seconds_until_full() -> None:
    decision = Decision(allowed=False, limit=40, remaining=0, retry_after_ms=50, reset_ms=1950)
    assert decision.headers() == {
        "X-RateLimit-Limit": "40",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "2",
    }


def test_the_join_limits_are_sane() -> None:
    assert JOIN_PER_IP.burst >= JOIN_PER_FAN.burst and JOIN_PER_IP.rate >= JOIN_PER_FAN.rate
    with pytest.raises(ValueError):
        Limit(rate=0, burst=1)


@pytest.mark.anyio
async def test_the_script_keeps_the_bucket_only_until_it_is_full_again(settings: Settings) -> None:
    key = Keys(settings.redis_prefix).event("rl-test").bucket("test", secrets.token_hex(4))
    async with redis_client(settings) as r:
        decision = await take_in_redis(r, key, Limit(rate=1, burst=3), now_ms=T0)
        assert (decision.allowed, decision.remaining, decision.reset_ms) == (True, 2, 1000)
        assert 1000 < await r.pttl(key) <= 2000
        refused = await take_in_redis(r, key, Limit(rate=1, burst=3), now_ms=T0, cost=5)
        assert (refused.allowed, refused.retry_after_ms) == (False, 3000)
        await r.delete(key)


steps = st.lists(
    st.tuples(st.integers(min_value=-2000, max_value=5000), st.integers(min_value=0, max_value=3)),
    min_size=1,
    max_size=30,
)
limits = st.builds(
    Limit,
    rate=st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0, 20.0, 1000.0]),
    burst=st.integers(min_value=1, max_value=50),
)


async def _compare(settings: Settings, limit: Limit, moves: list[tuple[int, int]]) -> None:
    key = Keys(settings.redis_prefix).event("rl-test").bucket("agree", secrets.token_hex(6))
    state: BucketState | None = None
    now = T0
    async with redis_client(settings) as r:
        try:
            for delta, cost in moves:
                now += delta
                state, expected = take(state, limit, now, cost)
                got = await take_in_redis(r, key, limit, now_ms=now, cost=cost)
                assert got == expected, (limit, moves)
        finally:
            await r.delete(key)


@hyp_settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limit=limits, moves=steps)
def test_the_lua_bucket_and_the_pure_one_agree(
    settings: Settings, limit: Limit, moves: list[tuple[int, int]]
) -> None:
    asyncio.run(_compare(settings, limit, moves))
