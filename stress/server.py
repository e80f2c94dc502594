"""A benchmark's own server process: start it, wait until it answers, stop it, weigh it.

The benchmarks start the server as a child process (as an operator would run it) with the
run's settings in ``WAITROOM_*`` variables, its output in a log file under the run's
directory, and stop it with SIGTERM, then SIGKILL after a grace period. Only the process
started here is ever signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from waitroom.core.settings import Settings, settings_env

ROOT = Path(__file__).resolve().parent.parent


async def _answers(port: int, path: str) -> bool:
    """Whether ``GET path`` on 127.0.0.1:``port`` answers 200 (one short-lived connection)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), 5)
        return line.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@asynccontextmanager
async def server_process(
    argv: Sequence[str],
    settings: Settings,
    log: Path,
    *,
    ready_path: str = "/readyz",
    timeout: float = 60,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``argv`` with ``settings`` until the block ends; ready once ``ready_path`` is 200."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + timeout
        while not await _answers(settings.port, ready_path):
            if proc.returncode is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout:g} s; see {log}")
            await asyncio.sleep(0.1)
        yield proc
    finally:
        await stop(proc, grace=15)


async def stop(proc: asyncio.subprocess.Process, *, grace: float) -> None:
    """SIGTERM ``proc`` (a child we started), SIGKILL it if it is still there after ``grace``."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def stopped_cleanly(proc: asyncio.subprocess.Process) -> bool:
    """Whether ``proc`` ended by itself after SIGTERM, as a served process should.

    uvicorn shuts down gracefully on SIGTERM and then raises the signal again, so a clean
    stop shows as -SIGTERM (or 0); -SIGKILL means it had to be killed.
    """
    return proc.returncode in (0, -signal.SIGTERM)


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ('' if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_pids(pid: int) -> list[int]:
    """The uvicorn worker processes under the server ``pid`` (itself when it has none).

    ``--workers N`` makes uvicorn a supervisor whose children (spawned by multiprocessing)
    serve; multiprocessing's resource tracker, if any, is not a worker.
    """
    workers = [c for c in children(pid) if "resource_tracker" not in cmdline(c)]
    return workers or [pid]


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (from /proc; 0 for one that is gone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # Fields 14 and 15 of stat(5) (utime, stime); 'fields' starts at field 3.
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy and in total so far, all cores (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    ticks = os.sysconf("SC_CLK_TCK")
    return (total - idle) / ticks, total / ticks


class CpuMeter:
    """Where the machine's CPU went from now until :meth:`read`, by named groups of pids.

    Percentages are of one core (a busy 2-core machine shows 200); ``other`` is what the
    machine spent outside the groups: other people's processes, the kernel's own threads.
    On a shared 2-core box that is the figure that says whether a run was disturbed.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.started = time.monotonic()
        self.machine0 = machine_busy_seconds()[0]
        self.cpu0 = {name: cpu_seconds(pids) for name, pids in groups.items()}

    def read(self) -> dict[str, float]:
        """CPU per group and for the machine since construction, in percent of one core."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out = {
            name: round((cpu_seconds(pids) - self.cpu0[name]) / elapsed * 100, 1)
            for name, pids in self.groups.items()
        }
        machine = round((machine_busy_seconds()[0] - self.machine0) / elapsed * 100, 1)
        out["other"] = round(max(0.0, machine - sum(out.values())), 1)
        out["machine"] = machine
        out["machine_capacity"] = float(os.cpu_count() or 1) * 100
        return out


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if it is gone.

    A pid and its start time name one process for good: a pid reused later by another
    process has another start time, so a benchmark never signals a stranger.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def kill_if_same(pid: int, started: int | None) -> bool:
    """SIGKILL ``pid`` if it is still the process that started at ``started``."""
    if started is None or start_time(pid) != started:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False
