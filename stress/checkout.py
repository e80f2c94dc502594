"""``python -m stress checkout``: HTTP reservations for one event through the real server, against
joins on the same server in the same run, and a sell-out round checked in PostgreSQL.

The real server (``waitroom serve --workers 2``, admission loops on) on a fresh database and
Redis prefix. Three events:

- **checkout**: a large stock (``--stock``); its fans are admitted beforehand as in a sale: each
  joins over HTTP (its own client address, a visitor token issued by the server), and the
  event's admission loop admits them at a high rate (``--admit-rate``) with a ``max_active``
  that never binds, signing one pass each. The passes are read from the room's ``admitted``
  hash (what ``GET .../queue/me`` hands out; a sample is fetched through that route and must
  match). More fans are joined and admitted between rounds whenever the next round could use
  up those left (fans are never reused: one reservation per fan and pass);
- **join**: admission paused, so the line only grows: the join benchmark's room;
- **sell-out**: ``--sellout-tickets`` (500) tickets and ``--sellout-fans`` (twice as many)
  fans, reserved until every fan has tried once, after the measured rounds.

The first reservation decides which worker hosts the checkout event's inventory actor (a
single request on a fresh connection: whichever worker accepts it); the other worker forwards
its reservations to it. Then ``--rounds`` interleaved rounds (ABC, CBA...) of:

- ``reserve_<C>`` for each ``--concurrency`` C (50, 200): C keep-alive connections from
  ``--generators`` processes (``python -m stress.checkout reserve``: the closed-loop generator
  of :mod:`stress.loadgen`, with a new request per fan), one request in flight on each;
  every request is ``POST /v1/events/{id}/reservations`` by another admitted fan, with its
  pass (``X-Queue-Pass``), its identity (``Authorization: Bearer <visitor token>``) and its
  own ``Idempotency-Key``;
- ``join``: the join benchmark's request (``POST /v1/events/{id}/queue``, a new fan from a
  new address each time) through :func:`stress.loadgen.run_load`.

Each round is ``--seconds``/rounds long after ``--warmup``. Reported: ``http_reserve_rps`` and
``http_reserve_p99_ms`` by concurrency, ``join_rps``, ``ratio_vs_join`` (reserve rps at the
first concurrency / join rps), ``forwarded_share`` (reservations the non-owner forwarded, from
``waitroom_inventory_forwarded_total`` on each worker's ``/metrics``, with the entries added
to the event's inbox stream meanwhile: one per forwarded command, or fewer when they are
batched), ``cpu_ms_per_reservation`` (CPU of the server's processes, Redis and the
database's PostgreSQL backends over the measured windows, per reservation completed in them;
by process, with the share spent in the kernel), how the connections split between the
workers (counted in /proc once they are connected), and the
``oversold`` tickets after the sell-out round (``held + sold <= quantity`` in PostgreSQL, and
201s against the stock). Every acknowledged hold must be in PostgreSQL.

With ``--py-spy PATH`` and/or ``--perf PATH`` and ``--profile-dir DIR``, one more reserve round
at the first concurrency runs after the measured ones (its figures are kept apart) with the
profilers on both workers. py-spy's raw stacks are summed by :func:`profile_breakdown` into
microseconds of each worker's CPU per reservation (as measured in the rounds at that
concurrency) by component and by library; ``perf report`` gives the on-CPU split by shared
object (interpreter, kernel, uvloop, asyncpg, msgspec...: :func:`perf_breakdown`).

The run fails (``ok`` false) on any reservation answered other than 201 in the measured
rounds, a join answered other than 201, a dropped connection, a pass that differs from what
the server hands out, an acknowledged hold missing from PostgreSQL, or an oversold ticket;
its directory (the server's log) is then kept and named in the result (``work_dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import msgspec
import uvloop
from redis.asyncio import Redis

from admission import operators
from inventory import catalogue
from stress.common import free_port, fresh_database, fresh_prefix, metric_sum, percentile
from stress.loadgen import LoadResult, Summary, _Client, _ip, _Load, go, run_load, wait_ready
from stress.server import (
    machine_busy_seconds,
    server_process,
    stopped_cleanly,
    worker_pids,
)
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings, load_settings

TARGET_RPS = 5000.0
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.7
TICKET_TYPE = "ga"
RESERVE_BODY = b'{"ticket_type":"ga","quantity":1}'
#: Each fan-joining generator process draws its addresses from its own block of this many.
_IP_SHARE = 1 << 18
#: Connections of each fan-joining generator process.
_JOIN_FAN_CONNECTIONS = 32
#: Fans whose pass is fetched through ``GET .../queue/me`` and compared.
_PASS_SAMPLE = 20
#: Give up on the admission of a batch of fans after this long past its expected time.
_ADMIT_SLACK_S = 60.0
_DRAIN_S = 10.0


def add_round_arguments(parser: argparse.ArgumentParser, *, expect_rps: float) -> None:
    """The options of reservation rounds and their fans (shared with ``stress affinity``)."""
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per side")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the sides")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured start per round")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--expect-rps",
        type=float,
        default=expect_rps,
        help="reservations/s assumed before any was measured (sizes the first batch of fans)",
    )
    parser.add_argument("--max-fans", type=int, default=600_000, help="bound on fans admitted")
    parser.add_argument("--stock", type=int, default=10_000_000, help="tickets of each event")
    parser.add_argument("--admit-rate", type=float, default=20_000.0, help="admissions per s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_round_arguments(parser, expect_rps=6000.0)
    parser.add_argument(
        "--concurrency", default="50,200", help="keep-alive reservation clients, per side"
    )
    parser.add_argument(
        "--join-connections", type=int, default=50, help="connections of the join side"
    )
    parser.add_argument("--server-workers", type=int, default=2, help="waitroom serve --workers")
    parser.add_argument(
        "--fans",
        type=int,
        default=0,
        help="admitted fans for the measured rounds; 0: as many as they need (joined and"
        " admitted between rounds)",
    )
    parser.add_argument("--sellout-tickets", type=int, default=500)
    parser.add_argument(
        "--sellout-fans", type=int, default=0, help="fans of the sell-out round (0: 2x tickets)"
    )
    parser.add_argument("--py-spy", default=None, help="py-spy executable: profile both workers")
    parser.add_argument("--perf", default=None, help="perf executable: profile both workers")
    parser.add_argument("--profile-dir", default=None, help="where the profiles go")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per s")
    parser.add_argument(
        "--profile-nonblocking", action="store_true", help="py-spy without stopping the workers"
    )


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"checkout: {message}", file=sys.stderr, flush=True)


# --- the generator processes (children) --------------------------------------------------------


class _Joined(msgspec.Struct):
    fan_id: str
    visitor_token: str | None = None


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; hands each whole answer to ``done``."""

    def __init__(self, done: Callable[[_Conn, int, bytes], None]) -> None:
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.need = 0
        self.body_at = 0
        self.status = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while True:
            if not self.need:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[: end + 2].lower()
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                length = int(head[at + 17 : head.find(b"\r\n", at + 2)]) if at >= 0 else 0
                self.body_at = end + 4
                self.need = end + 4 + length
            if len(buffer) < self.need:
                break
            body = buffer[self.body_at : self.need]
            buffer = buffer[self.need :]
            self.need = 0
            self.done(self, self.status, body)
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def _join_fans(args: argparse.Namespace) -> int:
    """Child: join ``--count`` new fans, each from its own address; write ``fan_id token``."""
    loop = asyncio.get_running_loop()
    prefix = (
        f"POST /v1/events/{args.event}/queue HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        "X-Forwarded-For: "
    ).encode()
    suffix = b"\r\nContent-Length: 0\r\n\r\n"
    fans: list[tuple[str, str]] = []
    statuses: dict[int, int] = {}
    decoder = msgspec.json.Decoder(_Joined)
    state = {"next": 0, "answered": 0}
    finished = asyncio.Event()

    def fire(conn: _Conn) -> None:
        if state["next"] >= args.count or conn.lost:
            return
        conn.send(prefix + _ip(args.ip_offset + state["next"]) + suffix)
        state["next"] += 1

    def done(conn: _Conn, status: int, body: bytes) -> None:
        state["answered"] += 1
        statuses[status] = statuses.get(status, 0) + 1
        if status == 201:
            joined = decoder.decode(body)
            if joined.visitor_token is not None:
                fans.append((joined.fan_id, joined.visitor_token))
        if state["answered"] >= args.count:
            finished.set()
        fire(conn)

    started = time.monotonic()
    cpu0 = _own_cpu()
    conns: list[_Conn] = []
    for _ in range(min(args.connections, args.count)):
        _, conn = await loop.create_connection(lambda: _Conn(done), "127.0.0.1", args.port)
        conns.append(conn)
    for conn in conns:
        fire(conn)
    while not finished.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), 1.0)
        if all(c.lost for c in conns):
            break
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.to_thread(
        Path(args.out).write_text, "".join(f"{fan} {token}\n" for fan, token in fans)
    )
    summary = {
        "joined": len(fans),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(time.monotonic() - started, 3),
        "cpu_s": round(_own_cpu() - cpu0, 3),
        "connections_lost": sum(c.lost for c in conns),
    }
    print(msgspec.json.encode(summary).decode(), flush=True)
    return 0


class ReserveSummary(Summary):
    """What one reservation generator measured (see :class:`stress.loadgen.Summary`)."""

    #: Requests sent (each used one fan); the fans after them are left unused.
    sent: int = 0
    #: Seconds into the measured window when the answer to its last fan came; None if it
    #: never ran out of fans.
    ran_out_s: float | None = None


class _ReserveLoad(_Load):
    """The shared state of one generator's connections: a new fan's request each time."""

    def __init__(self, requests: list[bytes]) -> None:
        super().__init__(b"", b"", 0)
        self.requests = requests
        self.sent = 0
        #: When the last fan's answer came (the generator had nothing left to send).
        self.spent_at: float | None = None
        self.spent = asyncio.Event()

    def request(self) -> bytes:
        data = self.requests[self.sent]
        self.sent += 1
        return data


class _ReserveClient(_Client):
    """A loadgen connection that stops when its generator has no fan left."""

    def __init__(self, load: _ReserveLoad) -> None:
        super().__init__(load)
        self.fans = load

    def fire(self) -> None:
        if self.fans.sent >= len(self.fans.requests):
            if self.fans.in_flight == 0 and self.fans.spent_at is None:
                self.fans.spent_at = time.perf_counter()
                self.fans.spent.set()
            return
        super().fire()


def _reserve_requests(args: argparse.Namespace) -> list[bytes]:
    head = (
        f"POST /v1/events/{args.event}/reservations HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(RESERVE_BODY)}\r\n"
        + (f"Cookie: waitroom_node={args.cookie}\r\n" if args.cookie else "")
        + "Authorization: Bearer "
    ).encode()
    requests: list[bytes] = []
    for i, line in enumerate(Path(args.fans).read_bytes().splitlines()):
        token, queue_pass = line.split(b" ")
        key = f"{args.key_prefix}-{i}".encode()
        requests.append(
            b"".join(
                (
                    head,
                    token,
                    b"\r\nX-Queue-Pass: ",
                    queue_pass,
                    b"\r\nIdempotency-Key: ",
                    key,
                    b"\r\n\r\n",
                    RESERVE_BODY,
                )
            )
        )
    return requests


async def _reserve(args: argparse.Namespace) -> tuple[array[float], ReserveSummary]:
    """Child: the loadgen dialogue (ready, go, summary), one new fan per request."""
    loop = asyncio.get_running_loop()
    load = _ReserveLoad(_reserve_requests(args))
    clients: list[_ReserveClient] = []
    for _ in range(args.connections):
        _, client = await loop.create_connection(
            lambda: _ReserveClient(load), "127.0.0.1", args.port
        )
        clients.append(client)
    print("ready", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("checkout generator: expected 'go'")
    cpu0 = _own_cpu()
    now = time.perf_counter()
    load.window_start = now + args.warmup
    load.window_end = load.window_start + args.seconds
    load.running = True
    for client in clients:
        client.fire()
    with contextlib.suppress(TimeoutError):
        # Until the window closes, or earlier once every fan has had its answer.
        await asyncio.wait_for(load.spent.wait(), load.window_end - time.perf_counter())
    load.running = False
    if load.in_flight:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.drained.wait(), _DRAIN_S)
    cpu = _own_cpu() - cpu0
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    # A generator that ran out of fans measured until its last answer.
    window = args.seconds
    ran_out: float | None = None
    if load.spent_at is not None:
        ran_out = max(0.0, load.spent_at - load.window_start)
        window = min(window, ran_out)
    return load.latencies, ReserveSummary(
        completed=load.completed,
        window_s=round(window, 4),
        statuses={str(k): v for k, v in sorted(load.statuses.items())},
        connections_lost=load.lost,
        cpu_s=round(cpu, 3),
        sent=load.sent,
        ran_out_s=None if ran_out is None else round(ran_out, 3),
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Entry point of a generator process: ``join-fans`` or ``reserve`` (see the module)."""
    parser = argparse.ArgumentParser(prog="python -m stress.checkout")
    sub = parser.add_subparsers(dest="mode", required=True)
    join = sub.add_parser("join-fans")
    reserve = sub.add_parser("reserve")
    for p in (join, reserve):
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--event", required=True)
        p.add_argument("--connections", type=int, default=32)
    join.add_argument("--count", type=int, required=True)
    join.add_argument("--ip-offset", type=int, required=True)
    join.add_argument("--out", required=True)
    reserve.add_argument("--fans", required=True, help="file of 'token pass' lines")
    reserve.add_argument("--key-prefix", required=True)
    reserve.add_argument("--seconds", type=float, required=True)
    reserve.add_argument("--warmup", type=float, default=1.0)
    reserve.add_argument("--out", required=True)
    reserve.add_argument(
        "--cookie", default=None, help="the waitroom_node cookie every fan sends (affinity)"
    )
    args = parser.parse_args(argv)
    if args.mode == "join-fans":
        return uvloop.run(_join_fans(args))
    latencies, summary = uvloop.run(_reserve(args))
    Path(args.out).write_bytes(latencies.tobytes())
    print(msgspec.json.encode(summary).decode(), flush=True)
    return 0


# --- the parent's side: measuring -------------------------------------------------------------


def _times(pid: int) -> tuple[float, float] | None:
    """User and system CPU seconds of ``pid`` so far; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


class _Meter:
    """CPU seconds by named groups of processes from now until :meth:`read`.

    Like :class:`stress.server.CpuMeter`, but a group may be listed again at the end (the
    server's PostgreSQL backends come and go): a process that appeared meanwhile counts
    with all its CPU, one that went away with none of what it used since the start.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.started = time.monotonic()
        self.machine0 = machine_busy_seconds()[0]
        self.groups = groups
        self.cpu0: dict[int, tuple[float, float]] = {}
        for pids in groups.values():
            for pid in pids:
                value = _times(pid)
                if value is not None:
                    self.cpu0[pid] = value
        #: System CPU seconds per group, as of the last read.
        self.system: dict[str, float] = {}

    def read(self, again: dict[str, list[int]] | None = None) -> tuple[float, dict[str, float]]:
        """Seconds elapsed, and CPU seconds per group (with ``other`` and ``machine``)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        machine = machine_busy_seconds()[0] - self.machine0
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            user = system = 0.0
            for pid in sorted({*pids, *(again or {}).get(name, [])}):
                value = _times(pid)
                if value is not None:
                    user0, system0 = self.cpu0.get(pid, (0.0, 0.0))
                    user += value[0] - user0
                    system += value[1] - system0
            out[name] = max(0.0, user + system)
            self.system[name] = max(0.0, system)
        out["other"] = max(0.0, machine - sum(out.values()))
        out["machine"] = machine
        return elapsed, out


def _pct(elapsed: float, cpu: dict[str, float]) -> dict[str, float]:
    pct = {k: round(v / elapsed * 100, 1) for k, v in cpu.items()}
    pct["machine_capacity"] = float(os.cpu_count() or 1) * 100
    return pct


@dataclass(slots=True)
class _Fan:
    fan_id: str
    token: str
    queue_pass: str


@dataclass
class _Round:
    """One measured round of one side."""

    kind: str
    connections: int
    rps: float
    latencies: list[float]
    statuses: dict[int, int]
    connections_lost: int
    window_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: The part of cpu_s spent in the kernel (system calls: sockets above all).
    system_s: dict[str, float] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    generators_cpu_s: list[float] = field(default_factory=list)
    completed: int = 0
    sent: int = 0
    ran_out: bool = False
    forwarded: dict[str, Any] = field(default_factory=dict)
    connections_by_worker: dict[str, int] = field(default_factory=dict)


#: Read from the server's /metrics around a reservation round: commands forwarded to the
#: owner, and the owner's group commits (how many, how big, how long).
_WORKER_METRICS = (
    "waitroom_inventory_forwarded_total",
    "waitroom_inventory_batch_size_sum",
    "waitroom_inventory_batch_size_count",
    "waitroom_inventory_commit_seconds_sum",
)


async def _http(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, bytes]:
    """One request on its own connection: status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head[9:12]), rest


def _socket_inodes(port: int) -> set[str]:
    """Inodes of the established TCP connections whose local end is 127.0.0.1:``port``."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    found.add(fields[9])
    return found


def _connections_of(pid: int, inodes: set[str]) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    count += 1
    return count


class _Bench:
    """One run: the server, its events, the fans, and the rounds."""

    def __init__(
        self,
        args: argparse.Namespace,
        settings: Settings,
        pool: asyncpg.Pool[Any],
        redis: Redis,
        keys: Keys,
        work_dir: Path,
    ) -> None:
        self.args = args
        self.settings = settings
        self.port = settings.port
        self.pool = pool
        self.redis = redis
        self.keys = keys
        self.work_dir = work_dir
        self.ip_block = 0
        self.server_pid = 0
        self.redis_pid = 0
        self.owner_pid = 0
        self.other_pid = 0
        self.fans_joined = 0
        self.fans_admitted = 0
        self.join_statuses: dict[str, int] = {}
        self.setup_s = 0.0
        self.generators_cpu_s = 0.0

    def next_ip_offset(self) -> int:
        """A block of 2**20 client addresses no other phase of this run uses."""
        offset = (self.ip_block % 16) << 20
        self.ip_block += 1
        return offset

    # --- processes --------------------------------------------------------------------------

    async def postgres_backends(self) -> list[int]:
        rows = await self.pool.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [int(r["pid"]) for r in rows]

    async def postgres_background(self) -> list[int]:
        rows = await self.pool.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE backend_type IN ('walwriter', 'checkpointer', 'background writer')"
        )
        return [int(r["pid"]) for r in rows]

    async def groups(self) -> dict[str, list[int]]:
        return {
            # Not "other": that is what the machine spent outside every group.
            "owner_worker": [self.owner_pid],
            "other_worker": [self.other_pid],
            "supervisor": [self.server_pid],
            "redis": [self.redis_pid],
            "postgres": await self.postgres_backends(),
            "postgres_background": await self.postgres_background(),
        }

    # --- fans -------------------------------------------------------------------------------

    async def make_fans(self, event_id: str, count: int) -> list[_Fan]:
        """``count`` new fans joined over HTTP, admitted by the server's loop, with passes."""
        started = time.monotonic()
        generators = max(1, min(self.args.generators, count))
        shares = [count // generators + (i < count % generators) for i in range(generators)]
        offset = self.next_ip_offset()
        procs: list[asyncio.subprocess.Process] = []
        outs: list[Path] = []
        joined: list[tuple[str, str]] = []
        try:
            for i, share in enumerate(shares):
                out = self.work_dir / f"fans-{offset}-{i}.txt"
                outs.append(out)
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "stress.checkout",
                        "join-fans",
                        f"--port={self.port}",
                        f"--event={event_id}",
                        f"--count={share}",
                        f"--connections={_JOIN_FAN_CONNECTIONS}",
                        f"--ip-offset={offset + i * _IP_SHARE}",
                        f"--out={out}",
                        stdout=asyncio.subprocess.PIPE,
                    )
                )
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 60 + count / 200)
                summary: dict[str, Any] = msgspec.json.decode(line)
                for code, n in summary["statuses"].items():
                    self.join_statuses[code] = self.join_statuses.get(code, 0) + n
                self.generators_cpu_s += summary["cpu_s"]
                await proc.wait()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        for out in outs:
            for entry in out.read_text().splitlines():
                fan_id, token = entry.split(" ")
                joined.append((fan_id, token))
            out.unlink()
        self.fans_joined += len(joined)
        ek = self.keys.event(event_id)
        # Admitted once the line is empty (a max_active that never binds, no abandonment).
        deadline = time.monotonic() + count / self.args.admit_rate + _ADMIT_SLACK_S
        while int(await self.redis.zcard(ek.queue)) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} fans were not admitted in time")
            await asyncio.sleep(0.1)
        fans: list[_Fan] = []
        for start in range(0, len(joined), 5000):
            chunk = joined[start : start + 5000]
            passes: list[Any] = await self.redis.hmget(ek.admitted, [f for f, _ in chunk])
            for (fan_id, token), queue_pass in zip(chunk, passes, strict=True):
                if queue_pass is not None:
                    fans.append(_Fan(fan_id, token, queue_pass.decode()))
        self.fans_admitted += len(fans)
        self.setup_s += time.monotonic() - started
        return fans

    async def passes_differing(self, event_id: str, fans: Sequence[_Fan]) -> int:
        """How many of ``fans`` get another pass from ``GET .../queue/me`` than they hold."""
        differing = 0
        for i, fan in enumerate(fans):
            status, body = await _http(
                self.port,
                "GET",
                f"/v1/events/{event_id}/queue/me",
                {"Authorization": f"Bearer {fan.token}", "X-Forwarded-For": f"192.0.2.{i + 10}"},
            )
            answer: dict[str, Any] = msgspec.json.decode(body) if status == 200 else {}
            if answer.get("status") != "admitted" or answer.get("queue_pass") != fan.queue_pass:
                differing += 1
        return differing

    # --- ownership and forwarding -----------------------------------------------------------

    async def owner_pid_of(self, event_id: str) -> int:
        """The pid in the node id holding the event's inventory lease (``host:pid:uuid``)."""
        raw: Any = await self.redis.get(self.keys.event(event_id).owner)
        if raw is None:
            return 0
        return int((raw.decode() if isinstance(raw, bytes) else str(raw)).rsplit(":", 2)[1])

    async def inbox_added(self, event_id: str) -> int:
        """Entries ever added to the event's inbox stream (forwarded commands, or batches)."""
        try:
            info: Any = await self.redis.xinfo_stream(self.keys.event(event_id).inbox)
        except Exception:  # no stream yet: nothing was ever forwarded
            return 0
        return int(info.get("entries-added", info.get(b"entries-added", 0)))

    async def worker_metrics(self) -> dict[str, float] | None:
        """:data:`_WORKER_METRICS` of the server, None if it could not be reached. /metrics
        answers the totals of both worker processes (issue 16): only the non-owner forwards,
        only the owner commits, so the totals are each worker's own figures."""
        for _ in range(60):
            status, body = await _http(self.port, "GET", "/metrics")
            if status == 200:
                text = body.decode()
                return {name: metric_sum(text, name) or 0.0 for name in _WORKER_METRICS}
        return None

    def connection_split(self) -> dict[str, int]:
        """How the clients' connections split between the owner and the other worker."""
        inodes = _socket_inodes(self.port)
        return {
            "owner": _connections_of(self.owner_pid, inodes),
            "other": _connections_of(self.other_pid, inodes),
        }

    # --- rounds -----------------------------------------------------------------------------

    async def reserve_round(
        self,
        event_id: str,
        fans: list[_Fan],
        connections: int,
        *,
        seconds: float,
        warmup: float,
        tag: str,
        profile: Path | None = None,
        cookie: str | None = None,
    ) -> tuple[_Round, list[_Fan]]:
        """One reservation round with ``fans``; the round and the fans it did not use.
        ``cookie``: the ``waitroom_node`` cookie every fan sends (owner affinity)."""
        args = self.args
        generators = max(1, min(args.generators, connections))
        shares = [
            connections // generators + (i < connections % generators) for i in range(generators)
        ]
        # Each generator its own contiguous slice of fans, in proportion to its connections.
        slices: list[list[_Fan]] = []
        at = 0
        for i, share in enumerate(shares):
            size = len(fans) * share // connections if i < generators - 1 else len(fans) - at
            slices.append(fans[at : at + size])
            at += size
        before_metrics = await self.worker_metrics()
        before_inbox = await self.inbox_added(event_id)
        procs: list[asyncio.subprocess.Process] = []
        outs: list[Path] = []
        summaries: list[ReserveSummary] = []
        profilers: list[asyncio.subprocess.Process] = []
        try:
            for i, (share, chunk) in enumerate(zip(shares, slices, strict=True)):
                fan_file = self.work_dir / f"reserve-{tag}-{i}.txt"
                fan_file.write_text("".join(f"{f.token} {f.queue_pass}\n" for f in chunk))
                out = self.work_dir / f"latencies-{tag}-{i}.bin"
                outs.append(out)
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "stress.checkout",
                        "reserve",
                        f"--port={self.port}",
                        f"--event={event_id}",
                        f"--connections={share}",
                        f"--fans={fan_file}",
                        f"--key-prefix={tag}-{i}",
                        f"--seconds={seconds}",
                        f"--warmup={warmup}",
                        f"--out={out}",
                        *([f"--cookie={cookie}"] if cookie else []),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                    )
                )
            await wait_ready(procs, "a reservation generator", 60)
            split = self.connection_split()
            await go(procs)
            await asyncio.sleep(warmup)
            groups = await self.groups()
            groups["generators"] = [p.pid for p in procs]
            if profile is not None:
                profilers = await self._start_profilers(profile, seconds)
                groups["profiler"] = [p.pid for p in profilers]
            meter = _Meter(groups)

            async def read_all() -> None:
                for proc in procs:
                    assert proc.stdout is not None
                    line = await asyncio.wait_for(proc.stdout.readline(), seconds + 60)
                    summaries.append(msgspec.json.decode(line, type=ReserveSummary))

            reading = asyncio.create_task(read_all())
            # The window closes after `seconds`, or once every generator ran out of fans.
            await asyncio.wait({reading}, timeout=seconds)
            again = {"postgres": await self.postgres_backends()}
            elapsed, cpu = meter.read(again)
            await reading
            for proc in procs:
                await proc.wait()
            for profiler in profilers:
                await asyncio.wait_for(profiler.wait(), seconds + 60)
        finally:
            for proc in [*procs, *profilers]:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        for i in range(len(shares)):
            # The fans' tokens and passes (megabytes per round): not kept.
            (self.work_dir / f"reserve-{tag}-{i}.txt").unlink(missing_ok=True)
        latencies: list[float] = []
        for out in outs:
            values = array("d")
            values.frombytes(out.read_bytes())
            latencies.extend(values)
            out.unlink()
        statuses: dict[int, int] = {}
        for summary in summaries:
            for code, count in summary.statuses.items():
                statuses[int(code)] = statuses.get(int(code), 0) + count
        after_metrics = await self.worker_metrics()
        after_inbox = await self.inbox_added(event_id)
        answered = sum(statuses.values())
        forwarded: dict[str, Any] = {
            "answered": answered,
            "inbox_entries": after_inbox - before_inbox,
        }
        if before_metrics is not None and after_metrics is not None:
            delta = {k: v - before_metrics[k] for k, v in after_metrics.items()}
            forwarded["metric"] = delta["waitroom_inventory_forwarded_total"]
            forwarded["commits"] = delta["waitroom_inventory_batch_size_count"]
            forwarded["committed"] = delta["waitroom_inventory_batch_size_sum"]
            forwarded["commit_s"] = delta["waitroom_inventory_commit_seconds_sum"]
        unused = [
            f
            for summary, chunk in zip(summaries, slices, strict=True)
            for f in chunk[summary.sent :]
        ]
        gen_cpu = [s.cpu_s for s in summaries]
        self.generators_cpu_s += sum(gen_cpu)
        return (
            _Round(
                kind="reserve",
                connections=connections,
                rps=sum(s.completed / max(s.window_s, 1e-9) for s in summaries),
                latencies=latencies,
                statuses=statuses,
                connections_lost=sum(s.connections_lost for s in summaries),
                window_s=min(s.window_s for s in summaries),
                cpu_s={k: round(v, 3) for k, v in cpu.items()},
                system_s={k: round(v, 3) for k, v in meter.system.items()},
                cpu_pct=_pct(elapsed, cpu),
                generators_cpu_s=gen_cpu,
                completed=sum(s.completed for s in summaries),
                sent=sum(s.sent for s in summaries),
                ran_out=any(s.ran_out_s is not None for s in summaries),
                forwarded=forwarded,
                connections_by_worker=split,
            ),
            unused,
        )

    async def _start_profilers(
        self, directory: Path, seconds: float
    ) -> list[asyncio.subprocess.Process]:
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        procs: list[asyncio.subprocess.Process] = []
        for name, pid in (("owner", self.owner_pid), ("other", self.other_pid)):
            commands: list[tuple[str, list[str]]] = []
            if self.args.py_spy:
                commands.append(
                    (
                        f"py-spy-{name}",
                        [
                            self.args.py_spy,
                            "record",
                            f"--pid={pid}",
                            f"--duration={max(1, round(seconds))}",
                            f"--rate={self.args.profile_rate}",
                            "--format=raw",
                            # Stopping the worker for each sample (a few % of its time):
                            # stacks read while it runs come out torn under this load.
                            *(["--nonblocking"] if self.args.profile_nonblocking else []),
                            f"--output={directory / f'{name}.txt'}",
                        ],
                    )
                )
            if self.args.perf:
                commands.append(
                    (
                        f"perf-{name}",
                        [
                            self.args.perf,
                            "record",
                            "-F",
                            "499",
                            "-p",
                            str(pid),
                            "-o",
                            str(directory / f"perf-{name}.data"),
                            "--",
                            "sleep",
                            str(seconds),
                        ],
                    )
                )
            for label, argv in commands:
                with (directory / f"{label}.log").open("wb") as log:
                    procs.append(
                        await asyncio.create_subprocess_exec(
                            *argv, stdout=log, stderr=subprocess.STDOUT
                        )
                    )
        return procs

    async def join_round(self, event_id: str, *, seconds: float, warmup: float) -> _Round:
        # The fixed processes only (CpuMeter does not follow backends that come and go).
        groups = {k: v for k, v in (await self.groups()).items() if not k.startswith("postgres")}
        result: LoadResult = await run_load(
            port=self.port,
            method="POST",
            path=f"/v1/events/{event_id}/queue",
            connections=self.args.join_connections,
            generators=self.args.generators,
            seconds=seconds,
            warmup=warmup,
            ip_offset=self.next_ip_offset(),
            work_dir=self.work_dir,
            watch=groups,
        )
        return _Round(
            kind="join",
            connections=self.args.join_connections,
            rps=result.rps,
            latencies=result.latencies,
            statuses=result.statuses,
            connections_lost=result.connections_lost,
            window_s=result.window_s,
            cpu_pct=result.cpu_pct,
            completed=round(result.rps * result.window_s),
        )


# --- the run ----------------------------------------------------------------------------------


def _side(rounds: list[_Round]) -> dict[str, Any]:
    """One side's figures, its rounds pooled."""
    latencies = [v for r in rounds for v in r.latencies]
    statuses: dict[int, int] = {}
    cpu_pct: dict[str, float] = {}
    for r in rounds:
        for code, count in r.statuses.items():
            statuses[code] = statuses.get(code, 0) + count
        for key, value in r.cpu_pct.items():
            cpu_pct[key] = cpu_pct.get(key, 0.0) + value / len(rounds)
    window = sum(r.window_s for r in rounds)
    side: dict[str, Any] = {
        "rps": round(sum(r.rps * r.window_s for r in rounds) / max(window, 1e-9), 1),
        "rps_by_round": [round(r.rps, 1) for r in rounds],
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "p99_ms_by_round": [round(percentile(r.latencies, 99) * 1000, 2) for r in rounds],
        "max_ms": round(max(latencies, default=0.0) * 1000, 2),
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connections_lost": sum(r.connections_lost for r in rounds),
        "cpu_pct": {k: round(v, 1) for k, v in cpu_pct.items()},
    }
    if rounds and rounds[0].kind == "reserve":
        side.update(_reserve_side(rounds))
    return side


#: The groups of processes whose CPU a reservation does not cost (every other group does:
#: the server's processes, Redis and the database's backends).
_NOT_STACK = ("postgres_background", "generators", "profiler", "other", "machine")


def _reserve_side(rounds: list[_Round]) -> dict[str, Any]:
    completed = sum(r.completed for r in rounds)
    cpu: dict[str, float] = {}
    system: dict[str, float] = {}
    for r in rounds:
        for key, value in r.cpu_s.items():
            cpu[key] = cpu.get(key, 0.0) + value
        for key, value in r.system_s.items():
            system[key] = system.get(key, 0.0) + value
    per = max(completed, 1)
    stack = [k for k in cpu if k not in _NOT_STACK]
    answered = sum(r.forwarded.get("answered", 0) for r in rounds)
    inbox = sum(r.forwarded.get("inbox_entries", 0) for r in rounds)
    metric_rounds = [r for r in rounds if "metric" in r.forwarded]
    metric = sum(r.forwarded["metric"] for r in metric_rounds)
    metric_answered = sum(r.forwarded["answered"] for r in metric_rounds)
    commits = sum(r.forwarded.get("commits", 0) for r in metric_rounds)
    committed = sum(r.forwarded.get("committed", 0) for r in metric_rounds)
    commit_s = sum(r.forwarded.get("commit_s", 0) for r in metric_rounds)
    return {
        "completed": completed,
        "sent": sum(r.sent for r in rounds),
        "fans_ran_out": any(r.ran_out for r in rounds),
        "cpu_ms_per_reservation": round(sum(cpu[k] for k in stack) * 1000 / per, 3),
        "cpu_ms_per_reservation_by_process": {
            k: round(cpu[k] * 1000 / per, 3)
            for k in (*stack, "postgres_background", "generators", "profiler", "other")
            if k in cpu
        },
        "system_share_by_process": {
            k: round(system[k] / cpu[k], 3) for k in stack if cpu.get(k) and k in system
        },
        "forwarded_share": (round(metric / max(metric_answered, 1), 3) if metric_rounds else None),
        "forwarded": {
            "commands": metric if metric_rounds else None,
            "answered": answered,
            "rounds_with_metric": len(metric_rounds),
            "inbox_entries": inbox,
            "commands_per_inbox_entry": (
                round(metric / inbox, 2) if metric_rounds and inbox else None
            ),
        },
        # The owner's group commits: at HTTP rates they are small, and each costs round trips.
        "actor_commits": {
            "commits": commits,
            "mean_batch": round(committed / commits, 1) if commits else None,
            "mean_commit_ms": round(commit_s * 1000 / commits, 2) if commits else None,
        },
        "connections_by_worker_by_round": [r.connections_by_worker for r in rounds],
        "generators_cpu_s_by_round": [r.generators_cpu_s for r in rounds],
    }


async def _events(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, args: argparse.Namespace
) -> tuple[str, str, str]:
    now = datetime.now(UTC)
    room = catalogue.RoomSpec(
        rate_per_second=args.admit_rate,
        max_active=10_000_000,
        pass_ttl_s=3600,
        hold_ttl_s=3600,
        abandon_grace_s=86_400,
    )

    async def create(name: str, stock: int) -> str:
        spec = catalogue.EventCreate(
            name=f"checkout benchmark ({name})",
            ticket_types=[catalogue.TicketTypeSpec(TICKET_TYPE, stock, 4500, "EUR")],
            room=room,
        )
        return (await catalogue.create_event(pool, spec, actor="stress", now=now)).id

    checkout = await create("checkout", args.stock)
    sellout = await create("sell-out", args.sellout_tickets)
    join = await create("join", 1_000_000)
    await operators.update_admission(
        pool, redis, keys, join, operators.make_patch(paused=True), actor="stress"
    )
    return checkout, sellout, join


async def _sellout_checks(pool: asyncpg.Pool[Any], event_id: str, accepted: int) -> dict[str, int]:
    row = await pool.fetchrow(
        "SELECT quantity, held, sold FROM ticket_types WHERE event_id = $1", event_id
    )
    assert row is not None
    holds = await pool.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(quantity), 0) AS tickets FROM holds"
        " WHERE event_id = $1 AND status IN ('held', 'paid')",
        event_id,
    )
    assert holds is not None
    quantity, held, sold = int(row["quantity"]), int(row["held"]), int(row["sold"])
    return {
        "quantity": quantity,
        "held": held,
        "sold": sold,
        "holds_rows": int(holds["n"]),
        "holds_tickets": int(holds["tickets"]),
        "accepted_201": accepted,
        "oversold": max(
            0, held + sold - quantity, int(holds["tickets"]) - quantity, accepted - quantity
        ),
        "acked_missing": max(0, accepted - int(holds["n"])),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    concurrencies = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    base = load_settings()
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        work_dir = Path(tempfile.mkdtemp(prefix="waitroom-stress-checkout-"))
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(work_dir),
            log_level="warning",
            port=free_port(),
            admission_loop=True,
            # Fans come from this machine with a made-up X-Forwarded-For each, as a reverse
            # proxy on 127.0.0.1 would send them (as in `python -m stress join`).
            trusted_proxies=("127.0.0.1/32",),
            # The join side measures the join itself, as `python -m stress join` does.
            challenge=False,
        )
        keys = Keys(prefix)
        # One connection: its backend is left out of the server's PostgreSQL CPU.
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        redis = redis_from_url(settings.redis_url)
        try:
            result = await _run(args, concurrencies, settings, pool, redis, keys, work_dir)
        finally:
            await redis.aclose()
            await pool.close()
    if result["ok"]:
        await asyncio.to_thread(shutil.rmtree, work_dir, ignore_errors=True)
    else:
        result["work_dir"] = str(work_dir)  # the server's log is there
    return result


async def _run(
    args: argparse.Namespace,
    concurrencies: list[int],
    settings: Settings,
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    work_dir: Path,
) -> dict[str, Any]:
    bench = _Bench(args, settings, pool, redis, keys, work_dir)
    checkout, sellout, join_event = await _events(pool, redis, keys, args)
    bench.redis_pid = int((await redis.info("server"))["process_id"])
    argv = [sys.executable, "-m", "waitroom", "serve", "--workers", str(args.server_workers)]
    checks: dict[str, Any] = {}
    per_round = args.seconds / args.rounds
    sides: dict[str, list[_Round]] = {f"reserve_{c}": [] for c in concurrencies}
    sides["join"] = []
    profile_round: _Round | None = None
    sell: dict[str, Any] = {}
    async with server_process(argv, settings, work_dir / "server.log") as proc:
        bench.server_pid = proc.pid
        workers = await _workers_up(proc.pid, args.server_workers, settings.port)
        # The first join of each room loads it into Redis: outside the windows.
        status, _ = await _http(
            settings.port,
            "POST",
            f"/v1/events/{join_event}/queue",
            {"X-Forwarded-For": "192.0.2.1"},
        )
        if status != 201:
            raise RuntimeError(f"the first join of the join room answered {status}")
        # Fans for the first round (or all of them, with --fans).
        fixed = args.fans > 0
        first = args.fans if fixed else _need(args, concurrencies[0], per_round, None)
        pool_fans = await bench.make_fans(checkout, first)
        _say(args, f"{len(pool_fans)} fans admitted in {bench.setup_s:.1f} s")
        checks["passes_differing"] = await bench.passes_differing(
            checkout, pool_fans[:_PASS_SAMPLE]
        )
        checks["passes_sampled"] = min(_PASS_SAMPLE, len(pool_fans))
        # The first reservation decides which worker hosts the event's actor.
        probe = pool_fans.pop()
        status, _ = await _http(
            settings.port,
            "POST",
            f"/v1/events/{checkout}/reservations",
            {
                "Authorization": f"Bearer {probe.token}",
                "X-Queue-Pass": probe.queue_pass,
                "Idempotency-Key": "probe",
                "Content-Type": "application/json",
            },
            RESERVE_BODY,
        )
        checks["probe_status"] = status
        accepted_checkout = 1 if status == 201 else 0
        bench.owner_pid = await bench.owner_pid_of(checkout)
        others = [w for w in workers if w != bench.owner_pid]
        bench.other_pid = others[0] if others else 0
        checks["owner_is_worker"] = bench.owner_pid in workers
        _say(args, f"the actor lives in worker {bench.owner_pid} (workers {workers})")
        phases: list[tuple[str, int]] = [(f"reserve_{c}", c) for c in concurrencies]
        phases.append(("join", args.join_connections))
        reserve_rounds = len(concurrencies) * args.rounds
        done_reserve = 0
        for round_ in range(args.rounds):
            order = phases if round_ % 2 == 0 else phases[::-1]
            for name, connections in order:
                if name == "join":
                    result = await bench.join_round(
                        join_event, seconds=per_round, warmup=args.warmup
                    )
                else:
                    if fixed:
                        take = len(pool_fans) // max(1, reserve_rounds - done_reserve)
                    else:
                        take = _need(args, connections, per_round, sides)
                        if len(pool_fans) < take and bench.fans_admitted < args.max_fans:
                            more = min(max(take - len(pool_fans), 5000), args.max_fans)
                            pool_fans += await bench.make_fans(checkout, more)
                            _say(args, f"{more} more fans admitted")
                    batch, pool_fans = pool_fans[:take], pool_fans[take:]
                    result, unused = await bench.reserve_round(
                        checkout,
                        batch,
                        connections,
                        seconds=per_round,
                        warmup=args.warmup,
                        tag=f"r{round_}c{connections}",
                    )
                    pool_fans = unused + pool_fans
                    accepted_checkout += result.statuses.get(201, 0)
                    done_reserve += 1
                sides[name].append(result)
                _say(
                    args,
                    f"round {round_ + 1} {name}: {result.rps:.0f} req/s,"
                    f" p99 {percentile(result.latencies, 99) * 1000:.1f} ms,"
                    f" statuses {dict(sorted(result.statuses.items()))}"
                    + (
                        f", connections {result.connections_by_worker}"
                        if result.kind == "reserve"
                        else ""
                    ),
                )
        if (args.py_spy or args.perf) and args.profile_dir:
            connections = concurrencies[0]
            take = _need(args, connections, args.profile_seconds, sides)
            if len(pool_fans) < take and not fixed:
                pool_fans += await bench.make_fans(checkout, take - len(pool_fans))
            batch, pool_fans = pool_fans[:take], pool_fans[take:]
            profile_round, _ = await bench.reserve_round(
                checkout,
                batch,
                connections,
                seconds=args.profile_seconds,
                warmup=args.warmup,
                tag="profile",
                profile=Path(args.profile_dir),
            )
            accepted_checkout += profile_round.statuses.get(201, 0)
            _say(args, f"profiled round: {profile_round.rps:.0f} req/s")
        # The sell-out: more fans than tickets, each trying once.
        sell_fans_n = args.sellout_fans or 2 * args.sellout_tickets
        sell_fans = await bench.make_fans(sellout, sell_fans_n)
        sell_round, _ = await bench.reserve_round(
            sellout,
            sell_fans,
            concurrencies[0],
            seconds=60.0,
            warmup=0.0,
            tag="sellout",
        )
        sell = dict(await _sellout_checks(pool, sellout, sell_round.statuses.get(201, 0)))
        sell.update(
            fans=len(sell_fans),
            tried=sell_round.sent,
            statuses={str(k): v for k, v in sorted(sell_round.statuses.items())},
            rps=round(sell_round.rps, 1),
        )
        _say(args, f"sell-out: {sell}")
        checks["owner_pid_at_end"] = await bench.owner_pid_of(checkout)
    checks["server_exit_code"] = proc.returncode
    checks["server_stopped_cleanly"] = stopped_cleanly(proc)
    holds = int(
        await pool.fetchval("SELECT count(*) FROM holds WHERE event_id = $1", checkout) or 0
    )
    checks["checkout_holds_rows"] = holds
    checks["checkout_accepted_201"] = accepted_checkout
    checks["acked_missing"] = max(0, accepted_checkout - holds) + sell["acked_missing"]
    return await _report(args, concurrencies, bench, sides, profile_round, sell, checks)


async def _workers_up(pid: int, expected: int, port: int) -> list[int]:
    """The server's worker pids once all ``expected`` are there and it answers on ``port``."""
    deadline = time.monotonic() + 60
    while True:
        workers = worker_pids(pid)
        if len(workers) >= expected and workers != [pid]:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server has {len(workers)} workers, not {expected}")
        await asyncio.sleep(0.1)
    # Each worker accepts once its lifespan is done: ask until a run of answers is all 200.
    for _ in range(20):
        status, _ = await _http(port, "GET", "/readyz")
        if status != 200:
            await asyncio.sleep(0.2)
    return workers


def _need(
    args: argparse.Namespace,
    connections: int,
    seconds: float,
    sides: dict[str, list[_Round]] | None,
) -> int:
    """Fans a reservation round could use: the best rate seen (or expected), with room."""
    seen = [r.rps for rounds in (sides or {}).values() for r in rounds if r.kind == "reserve"]
    rate = max([*seen, 0.0]) or args.expect_rps
    return int(rate * 1.5 * (args.warmup + seconds)) + 4 * connections


async def _report(
    args: argparse.Namespace,
    concurrencies: list[int],
    bench: _Bench,
    sides: dict[str, list[_Round]],
    profile_round: _Round | None,
    sell: dict[str, Any],
    checks: dict[str, Any],
) -> dict[str, Any]:
    pooled = {name: _side(rounds) for name, rounds in sides.items()}
    join = pooled["join"]
    reserve = {c: pooled[f"reserve_{c}"] for c in concurrencies}
    first = reserve[concurrencies[0]]
    all_reserve = [r for c in concurrencies for r in sides[f"reserve_{c}"]]
    overall = _reserve_side(all_reserve)
    ratio = first["rps"] / max(join["rps"], 1e-9)
    bad_reserve = sum(
        n for side in reserve.values() for code, n in side["statuses"].items() if code != "201"
    )
    bad_join = sum(n for code, n in join["statuses"].items() if code != "201")
    lost = sum(side["connections_lost"] for side in pooled.values())
    ok = (
        bad_reserve == 0
        and bad_join == 0
        and lost == 0
        and checks["probe_status"] == 201
        and checks["passes_differing"] == 0
        and checks["owner_is_worker"]
        and checks["acked_missing"] == 0
        and sell["oversold"] == 0
        # Every fan of the sell-out round is answered: a hold, or a refusal (409 sold out);
        # a 503 there is a reservation lost to the server, not to the stock.
        and set(sell.get("statuses", {})) <= {"201", "409"}
        and checks["server_stopped_cleanly"]
    )
    result: dict[str, Any] = {
        "benchmark": "checkout",
        "ok": ok,
        "http_reserve_rps": {str(c): side["rps"] for c, side in reserve.items()},
        "http_reserve_p99_ms": {str(c): side["p99_ms"] for c, side in reserve.items()},
        "http_reserve_p50_ms": {str(c): side["p50_ms"] for c, side in reserve.items()},
        "join_rps": join["rps"],
        "join_p99_ms": join["p99_ms"],
        "ratio_vs_join": round(ratio, 3),
        "forwarded_share": overall["forwarded_share"],
        "forwarded_share_by_concurrency": {
            str(c): side["forwarded_share"] for c, side in reserve.items()
        },
        "forwarded": overall["forwarded"],
        "cpu_ms_per_reservation": overall["cpu_ms_per_reservation"],
        "cpu_ms_per_reservation_by_concurrency": {
            str(c): side["cpu_ms_per_reservation"] for c, side in reserve.items()
        },
        "cpu_ms_per_reservation_by_process": overall["cpu_ms_per_reservation_by_process"],
        "system_share_by_process": overall["system_share_by_process"],
        "actor_commits": {str(c): side["actor_commits"] for c, side in reserve.items()},
        "oversold": sell["oversold"],
        "targets": {
            "http_reserve_rps_50": TARGET_RPS,
            "http_reserve_p99_ms_50": TARGET_P99_MS,
            "ratio_vs_join": TARGET_RATIO,
            "oversold": 0,
        },
        "met": {
            "http_reserve_rps_50": first["rps"] >= TARGET_RPS,
            "http_reserve_p99_ms_50": first["p99_ms"] <= TARGET_P99_MS,
            "ratio_vs_join": ratio >= TARGET_RATIO,
            "oversold": sell["oversold"] == 0,
        },
        "bad_answers": bad_reserve + bad_join,
        "owner": {
            "worker_pid": bench.owner_pid,
            "other_pid": bench.other_pid,
            "decided_by": "the first reservation (one request on a fresh connection)",
            "same_at_end": checks.get("owner_pid_at_end") == bench.owner_pid,
        },
        "sellout": sell,
        "fans": {
            "joined": bench.fans_joined,
            "admitted": bench.fans_admitted,
            "join_statuses": bench.join_statuses,
            "setup_s": round(bench.setup_s, 1),
            "generators_cpu_s": round(bench.generators_cpu_s, 1),
        },
        **checks,
        "params": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "concurrency": concurrencies,
            "join_connections": args.join_connections,
            "generators": args.generators,
            "server_workers": args.server_workers,
            "stock": args.stock,
            "admit_rate": args.admit_rate,
            "fans": args.fans or "as needed",
            "sellout_tickets": args.sellout_tickets,
            "challenge": False,
            "one_fan_per_reservation": True,
        },
        "sides": pooled,
    }
    if profile_round is not None:
        profile = _side([profile_round])
        directory = Path(args.profile_dir)
        # The samples' shares apportion what each worker spent per reservation in the
        # measured rounds at the same concurrency: the profiled round itself runs slower
        # (py-spy stops the worker for every sample) and is kept out of the figures.
        measured = first["cpu_ms_per_reservation_by_process"]
        system_share = first["system_share_by_process"]
        breakdown: dict[str, Any] = {}
        for name in ("owner", "other"):
            raw = directory / f"{name}.txt"
            if args.py_spy and await asyncio.to_thread(raw.exists):
                cpu_s = measured.get(f"{name}_worker", 0.0) / 1000
                breakdown[name] = profile_breakdown(
                    await asyncio.to_thread(raw.read_text),
                    cpu_s=cpu_s,
                    system_s=cpu_s * system_share.get(f"{name}_worker", 0.0),
                    reservations=1,
                )
            data = directory / f"perf-{name}.data"
            if args.perf and await asyncio.to_thread(data.exists):
                breakdown[f"perf_{name}"] = await perf_breakdown(args.perf, data)
        if "owner" in breakdown and "other" in breakdown:
            breakdown["both_workers"] = _both([breakdown["owner"], breakdown["other"]])
        result["profile"] = {
            "rps": profile["rps"],
            "p99_ms": profile["p99_ms"],
            "cpu_ms_per_reservation": profile["cpu_ms_per_reservation"],
            "cpu_ms_per_reservation_by_process": profile["cpu_ms_per_reservation_by_process"],
            "system_share_by_process": profile["system_share_by_process"],
            "cpu_pct": profile["cpu_pct"],
            "connections_by_worker": profile_round.connections_by_worker,
            "forwarded_share": profile["forwarded_share"],
            "dir": str(directory),
            "us_per_reservation_at": f"the measured rounds at {concurrencies[0]} clients",
            "us_per_reservation": breakdown,
        }
    return result


# --- where a worker's CPU goes (py-spy raw stacks, perf) ---------------------------------------

#: Our code, by component: the innermost frame of ours (libraries our code calls, such as
#: redis-py, asyncpg or prometheus_client, count for the caller) is matched against these,
#: in order, as ``function (path:line)`` the way py-spy writes a frame.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("pass gate", r"^\S+ \(admission/passes\.py|^require_pass "),
    ("identity (visitor token)", r"\(waitroom/line/identity\.py|^_fan \(waitroom/checkout_api"),
    ("checkout rate limit", r"^charge_write |\(waitroom/line/(buckets|ratelimit)\.py"),
    ("idempotency key check", r"^_idempotency_key "),
    ("forwarding", r"\(inventory/forwarding\.py"),
    ("inventory host", r"\(inventory/hosting\.py"),
    ("actor, ledger, commit", r"\(inventory/"),
    ("json in and out", r"^(read_json|decode_json|read_body|_is_json|JSONResponse\.\S+) "),
    ("our middleware", r"\(waitroom/core/(http|deadline)\.py|^CatchAllMiddleware"),
    ("route guard", r"\(waitroom/core/openapi\.py"),
    ("checkout handler", r"\(waitroom/(checkout_api|services)\.py|\(waitroom/core/cache\.py"),
    ("admission loop", r"\(admission/"),
    ("line and broadcast", r"\(waitroom/line/"),
    ("our other code", r"."),
)
#: Third-party libraries, by the top of a frame's path.
LIBRARIES = {
    "redis": "redis-py",
    "asyncpg": "asyncpg",
    "uvicorn": "uvicorn",
    "starlette": "starlette",
    "prometheus_client": "prometheus_client",
    "anyio": "anyio",
    "msgspec": "msgspec",
    "jwt": "pyjwt",
    "cryptography": "cryptography",
    "httptools": "httptools",
    "uvloop": "uvloop",
}
#: Libraries our code calls: their time counts for the caller in the component view.
_CALLED = {"redis", "asyncpg", "prometheus_client", "anyio", "msgspec", "jwt", "cryptography"}
_OURS = ("waitroom", "admission", "inventory", "workers")
#: uvicorn's frames that serve HTTP (the others start the process and run the loop).
_UVICORN_HTTP = re.compile(r"\(uvicorn/(protocols|middleware)/")
#: Innermost frames where a worker makes a system call that wakes another process (a socket
#: write to Redis or to the client) or sits in uvloop's C code. On a busy machine the woken
#: process often takes the core right there, and py-spy (which samples runnable threads,
#: not only running ones) keeps finding the worker at these places: they are counted on
#: their own, and left out of the views that apportion the worker's user CPU.
LEAVES: tuple[tuple[str, str], ...] = (
    ("Redis socket writes (StreamWriter.write/writelines)", r"^StreamWriter\.write"),
    ("response socket writes (uvicorn send)", r"^RequestResponseCycle\.send "),
    ("inside the event loop (uvloop, C)", r"^Runner\.run |^run_until_complete "),
)
#: Frames anywhere in a stack whose cost is worth seeing on its own.
OF_NOTE: tuple[tuple[str, str], ...] = (
    ("redis-py observability hooks", r"\(redis/(asyncio/)?observability/"),
    ("asyncio.timeout", r"\(asyncio/timeouts\.py"),
    ("prometheus_client", r"\(prometheus_client/"),
    ("logging", r"\(logging/"),
    ("Ed25519 / pyjwt", r"\((cryptography|jwt)/|\bverify \(admission/passes"),
)
_COMPONENT_RES = tuple((n, re.compile(p)) for n, p in COMPONENTS)
_LEAF_RES = tuple((n, re.compile(p)) for n, p in LEAVES)
_NOTE_RES = tuple((n, re.compile(p)) for n, p in OF_NOTE)
_FRAME_PATH = re.compile(r"\(([^/:)]+)[/.]")


def _top(frame: str) -> str:
    match = _FRAME_PATH.search(frame)
    top = match.group(1) if match else ""
    if top == "uvicorn" and not _UVICORN_HTTP.search(frame):
        return ""  # starting the worker and running its loop: not the HTTP layer
    return top


def _component(frames: Sequence[str]) -> str:
    called = ""
    for frame in reversed(frames):
        top = _top(frame)
        if top in _OURS:
            for name, pattern in _COMPONENT_RES:
                if pattern.search(frame):
                    return name
        if top in ("starlette", "uvicorn"):
            return LIBRARIES[top]
        if top in _CALLED and not called:
            called = LIBRARIES[top]
    return called or "event loop and stdlib"


def _library(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        top = _top(frame)
        if top in LIBRARIES:
            return LIBRARIES[top]
        if top in _OURS:
            return "our code"
    return "event loop and stdlib"


def _leaf(frames: Sequence[str]) -> str | None:
    if frames[0].startswith("Thread._bootstrap "):
        # Not the event loop's thread: uvicorn's pipe to its supervisor, blocked in recv
        # (py-spy, stopping the process for each sample, counts such threads as busy).
        return "other threads (idle)"
    for name, pattern in _LEAF_RES:
        if pattern.search(frames[-1]):
            return name
    return None


def profile_breakdown(
    raw: str, *, cpu_s: float, system_s: float, reservations: int
) -> dict[str, Any]:
    """py-spy's raw stacks of one worker as microseconds of its CPU per reservation.

    Each line of ``raw`` is ``frame;...;frame count``, outermost first; a sample is the code
    running (or runnable) at that moment: a coroutine awaiting a reply is not on any stack.
    The worker's system CPU (``system_s``, from /proc) is reported as it is; its user CPU is
    apportioned over the samples not taken at a system call (:data:`LEAVES`, counted apart):
    by our component (the innermost frame of our code, the libraries it calls counting for
    it; time under starlette's or uvicorn's HTTP frames for them), by library (the innermost
    frame outside the standard library), and for a few frames of note wherever they are.
    """
    views: dict[str, dict[str, int]] = {"by_component": {}, "by_library": {}, "of_note": {}}
    leaves: dict[str, int] = {}
    total = apportioned = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        leaf = _leaf(frames)
        if leaf is not None:
            leaves[leaf] = leaves.get(leaf, 0) + n
            continue
        apportioned += n
        for view, key in (("by_component", _component(frames)), ("by_library", _library(frames))):
            views[view][key] = views[view].get(key, 0) + n
        for name, pattern in _NOTE_RES:
            if any(pattern.search(frame) for frame in frames):
                views["of_note"][name] = views["of_note"].get(name, 0) + n
    per = 1e6 / max(reservations, 1)
    user_us = (cpu_s - system_s) * per
    out: dict[str, Any] = {
        "samples": total,
        "cpu_us_per_reservation": round(cpu_s * per, 1),
        "system_us_per_reservation": round(system_s * per, 1),
        "user_us_per_reservation": round(user_us, 1),
        "samples_at_system_calls_share": {
            k: round(v / max(total, 1), 3) for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])
        },
    }
    for view, counts in views.items():
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])
        out[f"user_us_{view}"] = {
            k: round(user_us * v / max(apportioned, 1), 1) for k, v in ordered
        }
    return out


def _both(breakdowns: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The per-reservation figures of several workers added up, view by view."""
    out: dict[str, Any] = {}
    for key in ("cpu_us_per_reservation", "system_us_per_reservation", "user_us_per_reservation"):
        out[key] = round(sum(b[key] for b in breakdowns), 1)
    for view in ("user_us_by_component", "user_us_by_library", "user_us_of_note"):
        summed: dict[str, float] = {}
        for b in breakdowns:
            for k, v in b[view].items():
                summed[k] = summed.get(k, 0.0) + v
        out[view] = {k: round(v, 1) for k, v in sorted(summed.items(), key=lambda kv: -kv[1])}
    return out


async def perf_breakdown(perf: str, data: Path) -> dict[str, Any]:
    """``perf report`` of one worker's on-CPU samples: shares by shared object, and the
    heaviest kernel and interpreter symbols (perf samples only a thread that is running,
    so it shows where CPU went, system calls included, unlike py-spy's runnable threads)."""

    async def report(*sort: str) -> list[tuple[float, str]]:
        proc = await asyncio.create_subprocess_exec(
            perf,
            "report",
            "-i",
            str(data),
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "--percent-limit",
            "0.3",
            "--sort",
            ",".join(sort),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        rows: list[tuple[float, str]] = []
        for line in out.decode(errors="replace").splitlines():
            match = re.match(r"^\s+([\d.]+)%\s+(\S.*?)\s*$", line)
            if match:
                rows.append((float(match.group(1)), re.sub(r"\s+", " ", match.group(2))))
        return rows

    by_dso = await report("dso")
    by_symbol = await report("dso", "sym")
    return {
        "by_dso_pct": {name: pct for pct, name in by_dso},
        "top_symbols_pct": {name: pct for pct, name in by_symbol[:25]},
    }


if __name__ == "__main__":
    sys.exit(main())
