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

from stress.simulation import Outcome, Progress, simulate

#: Seconds between two samples of this process's CPU use (for its busiest second).
SAMPLE_S = 1.0


class Report(msgspec.Struct):
    """What one generator process did and what it cost."""

    fans: int
    wall_s: float
    cpu_s: float
    #: CPU over the run, and over its busiest sampled second, in percent of one core.
    cpu_pct: float
    cpu_pct_peak: float
    joined: int
    admitted: int
    paid_fans: int
    sold_out_fans: int
    errors: int
    #: Monotonic times (system-wide on Linux, comparable between processes) of this
    #: process's first and latest paid tickets, for the crowd's selling window.
    first_sale: float | None
    last_sale: float | None


class _CpuSampler:
    """This process's busiest second of CPU, sampled while the fans run."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        cpu, wall = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(SAMPLE_S)
            now_cpu, now_wall = time.process_time(), time.monotonic()
            if now_wall > wall:
                self.peak = max(self.peak, (now_cpu - cpu) / (now_wall - wall))
            cpu, wall = now_cpu, now_wall

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _run(args: argparse.Namespace) -> tuple[list[Outcome], Report]:
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")
    sampler = _CpuSampler()
    sampler.start()
    cpu, started = time.process_time(), time.monotonic()
    try:
        outcomes, progress = await simulate(
            args.base_url,
            args.event,
            args.fans,
            first=args.first,
            join_concurrency=args.join_concurrency,
        )
    finally:
        await sampler.stop()
    wall, used = time.monotonic() - started, time.process_time() - cpu
    return outcomes, _report(args.fans, wall, used, sampler.peak, progress)


def _report(fans: int, wall: float, cpu: float, peak: float, progress: Progress) -> Report:
    return Report(
        fans=fans,
        wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
        cpu_pct=round(100 * cpu / max(wall, 1e-9), 1),
        cpu_pct_peak=round(100 * peak, 1),
        joined=progress.joined,
        admitted=progress.admitted,
        paid_fans=progress.paid_fans,
        sold_out_fans=progress.sold_out_fans,
        errors=progress.errors,
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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    outcomes, report = asyncio.run(_run(args))
    args.out.write_bytes(msgspec.json.encode(outcomes))
    print(msgspec.json.encode(report).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
