"""The admission arithmetic: the token bucket and the decision, over arbitrary histories."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from admission.bucket import (
    TokenBucket,
    admit_count,
    burst_for,
    decide,
    refill,
    retune,
    take,
    whole,
)

rates = st.floats(min_value=0.01, max_value=100_000, allow_nan=False, allow_infinity=False)
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("tick"),
            st.floats(min_value=0, max_value=3),  # seconds since the last tick
            st.integers(min_value=0, max_value=500_000),  # fans waiting at the head
        ),
        st.tuples(st.just("rate"), rates),
        st.tuples(st.just("complete"), st.integers(min_value=0, max_value=1000)),
        st.tuples(st.just("max_active"), st.integers(min_value=1, max_value=5000)),
        st.tuples(st.just("paused"), st.booleans()),
        st.tuples(st.just("sold_out"), st.booleans()),
        st.tuples(st.just("clock_back"), st.floats(min_value=0, max_value=1)),
    ),
    max_size=80,
)


def test_a_fractional_rate_admits_one_fan_every_two_seconds() -> None:
    bucket = TokenBucket.start(0.5, now=0.0)
    admitted = []
    for t in range(1, 11):
        bucket, n = decide(
            bucket, float(t), rate=0.5, max_active=100, active=0, paused=False, sold_out=False
        )
        bucket = take(bucket, n)
        admitted.append(n)
    # The starting token, then one per 2 s: never two at once, no fraction lost.
    assert sum(admitted) == 6
    assert max(admitted) == 1


def test_the_burst_is_one_second_of_the_rate_and_at_least_two_fans() -> None:
    assert burst_for(0.1) == 2.0
    assert burst_for(250.0) == 250.0
    bucket = refill(TokenBucket.start(100.0, now=0.0), now=3600.0)
    assert bucket.tokens == 100.0


def test_slowing_down_drops_the_tokens_above_the_new_burst_at_once() -> None:
    bucket = refill(TokenBucket.start(1000.0, now=0.0), now=5.0)
    assert bucket.tokens == 1000.0
    slower = retune(bucket, 10.0, now=5.0)
    assert slower.tokens == 10.0 and slower.burst == 10.0


def test_a_clock_that_goes_back_refills_nothing() -> None:
    bucket = TokenBucket(rate=10, burst=10, tokens=2.0, at=100.0)
    assert refill(bucket, 99.0) == bucket
    assert refill(bucket, 100.5).tokens == pytest.approx(7.0)


def test_paused_sold_out_or_full_admits_nobody() -> None:
    assert admit_count(tokens=50.0, active=10, max_active=100, paused=True, sold_out=False) == 0
    assert admit_count(tokens=50.0, active=10, max_active=100, paused=False, sold_out=True) == 0
    assert admit_count(tokens=50.0, active=100, max_active=100, paused=False, sold_out=False) == 0
    assert admit_count(tokens=50.0, active=120, max_active=100, paused=False, sold_out=False) == 0
    assert admit_count(tokens=50.9, active=90, max_active=100, paused=False, sold_out=False) == 10
    assert admit_count(tokens=7.99, active=0, max_active=100, paused=False, sold_out=False) == 7


def test_taking_more_than_the_bucket_holds_is_a_bug() -> None:
    with pytest.raises(ValueError):
        take(TokenBucket(rate=1, burst=1, tokens=0.5, at=0), 1)
    with pytest.raises(ValueError):
        retune(TokenBucket.start(1, 0), 0.0, 1.0)


@hyp_settings(deadline=None)
@given(
    start_rate=rates,
    max_active=st.integers(min_value=1, max_value=5000),
    history=steps,
)
def test_admissions_never_outrun_the_rate_nor_the_cap(
    start_rate: float, max_active: int, history: list[tuple[Any, ...]]
) -> None:
    """Over any history: admitted in any interval <= integral of the rate + the burst at its
    start, and no admission takes the active passes above max_active."""
    clock = 0.0
    rate = start_rate
    bucket = TokenBucket.start(rate, clock)
    active = 0
    paused = sold_out = False
    # (time, admitted so far, integral of the rate so far, burst in force) at every tick.
    marks: list[tuple[float, int, float, float]] = [(clock, 0, 0.0, bucket.burst)]
    admitted_total = 0
    integral = 0.0
    for step in history:
        kind = step[0]
        if kind == "tick":
            dt, waiting = float(step[1]), int(step[2])
            integral += rate * dt
            clock += dt
            bucket, n = decide(
                bucket,
                clock,
                rate=rate,
                max_active=max_active,
                active=active,
                paused=paused,
                sold_out=sold_out,
            )
            got = min(n, waiting)  # the line may hold fewer fans than the tokens allow
            bucket = take(bucket, got)
            before = active
            active += got
            admitted_total += got
            assert got == 0 or active <= max_active
            assert active <= max(max_active, before)
            if paused or sold_out:
                assert got == 0
            marks.append((clock, admitted_total, integral, bucket.burst))
        elif kind == "rate":
            # The new rate counts from now on: the loop reads it at its next tick.
            bucket = retune(bucket, float(step[1]), clock)
            rate = float(step[1])
            marks.append((clock, admitted_total, integral, bucket.burst))
        elif kind == "complete":
            active = max(0, active - int(step[1]))
        elif kind == "max_active":
            max_active = int(step[1])
        elif kind == "paused":
            paused = bool(step[1])
        elif kind == "sold_out":
            sold_out = bool(step[1])
        elif kind == "clock_back":
            # The loop's monotonic clock never goes back, but a bucket must survive it.
            bucket, n = decide(
                bucket,
                clock - float(step[1]),
                rate=rate,
                max_active=max_active,
                active=active,
                paused=True,
                sold_out=False,
            )
            assert n == 0
        assert 0 <= bucket.tokens <= bucket.burst + 1e-9
    for i, (_, count_i, integral_i, burst_i) in enumerate(marks):
        for _, count_j, integral_j, _ in marks[i + 1 :]:
            bound = integral_j - integral_i + burst_i
            assert count_j - count_i <= math.floor(bound + 1e-6), (i, bound)


@hyp_settings(deadline=None, max_examples=60)
@given(rate=rates, seconds=st.integers(min_value=1, max_value=120))
def test_with_a_long_line_the_admitted_rate_is_the_configured_rate(
    rate: float, seconds: int
) -> None:
    """Ticking every 50 ms with fans always waiting, the count is rate x time within one fan:
    no fraction of a token is ever lost, at any rate (0.99999/s included)."""
    bucket = TokenBucket.start(rate, 0.0)
    total = 0
    ticks = seconds * 20
    for i in range(1, ticks + 1):
        bucket, n = decide(
            bucket, i * 0.05, rate=rate, max_active=10**9, active=0, paused=False, sold_out=False
        )
        bucket = take(bucket, n)
        total += n
    expected = rate * seconds
    assert expected - 1 - 1e-6 <= total <= expected + 1 + 1e-6
    assert whole(bucket.tokens) <= 1
