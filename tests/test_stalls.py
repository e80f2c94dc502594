"""Event-loop stalls (waitroom.core.stalls): a callback that holds the loop is reported as
*running*, with its own frame among the stacks sampled; a loop thread that is off its core as
long is reported as *starved*; short hiccups are not reported at all."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from waitroom.core.stalls import STALLS, StallWatch

pytestmark = pytest.mark.anyio


def _count(cause: str) -> float:
    for metric in STALLS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("cause") == cause:
                return sample.value
    return 0.0


def _busy_for(seconds: float) -> None:
    """A callback that holds the loop on its CPU (a large reply decoded, say)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(range(1000))


def _off_cpu_for(seconds: float) -> None:
    """The loop thread off its core as long: what waiting for a core looks like from inside."""
    time.sleep(seconds)


async def _stall(watch: StallWatch, block: Any, seconds: float) -> None:
    await asyncio.sleep(0.1)  # a few heartbeats first
    block(seconds)
    await asyncio.sleep(0.1)  # the heartbeat after the stall reports it


async def test_a_long_callback_is_running_and_its_stack_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = StallWatch(threshold_s=0.1)
    before = _count("running"), _count("starved")
    watch.start()
    try:
        with caplog.at_level(logging.WARNING, logger="waitroom.stalls"):
            await _stall(watch, _busy_for, 0.4)
    finally:
        watch.stop()
    assert (_count("running"), _count("starved")) == (before[0] + 1, before[1])
    [record] = [r for r in caplog.records if r.getMessage() == "event loop stalled"]
    fields: dict[str, Any] = record.__dict__
    assert fields["cause"] == "running"
    assert fields["stall_ms"] >= 300 and fields["cpu_ms"] >= 0.5 * fields["stall_ms"]
    frames = [frame for stack in fields["stacks"] for frame in stack["frames"]]
    assert any(frame.endswith(" _busy_for") for frame in frames), fields["stacks"]


async def test_a_thread_off_its_core_is_starved() -> None:
    watch = StallWatch(threshold_s=0.1)
    before = _count("running"), _count("starved")
    watch.start()
    try:
        await _stall(watch, _off_cpu_for, 0.4)
    finally:
        watch.stop()
    assert (_count("running"), _count("starved")) == (before[0], before[1] + 1)


async def test_hiccups_under_the_threshold_are_not_stalls() -> None:
    watch = StallWatch(threshold_s=0.3)
    before = _count("running") + _count("starved")
    watch.start()
    try:
        for _ in range(3):
            await _stall(watch, _busy_for, 0.05)
    finally:
        watch.stop()
    assert _count("running") + _count("starved") == before


async def test_a_running_stall_is_logged_even_right_after_a_starved_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = StallWatch(threshold_s=0.1)
    watch.start()
    try:
        with caplog.at_level(logging.WARNING, logger="waitroom.stalls"):
            await _stall(watch, _off_cpu_for, 0.3)
            await _stall(watch, _busy_for, 0.3)  # within the second of the starved one
    finally:
        watch.stop()
    causes = [r.__dict__["cause"] for r in caplog.records if r.getMessage() == "event loop stalled"]
    assert causes == ["starved", "running"]
