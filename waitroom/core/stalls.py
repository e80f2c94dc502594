"""Event-loop stalls: how long, whether the loop was running or waiting for a core, and where.

The loop-lag histogram says *that* a timer fired late; it cannot say why. A stall has two
very different causes, and the cure for one does nothing for the other:

- **running**: one callback held the loop (a large reply decoded, a fan-out built, a
  collection): the code is the cause, and its stack says where;
- **starved**: the process was ready to run but the machine had no core for it (other
  processes took them): the code is not the cause, capacity is.

A heartbeat on the loop notes the wall clock and the loop thread's own CPU clock every
:data:`BEAT_S`. A watchdog thread looks every :data:`BEAT_S` too, and while the heartbeat is
late it samples the loop thread's stack (``sys._current_frames``; the GIL is handed over at
least every switch interval, so the watchdog gets to look even while a callback runs). When
the heartbeat comes back after a gap longer than the threshold, it reports the stall on the
loop, where observing a metric and logging are safe: its length, the CPU the loop thread used
meanwhile (``cpu / wall`` near 1 is *running*, near 0 *starved*), and the innermost frames
of our code seen in the samples.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
from types import FrameType

from prometheus_client import Counter, Histogram

log = logging.getLogger("waitroom.stalls")

#: Seconds between two heartbeats (and two looks of the watchdog): half the default
#: threshold. Each look of the watchdog thread takes the GIL from the loop for a moment.
BEAT_S = 0.05
#: A share of the stall's wall time spent on the loop thread's CPU at or above this is
#: *running* (the loop's own work), below it *starved* (waiting for a core).
RUNNING_SHARE = 0.5
#: Frames kept of each stack sample, innermost first.
FRAMES = 6
#: Stalls of one cause logged at most this often (each is counted in the metrics regardless).
LOG_EVERY_S = 1.0

STALLS = Histogram(
    "waitroom_event_loop_stall_seconds",
    "Event-loop stalls longer than the threshold (WAITROOM_STALL_MS), by cause: 'running'"
    " (one callback held the loop: the log has its stack) or 'starved' (the process waited"
    " for a core).",
    ["cause"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STALL_CPU = Counter(
    "waitroom_event_loop_stall_cpu_seconds",
    "CPU the event-loop thread used during its stalls, by cause.",
    ["cause"],
)


def _cpu_clock(thread_id: int) -> int | None:
    """The CPU clock of one thread of this process, where the platform has one."""
    try:
        return time.pthread_getcpuclockid(thread_id)
    except (AttributeError, OSError):  # not Linux/BSD: stalls are still timed, not split
        return None


def _frames(frame: FrameType | None) -> list[str]:
    """The innermost frames of a stack, ``file:line function``, project code preferred.

    Read straight off the frames, innermost first, without their source lines: the watchdog
    samples while the loop thread holds the GIL, and each switch to it waits a switch
    interval, so ``traceback.extract_stack`` (which reads every frame's line through
    linecache) took a sample so long that it landed after the stall had been reported, and
    the report had no stack (seen as a flaky test)."""
    summary: list[tuple[str, int, str]] = []
    while frame is not None and len(summary) < 40:
        code = frame.f_code
        summary.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    ours = [f for f in summary if "site-packages" not in f[0] and "/lib/python" not in f[0]]
    return [
        f"{'/'.join(filename.rsplit('/', 2)[-2:])}:{lineno} {name}"
        for filename, lineno, name in (ours or summary)[:FRAMES]
    ]


class StallWatch:
    """Times the event loop's stalls and tells running from starved (see the module).

    ``start()`` on the loop; ``stop()`` when done. One per process.
    """

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id = 0
        self._clock: int | None = None
        self._beat_wall = 0.0
        self._beat_cpu = 0.0
        self._samples: collections.Counter[tuple[str, ...]] = collections.Counter()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._logged_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Begin beating on the running loop and watching from a daemon thread."""
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self._clock = _cpu_clock(self._thread_id)
        self._beat_wall, self._beat_cpu = time.monotonic(), self._cpu()
        self._handle = self._loop.call_later(BEAT_S, self._beat)
        self._watchdog = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        """Stop beating and watching."""
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._watchdog is not None:
            self._watchdog.join(timeout=1.0)

    def _cpu(self) -> float:
        return time.clock_gettime(self._clock) if self._clock is not None else 0.0

    def _beat(self) -> None:
        now, cpu = time.monotonic(), self._cpu()
        gap = now - self._beat_wall - BEAT_S
        if gap > self.threshold_s:
            self._report(gap, cpu - self._beat_cpu)
        elif self._samples:  # sampled while late, but not late enough to count
            with self._lock:
                self._samples.clear()
        self._beat_wall, self._beat_cpu = now, cpu
        assert self._loop is not None
        self._handle = self._loop.call_later(BEAT_S, self._beat)

    def _report(self, wall: float, cpu: float) -> None:
        with self._lock:
            samples, self._samples = self._samples, collections.Counter()
        # Without a CPU clock nothing can be split: counted as running, the conservative side.
        share = min(1.0, cpu / wall) if self._clock is not None and wall > 0 else 1.0
        cause = "running" if share >= RUNNING_SHARE else "starved"
        STALLS.labels(cause).observe(wall)
        STALL_CPU.labels(cause).inc(max(0.0, cpu))
        # Limited per cause: the rare running stall, the one with a stack worth reading, is
        # never dropped because a starved one was logged a moment before.
        now = time.monotonic()
        if now - self._logged_at.get(cause, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        self._logged_at[cause] = now
        log.warning(
            "event loop stalled",
            extra={
                "stall_ms": round(wall * 1000, 1),
                "cpu_ms": round(cpu * 1000, 1),
                "cause": cause,
                "stacks": [
                    {"samples": n, "frames": list(frames)} for frames, n in samples.most_common(3)
                ],
            },
        )

    def _watch(self) -> None:
        while not self._stop.wait(BEAT_S):
            late = time.monotonic() - self._beat_wall - BEAT_S
            if late <= self.threshold_s / 2:
                continue
            frame = sys._current_frames().get(self._thread_id)
            frames = tuple(_frames(frame))
            with self._lock:
                if len(self._samples) < 64:
                    self._samples[frames] += 1
            del frame
