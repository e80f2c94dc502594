"""The pure rules of payments: the state machine and the retry schedule."""

from __future__ import annotations

import inspect
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers import payments
from workers.payments import (
    MAX_ATTEMPTS,
    TRANSITIONS,
    GiveUp,
    Retry,
    after_transient_error,
    backoff,
    backoff_ceiling,
    can_move,
    transition,
)

attempts = st.integers(min_value=1, max_value=10_000)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
bases = st.floats(min_value=0.001, max_value=10)
caps = st.floats(min_value=0.01, max_value=3600)
seeds = st.integers(min_value=0, max_value=2**32)


def test_payments_only_move_forward_and_end_in_succeeded_or_failed() -> None:
    assert can_move("pending", "processing")
    assert can_move("processing", "succeeded") and can_move("processing", "failed")
    assert can_move("processing", "pending")  # a retry, a hand-back or a lost heartbeat
    assert not can_move("pending", "succeeded")
    assert TRANSITIONS["succeeded"] == frozenset()
    assert not any(can_move("succeeded", other) for other in TRANSITIONS)
    # A failed payment moves on only when reconciliation finds the provider did charge and
    # completes the order with that charge; it never goes back to being worked on.
    assert TRANSITIONS["failed"] == frozenset({"succeeded"})
    assert not can_move("failed", "pending") and not can_move("failed", "processing")


def test_every_state_change_the_workers_write_is_a_move_the_machine_allows() -> None:
    assert transition("processing", "succeeded") == "state = 'succeeded'"
    with pytest.raises(ValueError, match="cannot move from succeeded to pending"):
        transition("succeeded", "pending")
    with pytest.raises(ValueError):
        transition("pending", "failed")
    # The statements of the pool are built from transition(): no state literal is set by hand.
    source = inspect.getsource(payments)
    assert "SET state" not in source


@given(attempts, bases, caps)
def test_the_backoff_ceiling_never_shrinks_and_never_passes_the_cap(
    attempt: int, base: float, cap: float
) -> None:
    ceiling = backoff_ceiling(attempt, base=base, cap=cap)
    assert 0 < ceiling <= cap
    assert backoff_ceiling(attempt + 1, base=base, cap=cap) >= ceiling


@given(attempts, bases, caps)
def test_the_ceiling_doubles_until_it_reaches_the_cap(
    attempt: int, base: float, cap: float
) -> None:
    ceiling = backoff_ceiling(attempt, base=base, cap=cap)
    following = backoff_ceiling(attempt + 1, base=base, cap=cap)
    assert following == min(cap, ceiling * 2) or following == cap


@given(attempts, times, seeds, bases, caps)
def test_the_next_attempt_is_never_before_now_nor_past_the_ceiling(
    attempt: int, now: float, seed: int, base: float, cap: float
) -> None:
    at = backoff(attempt, now, random.Random(seed), base=base, cap=cap)
    assert now <= at <= now + backoff_ceiling(attempt, base=base, cap=cap)


@given(seeds)
def test_full_jitter_spreads_the_retries_of_a_failed_burst(seed: int) -> None:
    rng = random.Random(seed)
    waits = [backoff(4, 0.0, rng, base=1.0, cap=30.0) for _ in range(200)]
    # Uniform over [0, 8): a fixed schedule would put all 200 on one instant.
    assert len(set(waits)) > 150
    assert min(waits) < 2 and max(waits) > 6


@given(attempts, times, seeds)
def test_transient_errors_give_up_after_max_attempts_unless_money_moved(
    attempt: int, now: float, seed: int
) -> None:
    step = after_transient_error(attempt, now, random.Random(seed), max_attempts=MAX_ATTEMPTS)
    if attempt < MAX_ATTEMPTS:
        assert isinstance(step, Retry) and step.at >= now
    else:
        assert isinstance(step, GiveUp)
    charged = after_transient_error(
        attempt, now, random.Random(seed), max_attempts=MAX_ATTEMPTS, must_finish=True
    )
    assert isinstance(charged, Retry)
