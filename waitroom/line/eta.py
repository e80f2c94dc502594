"""Estimated waits: fans ahead divided by the observed admission rate, smoothed.

The admission loop counts every admitted fan in the room's ``admitted_total``. Each process
watches that counter (every broadcaster tick, every join and status call) and keeps an
exponentially weighted moving average of its rate of change. Until something has been
admitted, and while nothing is being admitted, the estimate is ``None``: "unknown" is
honest, an invented number is not.
"""

from __future__ import annotations

import math

#: Time constant of the smoothing: a rate change shows fully after a few times this.
TAU_S = 15.0
#: Observations closer together than this are too noisy to form a rate from.
MIN_INTERVAL_S = 0.5
#: Below this many admissions per second the wait is called unknown (it would be years).
MIN_RATE = 1e-3


class RateEstimator:
    """EWMA of admissions per second from successive ``(admitted_total, now)`` samples."""

    __slots__ = ("_at", "_rate", "_total")

    def __init__(self) -> None:
        self._rate: float | None = None
        self._total: int | None = None
        self._at = 0.0

    @property
    def rate(self) -> float | None:
        """Admissions per second, or ``None`` while unknown."""
        if self._rate is None or self._rate < MIN_RATE:
            return None
        return self._rate

    def observe(self, total: int, now: float) -> None:
        """Feed the room's ``admitted_total`` as seen at ``now`` (unix seconds)."""
        if self._total is None or total < self._total / 2 or now < self._at - 60:
            # First sample, or the counter fell far (a room reloaded into an empty Redis) or
            # the clock stepped back: start afresh rather than form a bogus rate.
            if self._total is not None:
                self._rate = None
            self._total, self._at = total, now
            return
        elapsed = now - self._at
        if total < self._total or elapsed < MIN_INTERVAL_S:
            # A reading older than the last one (concurrent callers read the clock before
            # their Redis call and report after it, in any order), or too close to it.
            return
        instant = (total - self._total) / elapsed
        if self._rate is None:
            # Nothing admitted yet means nothing to estimate from, not a rate of zero.
            self._rate = instant if total > 0 else None
        else:
            # Irregular sampling: weigh by elapsed time so two quick samples count as one.
            alpha = 1.0 - math.exp(-elapsed / TAU_S)
            self._rate += alpha * (instant - self._rate)
        self._total, self._at = total, now

    def eta(self, fans_ahead: int) -> float | None:
        """Seconds until ``fans_ahead`` fans are admitted, rounded; ``None`` when unknown."""
        return eta_seconds(fans_ahead, self.rate)


def eta_seconds(fans_ahead: int, rate: float | None) -> float | None:
    """``fans_ahead / rate`` rounded so that it does not flicker from tick to tick.

    Whole seconds under a minute, 5 s steps under ten minutes, 30 s steps beyond: precision
    nobody can use only causes a WebSocket message per fan per tick.
    """
    if rate is None or rate < MIN_RATE:
        return None
    seconds = fans_ahead / rate
    step = 1.0 if seconds < 60 else 5.0 if seconds < 600 else 30.0
    return float(round(seconds / step) * step)
