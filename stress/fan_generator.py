"""``python -m stress.fan_generator``: one process of simulated fans, a share of a crowd.

``python -m stress cluster`` runs several of these side by side, so that no process of the
load is bound to one core and each can report what it cost: a generator that saturates its
core makes its fans' latencies its own, not the server's. Each simulates ``--fans`` fans
(:func:`stress.simulation.simulate`, numbered from ``--first`` so that no two processes
share a client address) against ``--base-url``.

The dialogue with the parent, one line each over stdin/stdout (as :mod:`stress.loadgen`):
the child prints ``ready``, waits for ``go``, runs its fans, writes their outcomes to
``--out`` (a JSON array of :class:`~stress.simulation.Outcome`) and prints one JSON line
(:class:`Report`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import msgspec
import uvloop

from stress.common import percentile
from stress.simulation import Outcome, Progress, simulate

#: Seconds between two samples of this process's CPU use (for its busiest second).
SAMPLE_S = 1.0
#: The event loop's lag is how late a timer of this many seconds fires.
LAG_PROBE_S = 0.05


class Report(msgspec.Struct):
    """What one generator process did and what it cost."""

    fans: int
    wall_s: float
    cpu_s: float
    #: CPU over the run, and over its busiest sampled second, in percent of one core.
    cpu_pct: float
    cpu_pct_peak: float
    #: Time this process was ready to run but waited for a core (the kernel's run-queue
    #: wait, /proc/self/schedstat), in percent of the run: a crowded machine's delay,
    #: which the fans' latencies include and the server's do not.
    runqueue_wait_pct: float
    #: How late a 50 ms timer of the event loop fired, p50/p99/max (ms): the delay every
    #: answer waited before this process could look at it.
    loop_lag_p50_ms: float
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    joined: int
    admitted: int
    paid_fans: int
    sold_out_fans: int
    errors: int
    #: Asks for a reservation while its payment was under way (long polls).
    payment_polls: int
    #: Monotonic times (system-wide on Linux, comparable between processes) of this
    #: process's first and latest paid tickets, for the crowd's selling window.
    first_sale: float | None
    last_sale: float | None


def _runqueue_wait_s() -> float:
    """Seconds this process's threads have waited on a run queue (0 where not known)."""
    try:
        return int(Path("/proc/self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _CpuSampler:
    """This process's busiest second of CPU, and its event loop's lag, sampled while the
    fans run."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        cpu, wall = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(SAMPLE_S)
            now_cpu, now_wall = time.process_time(), time.monotonic()
            if now_wall > wall:
                self.peak = max(self.peak, (now_cpu - cpu) / (now_wall - wall))
            cpu, wall = now_cpu, now_wall

    async def _lag(self) -> None:
        while True:
            due = time.monotonic() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            self.lags.append(max(0.0, time.monotonic() - due))

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())
        self._lag_task = asyncio.create_task(self._lag())

    async def stop(self) -> None:
        for task in (self._task, self._lag_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _run(args: argparse.Namespace) -> tuple[list[Outcome], Report]:
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")
    sampler = _CpuSampler()
    sampler.start()
    cpu, started, waited = time.process_time(), time.monotonic(), _runqueue_wait_s()
    try:
        outcomes, progress = await simulate(
            args.base_url,
            args.event,
            args.fans,
            first=args.first,
            join_concurrency=args.join_concurrency,
            arrival_s=args.arrival_s,
            keep_route=not args.ignore_node_cookie,
        )
    finally:
        await sampler.stop()
    wall, used = time.monotonic() - started, time.process_time() - cpu
    waited = _runqueue_wait_s() - waited
    return outcomes, _report(args.fans, wall, used, waited, sampler, progress)


def _report(
    fans: int, wall: float, cpu: float, waited: float, sampler: _CpuSampler, progress: Progress
) -> Report:
    lags = [lag * 1000 for lag in sampler.lags] or [0.0]
    return Report(
        fans=fans,
        wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
        cpu_pct=round(100 * cpu / max(wall, 1e-9), 1),
        cpu_pct_peak=round(100 * sampler.peak, 1),
        runqueue_wait_pct=round(100 * waited / max(wall, 1e-9), 1),
        loop_lag_p50_ms=round(percentile(lags, 50), 1),
        loop_lag_p99_ms=round(percentile(lags, 99), 1),
        loop_lag_max_ms=round(max(lags), 1),
        joined=progress.joined,
        admitted=progress.admitted,
        paid_fans=progress.paid_fans,
        sold_out_fans=progress.sold_out_fans,
        errors=progress.errors,
        payment_polls=progress.payment_polls,
        first_sale=progress.first_sale,
        last_sale=progress.last_sale,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process."""
    parser = argparse.ArgumentParser(prog="python -m stress.fan_generator")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--event", required=True)
    parser.add_argument("--fans", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="the number of the first fan")
    parser.add_argument("--join-concurrency", type=int, default=50)
    parser.add_argument(
        "--arrival-s", type=float, default=0.0, help="spread the fans' arrivals over this long"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--ignore-node-cookie",
        action="store_true",
        help="fans do not keep the owner-affinity cookie (their reservations are spread)",
    )
    args = parser.parse_args(argv)
    # uvloop, as every other process of the benchmarks (and the server) runs.
    outcomes, report = uvloop.run(_run(args))
    args.out.write_bytes(msgspec.json.encode(outcomes))
    print(msgspec.json.encode(report).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
