"""``python -m stress websocket``: 20,000 fans holding WebSockets, the freshness of their
positions, and the server's memory per connection.

Against real Redis and PostgreSQL (a fresh database and Redis prefix, removed afterwards)
and a real ``waitroom serve --workers 2`` (uvicorn worker processes, each with its own
broadcaster for the fans connected to it; the admission loop runs in them as in production):

1. an event is created with admission paused; ``--clients`` processes
   (:mod:`stress.wsclient`) join ``--fans`` new fans between them over HTTP;
2. the server's workers are weighed (VmRSS, summed) with every fan joined and no WebSocket
   open: the idle figure;
3. every fan opens its WebSocket (``Authorization: Bearer <visitor token>`` and its own
   ``X-Forwarded-For``, as a non-browser client behind a trusted proxy);
4. admission is resumed at ``--rate`` fans a second (what ``waitroom admission set/resume``
   and the admin API call), so the line moves and every waiting fan's position changes at
   every tick: each tick must then carry a fresh ``position`` to every fan (an unchanged
   position is only resent as a keep-alive, every 15 s, so a paused room would tell us
   nothing about update gaps);
5. after ``--settle`` seconds, a window of ``--seconds``: every client times the gap
   between consecutive position updates of each of its fans; the workers are weighed again
   near the end of the window.

Results: ``connections`` open through the window, ``max_update_gap_s`` (largest gap any fan
saw; target <= 2 s) and ``p99_update_gap_s``, ``server_kb_per_connection`` = (workers' RSS
with connections - idle) / connections (target <= 30 KB). Fans admitted during the run stop
getting positions (they got their pass) and stop counting. The run fails (``ok`` false) when a
join or a handshake fails or a connection drops. Everything is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from admission import operators
from inventory import catalogue
from stress.common import free_port, fresh_database, fresh_prefix, percentile
from stress.server import (
    CpuMeter,
    kill_if_same,
    rss_kb,
    server_process,
    start_time,
    stop,
    stopped_cleanly,
    worker_pids,
)
from stress.wsclient import Report
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import load_settings

TARGET_GAP_S = 2.0
TARGET_KB = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fans", type=int, default=20_000, help="fans holding a WebSocket")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds from resume to window")
    parser.add_argument("--rate", type=float, default=20.0, help="admissions per second")
    parser.add_argument("--connect-concurrency", type=int, default=64, help="per client")
    parser.add_argument(
        "--client-nap-ms", type=float, default=10.0, help="client read batching (0: none)"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="bound on the whole run")


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"websocket: {message}", file=sys.stderr, flush=True)


class Clients:
    """The client processes, spoken to line by line."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs

    async def expect(self, word: str, timeout: float) -> list[int]:
        """Each client's next line, which must be ``word N``: the N of each."""
        counts: list[int] = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().split()
            if len(line) != 2 or line[0] != word:
                raise RuntimeError(f"a client said {line!r}, expected {word!r}; see its log")
            counts.append(int(line[1]))
        return counts

    async def say(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")
        for proc in self.procs:
            assert proc.stdin is not None
            await proc.stdin.drain()

    async def lines(self, timeout: float) -> list[bytes]:
        """Each client's next line."""
        out: list[bytes] = []
        for proc in self.procs:
            assert proc.stdout is not None
            out.append(await asyncio.wait_for(proc.stdout.readline(), timeout))
        return out

    async def reports(self, timeout: float) -> list[Report]:
        """Each client's last line, its report."""
        return [msgspec.json.decode(line, type=Report) for line in await self.lines(timeout)]


async def _event(pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, rate: float) -> str:
    """A FIFO event whose admission starts paused; passes outlive the run; nobody abandoned.

    The grace before an unconnected fan loses the place is raised (an event setting) so
    that fans joined early do not expire while the last handshakes of 20,000 complete.
    """
    spec = catalogue.EventCreate(
        name="websocket benchmark",
        ticket_types=[catalogue.TicketTypeSpec("ga", 1_000_000, 1000, "EUR")],
        room=catalogue.RoomSpec(
            rate_per_second=rate, max_active=10_000_000, pass_ttl_s=3600, abandon_grace_s=600
        ),
    )
    event = await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
    await operators.update_admission(
        pool, redis, keys, event.id, operators.make_patch(paused=True), actor="stress"
    )
    return event.id


def _weigh(pids: list[int]) -> int:
    return sum(rss_kb(pid) for pid in pids)


async def _wait_workers(pid: int, count: int) -> list[int]:
    """The server's worker processes once all ``count`` run (one worker: the server itself)."""
    if count == 1:
        return [pid]  # uvicorn serves in the process it was started in
    deadline = time.monotonic() + 30
    while True:
        workers = worker_pids(pid)
        if len(workers) >= count and pid not in workers:
            return workers
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not start within 30 s")
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_settings()
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        work_dir = Path(tempfile.mkdtemp(prefix="waitroom-stress-ws-"))
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(work_dir),
            log_level="warning",
            port=free_port(),
            admission_loop=True,
            # Simulated fans each send their own X-Forwarded-For from 127.0.0.1: trusted as
            # a reverse proxy there, each fan's address counts for the per-address limits.
            trusted_proxies=("127.0.0.1/32",),
            # This measures the WebSocket fan-out; joins skip the proof-of-work (measured by
            # `python -m stress bots`), or 20,000 solves would dominate the set-up.
            challenge=False,
        )
        keys = Keys(prefix)
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        redis = redis_from_url(settings.redis_url)
        clients = Clients([])
        worker_starts: dict[int, int | None] = {}
        try:
            event_id = await _event(pool, redis, keys, args.rate)
            argv = [sys.executable, "-m", "waitroom", "serve", "--workers", str(args.workers)]
            async with (
                asyncio.timeout(args.timeout),
                server_process(argv, settings, work_dir / "server.log") as server,
            ):
                workers = await _wait_workers(server.pid, args.workers)
                worker_starts.update({pid: start_time(pid) for pid in workers})
                try:
                    result = await _measure(
                        args, settings.port, event_id, pool, redis, keys, work_dir, workers, clients
                    )
                finally:
                    # Clients first: a server closing 20,000 live sockets takes long.
                    for proc in clients.procs:
                        await stop(proc, grace=10)
                stopping = time.monotonic()
            # A clean stop is part of the run: SIGTERM, and every worker gone by itself.
            result["server_exit_code"] = server.returncode
            result["server_stopped_cleanly"] = stopped_cleanly(server)
            result["server_stop_s"] = round(time.monotonic() - stopping, 1)
            result["ok"] = result["ok"] and stopped_cleanly(server)
            result["logs"] = str(work_dir)
            return result
        finally:
            # A supervisor killed after its grace leaves its workers behind: end them too.
            for pid, started in worker_starts.items():
                kill_if_same(pid, started)
            await redis.aclose()
            await pool.close()


async def _spawn(
    args: argparse.Namespace, port: int, event_id: str, work_dir: Path, clients: Clients
) -> None:
    shares = [
        args.fans // args.clients + (i < args.fans % args.clients) for i in range(args.clients)
    ]
    for i, share in enumerate(shares):
        with (work_dir / f"client-{i}.log").open("wb") as log:
            clients.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "stress.wsclient",
                    f"--port={port}",
                    f"--event={event_id}",
                    f"--fans={share}",
                    f"--ip-offset={i << 20}",
                    f"--connect-concurrency={args.connect_concurrency}",
                    f"--nap-ms={args.client_nap_ms}",
                    f"--out={work_dir / f'gaps-{i}.bin'}",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
            )


async def _measure(
    args: argparse.Namespace,
    port: int,
    event_id: str,
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    work_dir: Path,
    workers: list[int],
    clients: Clients,
) -> dict[str, Any]:
    await _spawn(args, port, event_id, work_dir, clients)
    started = time.monotonic()
    joined = sum(await clients.expect("joined", args.timeout))
    join_s = time.monotonic() - started
    _say(args, f"{joined} fans joined in {join_s:.1f} s")
    await asyncio.sleep(1.0)  # let the last answers' garbage go before weighing
    idle_kb = _weigh(workers)

    started = time.monotonic()
    await clients.say("connect")
    connected = sum(await clients.expect("connected", args.timeout))
    connect_s = time.monotonic() - started
    _say(args, f"{connected} WebSockets open in {connect_s:.1f} s")

    await operators.update_admission(
        pool, redis, keys, event_id, operators.make_patch(paused=False), actor="stress"
    )
    t0 = time.time() + args.settle
    t1 = t0 + args.seconds
    await clients.say(f"window {t0!r} {t1!r}")
    await asyncio.sleep(max(0.0, t0 - time.time()))
    client_pids = [p.pid for p in clients.procs]
    redis_pid = int((await redis.info("server"))["process_id"])
    meter = CpuMeter({"server": workers, "clients": client_pids, "redis": [redis_pid]})
    await asyncio.sleep(max(0.0, t1 - 1.0 - time.time()))
    # Weighed inside the window, while every connection is still open.
    loaded_kb = _weigh(workers)
    per_worker = {str(pid): rss_kb(pid) for pid in workers}
    cpu = meter.read()
    reports = await clients.reports(timeout=args.seconds + 30)
    for proc in clients.procs:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 15)
    await operators.update_admission(
        pool, redis, keys, event_id, operators.make_patch(paused=True), actor="stress"
    )

    gaps: list[float] = []
    for i in range(len(clients.procs)):
        values = array("d")
        path = work_dir / f"gaps-{i}.bin"
        values.frombytes(path.read_bytes())
        path.unlink()
        gaps.extend(values)
    open_at_end = sum(r.open_at_end for r in reports)
    dropped = sum(r.dropped for r in reports)
    close_codes: dict[str, int] = {}
    for report in reports:
        for code, count in report.close_codes.items():
            close_codes[code] = close_codes.get(code, 0) + count
    admitted = sum(r.admitted for r in reports)
    max_gap = max(gaps, default=0.0)
    kb_per = (loaded_kb - idle_kb) / max(open_at_end, 1)
    ok = (
        joined == args.fans
        and connected == args.fans
        and open_at_end == args.fans
        and dropped == 0
        and bool(gaps)
    )
    return {
        "benchmark": "websocket",
        "ok": ok,
        "connections": open_at_end,
        "max_update_gap_s": round(max_gap, 3),
        "p99_update_gap_s": round(percentile(gaps, 99), 3),
        "p50_update_gap_s": round(percentile(gaps, 50), 3),
        "server_kb_per_connection": round(kb_per, 2),
        "targets": {"max_update_gap_s": TARGET_GAP_S, "server_kb_per_connection": TARGET_KB},
        "met": {
            "max_update_gap_s": max_gap <= TARGET_GAP_S,
            "server_kb_per_connection": kb_per <= TARGET_KB,
        },
        "fans": args.fans,
        "joined": joined,
        "connected": connected,
        "dropped": dropped,
        "close_codes": close_codes,
        "admitted_since_resume": admitted,
        "stale_at_window_start": sum(r.stale_at_start for r in reports),
        "position_updates": sum(r.positions for r in reports),
        "updates_per_s": round(sum(r.positions for r in reports) / args.seconds, 1),
        "join_s": round(join_s, 1),
        "connect_s": round(connect_s, 1),
        "server_rss_idle_kb": idle_kb,
        "server_rss_connected_kb": loaded_kb,
        "server_rss_kb_by_worker": per_worker,
        "cpu_pct": cpu,
        "params": {
            "challenge": False,
            "fans": args.fans,
            "clients": args.clients,
            "server_workers": args.workers,
            "seconds": args.seconds,
            "settle": args.settle,
            "admission_rate": args.rate,
            "client_nap_ms": args.client_nap_ms,
            "tick_s": 1.0,
        },
    }
