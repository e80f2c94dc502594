"""Estimated waits: honest about the unknown, smooth, and robust to odd samples."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from waitroom.line.eta import MIN_INTERVAL_S, RateEstimator, eta_seconds

T = 1_800_000_000.0


def test_the_wait_is_unknown_until_something_has_been_admitted() -> None:
    estimator = RateEstimator()
    assert estimator.rate is None and estimator.eta(10) is None
    for i in range(10):
        estimator.observe(0, T + i)
    assert estimator.rate is None and estimator.eta(10) is None


def test_a_steady_admission_rate_gives_fans_ahead_divided_by_it() -> None:
    estimator = RateEstimator()
    for i in range(30):
        estimator.observe(5 * i, T + i)
    assert estimator.rate is not None and abs(estimator.rate - 5) < 1e-9
    assert estimator.eta(100) == 20.0
    assert estimator.eta(0) == 0.0


def test_the_rate_follows_a_change_smoothly() -> None:
    estimator = RateEstimator()
    total = 0
    for i in range(60):
        total += 10
        estimator.observe(total, T + i)
    before = estimator.rate
    total += 2
    estimator.observe(total, T + 60)
    after = estimator.rate
    assert before is not None and after is not None
    assert 2 < after < before  # moved towards 2/s, not jumped there


def test_a_stop_in_admissions_makes_the_wait_unknown_eventually() -> None:
    estimator = RateEstimator()
    for i in range(10):
        estimator.observe(10 * i, T + i)
    for i in range(10, 400):
        estimator.observe(90, T + i)
    assert estimator.rate is None


def test_samples_too_close_together_or_out_of_order_are_ignored() -> None:
    estimator = RateEstimator()
    estimator.observe(0, T)
    estimator.observe(100, T + MIN_INTERVAL_S / 2)
    assert estimator.rate is None
    estimator.observe(10, T + 1)
    estimator.observe(9, T + 2)  # a stale reading from a concurrent caller
    assert estimator.rate == 10.0


def test_a_counter_that_restarts_from_zero_starts_the_estimate_afresh() -> None:
    estimator = RateEstimator()
    for i in range(5):
        estimator.observe(1000 + 10 * i, T + i)
    estimator.observe(0, T + 6)
    assert estimator.rate is None


def test_waits_are_rounded_so_they_do_not_flicker() -> None:
    assert eta_seconds(10, 3.0) == 3.0
    assert eta_seconds(100, 1.0) == 100.0
    assert eta_seconds(101, 1.0) == 100.0
    assert eta_seconds(1000, 1.0) == 990.0
    assert eta_seconds(5, None) is None
    assert eta_seconds(5, 0.0) is None


@given(
    st.lists(st.tuples(st.floats(0, 10), st.integers(0, 50)), max_size=50),
    st.integers(0, 10**6),
)
def test_an_estimate_is_never_negative_nor_invented(
    steps: list[tuple[float, int]], fans_ahead: int
) -> None:
    estimator = RateEstimator()
    now, total = T, 0
    for gap, admitted in steps:
        now += gap
        total += admitted
        estimator.observe(total, now)
    eta = estimator.eta(fans_ahead)
    if total == 0:
        assert eta is None
    assert eta is None or eta >= 0
