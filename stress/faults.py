"""Faults mid-sale: a whole stack on private Redis and PostgreSQL, a fault, and the invariants.

Shared by ``tests/test_faults.py`` (small sales, one per fault) and ``python -m stress chaos``
(the flash sale once without a fault and once per fault). :func:`run_fault_sale` does it all:

1. **The stack.** A PRIVATE Redis (``appendonly yes``, ``appendfsync everysec`` when the fault
   needs the append-only file) and a PRIVATE PostgreSQL cluster on free ports, from
   ``stress/private_services.py``; the machine's shared Redis and PostgreSQL are never touched.
   The database is created and migrated by ``python -m waitroom migrate``; then
   :func:`stress.stack.running_stack` starts the mock provider, one ``waitroom serve
   --workers 1`` and ``waitroom workers``, and for ``server_kill`` a second server on another
   port. Every process is ours and is signalled by its pid only.
2. **The fans** (:mod:`stress.crowd`): they arrive over ``arrival_s``, join, poll their place,
   join again with their place receipt when told they are no longer in line, reserve, pay
   and wait for the order to be paid; every request is recorded, 503s are retried after
   ``Retry-After``, a dropped connection on the other server when there are two.
3. **The fault** (:data:`FAULTS`), once a share of the tickets is paid: ``server_kill``
   (SIGKILL the server that owns the event's inventory, restart it after ``outage_s``),
   ``workers_kill`` (SIGKILL the workers mid-payments, restart), ``postgres_restart`` (stop
   fast, wait, start), ``redis_restart_empty`` (SIGKILL Redis, delete its data, start empty),
   ``redis_restart_aof`` (SIGKILL Redis and start it again from its append-only file). Before
   it, an admitted "sentinel" fan's pass is revoked through the admin API; the line is read
   from Redis just before and a few seconds after.
4. **The invariants**, from PostgreSQL, Redis, the provider and the fans' records:
   ``oversold``; ``acked_lost`` (a 201 reservation or 202 payment PostgreSQL does not have);
   ``double_charged`` (an order charged more than once at the provider, a hold with more
   than one paid order, an order with more than one succeeded payment); ``places_lost``
   (fans waiting before the fault who never got back in line, or not at their place) and
   ``order_inversions_after`` (pairs of such fans whose order in the line changed);
   ``max_active_exceeded`` (samples of the ``active`` set above ``max_active``, plus passes
   PostgreSQL shows issued while ``max_active`` others were live); ``revoked_accepted`` and
   ``spent_accepted`` (the revoked pass, or a paid fan's pass, not refused after the fault: a
   paid fan's pass may be refused by the gate, ``pass_spent``, or, should Redis have lost its
   marker, by the inventory ledger, ``pass_used``, listed in ``refused_otherwise``; what a
   check got instead of a refusal is listed in ``not_refused``);
   ``http_500`` (a 5xx other than 503), ``hung_requests`` (slower than the dependency
   timeout + 1 s); and whether the sale completed (every ticket sold, every fan done).

``recovery_s`` per route (join, position, reserve, pay) is the time from the fault's end to
the first success of the route: for a kill, the kill itself (the survivors must serve at
once); for a restart of PostgreSQL or Redis, the moment it answers again.

Every step of the harness itself is bounded (:class:`stress.crowd.Stalls`): a step that does
not finish in time is given up and named in ``harness_stalls``, which fails the run too.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
from redis.asyncio import Redis

from admission.passes import read_claims
from stress.common import free_port, percentile
from stress.crowd import Fan, Sale, SaleSpec
from stress.flash_sale import check, create_sale
from stress.private_services import PrivatePostgres, PrivateRedis
from stress.stack import ROOT, Stack, running_stack
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings, load_settings, settings_env

FAULTS = (
    "server_kill",
    "workers_kill",
    "postgres_restart",
    "redis_restart_empty",
    "redis_restart_aof",
)
#: The routes whose recovery is measured (each request is recorded under one route name).
ROUTES = ("join", "position", "reserve", "pay")
#: Answers that count as the route working (404 not_in_line after Redis lost the line and
#: 409 sold_out are right answers).
_SUCCESS = {"join": (200, 201), "position": (200, 404), "reserve": (201, 409), "pay": (202,)}
PREFIX = "chaos"


# --- the stack -------------------------------------------------------------------------------


class FaultStack:
    """The running stack of one sale: private Redis and PostgreSQL, servers, workers."""

    def __init__(
        self,
        settings: Settings,
        stack: Stack,
        redis_server: PrivateRedis,
        pg: PrivatePostgres,
        run_dir: Path,
    ) -> None:
        self.settings = settings
        self.stack = stack
        self.redis_server = redis_server
        self.pg = pg
        self.run_dir = run_dir
        self.ports = [int(stack.base_url.rsplit(":", 1)[1])]
        #: running_stack's processes are [provider, server, workers]; restarts replace them
        #: here and are appended to its list, so that it stops them too.
        self.server_procs = [stack.processes[1]]
        self.workers_proc = stack.processes[2]
        self._starts = 0

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def _env(self, port: int) -> dict[str, str]:
        return settings_env(
            msgspec.structs.replace(self.settings, port=port, payment_url=self.stack.provider_url)
        )

    async def _start(self, name: str, port: int, *argv: str) -> asyncio.subprocess.Process:
        self._starts += 1
        log = (self.run_dir / f"{name}-{self._starts}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=self._env(port), cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.stack.processes.append(proc)
        return proc

    async def start_server(self, index: int) -> None:
        """Start server ``index`` again on its port (or a new one on a free port past the
        last) and wait until it is ready."""
        port = self.ports[index] if index < len(self.ports) else free_port()
        proc = await self._start(
            f"server{index}", port, "-m", "waitroom", "serve", "--workers", "1"
        )
        if index < len(self.server_procs):
            self.server_procs[index] = proc
        else:
            self.ports.append(port)
            self.server_procs.append(proc)
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline and proc.returncode is None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"server {index} did not come up (see {self.run_dir})")

    async def start_workers(self) -> None:
        """Start ``waitroom workers`` again; one that exits within its first seconds (it logs
        only warnings here: nothing says it is up) is an error, not a silent stall of the
        sale."""
        proc = await self._start("workers", self.ports[0], "-m", "waitroom", "workers")
        self.workers_proc = proc
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), WORKERS_SETTLE_S)
        if proc.returncode is not None:
            log = self.run_dir / f"workers-{self._starts}.log"
            raise RuntimeError(f"the workers exited with {proc.returncode} (see {log})")

    @staticmethod
    async def kill(proc: asyncio.subprocess.Process) -> None:
        """SIGKILL one process of ours, by its pid, and reap it."""
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    async def owner_server(self, event_id: str) -> tuple[int, bool]:
        """The index of the server that owns the event's inventory (its lease names the
        pid) and True; or 0 and False when no server of ours does."""
        client = Redis.from_url(self.redis_server.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            owner = await client.get(Keys(PREFIX).event(event_id).owner)
        finally:
            await client.aclose()
        parts = owner.decode().split(":") if isinstance(owner, bytes) else []
        for i, proc in enumerate(self.server_procs):
            if len(parts) >= 2 and parts[-2] == str(proc.pid):
                return i, True
        return 0, False


#: A restarted workers process still running this long after it started is taken as up.
WORKERS_SETTLE_S = 2.0


@asynccontextmanager
async def fault_stack(run_dir: Path, *, aof: bool, servers: int) -> AsyncIterator[FaultStack]:
    """Private Redis and PostgreSQL, a migrated database, and the processes of a sale."""
    redis_server = await asyncio.to_thread(PrivateRedis, appendonly=aof)
    try:
        pg = await asyncio.to_thread(PrivatePostgres)
        try:
            settings = msgspec.structs.replace(
                load_settings(),
                redis_url=redis_server.url,
                redis_prefix=PREFIX,
                database_url=pg.dsn_for("waitroom_chaos"),
                run_dir=str(run_dir),
                admission_loop=True,
                log_level="warning",
                admin_token=secrets.token_hex(16),
                admin_tokens=(),
                # Every fan sends its own X-Forwarded-For from 127.0.0.1 (a trusted proxy).
                trusted_proxies=("127.0.0.1/32",),
                challenge=False,
            )
            migrated = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "waitroom", "migrate", env=settings_env(settings),
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(migrated.communicate(), 120)
            if migrated.returncode != 0:
                raise RuntimeError(f"waitroom migrate failed: {err.decode()[-2000:]}")
            async with running_stack(settings, run_dir) as stack:
                fs = FaultStack(settings, stack, redis_server, pg, run_dir)
                for index in range(1, servers):
                    await fs.start_server(index)
                yield fs
        finally:
            await asyncio.to_thread(pg.close)
    finally:
        await asyncio.to_thread(redis_server.close)


# --- the fault -------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    """When the fault happened and what was seen around it."""

    kind: str
    started: float = 0.0  # monotonic
    ended: float = 0.0  # monotonic: recovery is counted from here
    ended_wall: float = 0.0
    outage_s: float = 0.0
    victim: str = ""
    #: The line (fan id -> place) just before the fault, and settle_s after its end.
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    revoked_before: bool | None = None
    revoked_after: bool | None = None
    spent_sample: list[Fan] = field(default_factory=list)


async def _line(fs: FaultStack, event_id: str) -> dict[str, float]:
    client = Redis.from_url(fs.redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        raw: list[Any] = await client.zrange(
            Keys(PREFIX).event(event_id).queue, 0, -1, withscores=True
        )
        return {fan.decode(): float(score) for fan, score in raw}
    except Exception:  # Redis still loading after a restart: no picture of the line
        return {}
    finally:
        await client.aclose()


async def _sentinel(sale: Sale) -> tuple[Fan, str] | None:
    """A fan who joins first, is admitted and never buys: its pass is revoked before the
    fault. Returns it with its pass, or None if it got none."""
    fan = Fan(-1, "10.255.255.254", 0)
    body = await sale.join(fan)
    deadline = time.monotonic() + 20
    while body is not None and body["status"] != "admitted" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        response = await sale.http.call(
            fan,
            "check",
            "GET",
            f"/v1/events/{sale.event_id}/queue/me",
            headers=sale.headers(fan),
            deadline=deadline,
        )
        body = response.json() if response is not None and response.status_code == 200 else None
    if body is None or body["status"] != "admitted":
        return None
    queue_pass: str = body["queue_pass"]
    return fan, queue_pass


async def _revoke(sale: Sale, fs: FaultStack, fan: Fan, queue_pass: str) -> bool:
    claims = read_claims(queue_pass)
    assert claims is not None
    admin = {"Authorization": f"Bearer {fs.settings.admin_token}"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # 404 until the leader has recorded the pass
        response = await sale.http.call(
            fan,
            "check",
            "POST",
            f"/v1/admin/passes/{claims.jti}/revoke",
            headers=admin,
            deadline=deadline,
        )
        if response is not None and response.status_code == 200:
            return True
        await asyncio.sleep(0.2)
    return False


async def inject(kind: str, fs: FaultStack, sale: Sale, record: FaultRecord) -> None:
    """Wait for the trigger, then strike; fills ``record``. Every step is bounded."""
    spec = sale.spec
    step = sale.stalls.bounded
    sentinel = await step("sentinel", _sentinel(sale), 30, None)
    with contextlib.suppress(TimeoutError):
        by = sale.started + spec.fault_by_s - time.monotonic()
        await asyncio.wait_for(sale.progress.trigger.wait(), max(0.0, by))
    if sentinel is not None and await step("revoke", _revoke(sale, fs, *sentinel), 20, False):
        record.revoked_before = await step(
            "revoked check before", sale.refused(*sentinel, "pass_revoked"), 20, False
        )
    record.spent_sample = [f for f in sale.fans if f.state == "paid"][: spec.spent_checks]
    record.before = await step("line before", _line(fs, sale.event_id), 15, {})
    record.started = time.monotonic()
    if kind == "server_kill":
        victim, owner = await step("owner", fs.owner_server(sale.event_id), 10, (0, False))
        record.victim = f"server{victim}" + (" (the inventory owner)" if owner else "")
        await fs.kill(fs.server_procs[victim])
        record.ended = time.monotonic()
        await asyncio.sleep(spec.outage_s)
        await step("server restart", fs.start_server(victim), 45, None)
    elif kind == "workers_kill":
        record.victim = "workers"
        await fs.kill(fs.workers_proc)
        record.ended = time.monotonic()
        await asyncio.sleep(spec.outage_s)
        await step("workers restart", fs.start_workers(), 45, None)
    elif kind == "postgres_restart":
        await step("postgres stop", asyncio.to_thread(fs.pg.stop, "fast"), 45, None)
        await asyncio.sleep(spec.outage_s)
        await step("postgres start", asyncio.to_thread(fs.pg.start), 45, None)
    elif kind == "redis_restart_empty":
        await step("redis restart", asyncio.to_thread(fs.redis_server.restart_empty), 30, None)
    elif kind == "redis_restart_aof":
        await step("redis kill", asyncio.to_thread(fs.redis_server.kill), 20, None)
        await step("redis start", asyncio.to_thread(fs.redis_server.start), 30, None)
    else:
        raise ValueError(f"unknown fault {kind!r}")
    if not record.ended:
        record.ended = time.monotonic()
    record.ended_wall = time.time() - (time.monotonic() - record.ended)
    record.outage_s = time.monotonic() - record.started
    await asyncio.sleep(max(0.0, record.ended + spec.settle_s - time.monotonic()))
    record.after = await step("line after", _line(fs, sale.event_id), 15, {})
    if sentinel is not None and record.revoked_before is not None:
        record.revoked_after = await step(
            "revoked check after", sale.refused(*sentinel, "pass_revoked"), 20, False
        )


# --- the invariants ----------------------------------------------------------------------------


def inversions(pairs: Sequence[tuple[float, float]]) -> int:
    """Pairs ``(i, j)`` ordered one way by their first item and the other by their second."""
    values = [after for _, after in sorted(pairs)]

    def count(xs: list[float]) -> tuple[list[float], int]:
        if len(xs) < 2:
            return xs, 0
        left, a = count(xs[: len(xs) // 2])
        right, b = count(xs[len(xs) // 2 :])
        merged, n, i, j = [], a + b, 0, 0
        while i < len(left) and j < len(right):
            if right[j] < left[i]:
                merged.append(right[j])
                n += len(left) - i
                j += 1
            else:
                merged.append(left[i])
                i += 1
        return merged + left[i:] + right[j:], n

    return count(values)[1]


def places(sale: Sale, record: FaultRecord) -> dict[str, int]:
    """Fans in line before the fault: lost, moved, and inversions of their order after it."""
    by_id = {f.fan_id: f for f in sale.fans if f.fan_id}
    pairs: list[tuple[float, float]] = []
    lost = moved = 0
    for fan_id, before in record.before.items():
        fan = by_id.get(fan_id)
        if fan is None:
            continue  # the sentinel, or a join whose answer never arrived
        placed = [place for at, place in fan.places if at >= record.started]
        if placed:
            after: float | None = placed[0]
        else:
            after = record.after.get(fan_id)
        if after is None:
            if fan.queue_pass is None and fan.state not in ("sold_out", "paid"):
                lost += 1  # never back in line, never admitted, never told it sold out
            continue
        if after != before:
            moved += 1
        pairs.append((before, after))
    return {
        "places_lost": lost + moved,
        "places_never_back": lost,
        "places_moved": moved,
        "order_inversions_after": inversions(pairs),
        "fans_in_line_at_fault": len(record.before),
    }


_PASS_SPANS = """
SELECT extract(epoch FROM q.issued_at)::float8 AS start,
       least(extract(epoch FROM q.revoked_at), extract(epoch FROM q.expires_at),
             (SELECT extract(epoch FROM min(o.paid_at)) FROM holds h JOIN orders o
               ON o.hold_id = h.id WHERE h.pass_jti = q.jti AND o.status = 'paid'),
             (SELECT extract(epoch FROM max(h.updated_at)) FROM holds h WHERE h.pass_jti = q.jti
               HAVING count(*) > 0 AND bool_and(h.status IN ('cancelled', 'expired'))))::float8
         AS stop
FROM queue_passes q WHERE q.event_id = $1
"""


#: Each pass of the sale with its span and its holds (seq order), for a failure's report.
_PASS_DETAIL = f"""
SELECT s.seq, s.fan_id, s.start, s.stop,
       (SELECT string_agg(h.status || '@' || extract(epoch FROM h.updated_at)::float8, ' ')
          FROM holds h WHERE h.pass_jti = s.jti) AS holds
FROM (SELECT q.seq, q.fan_id, q.jti, p.start, p.stop
      FROM ({_PASS_SPANS.replace("SELECT", "SELECT q.jti,", 1)}) p
      JOIN queue_passes q ON q.jti = p.jti) s
ORDER BY s.seq
"""


def excess_admissions(spans: Sequence[tuple[float, float]], max_active: int) -> tuple[int, int]:
    """Passes issued while ``max_active`` others were live, and the peak of live passes.

    ``queue_passes.issued_at`` is the admission tick's time in whole seconds (the pass's
    ``iat``): a pass is taken as live from the end of that second (or its own end, if
    sooner), so that the figure never blames admission for the rounding.
    """
    events = sorted(
        [(stop, 0) for _, stop in spans] + [(min(start + 1, stop), 1) for start, stop in spans]
    )
    live = peak = excess = 0
    for _, starts in events:  # at a tie a pass ends before another begins
        if starts:
            live += 1
            excess += live > max_active
            peak = max(peak, live)
        else:
            live -= 1
    return excess, peak


async def _settle(conn: asyncpg.Connection[Any], event_id: str, bound_s: float) -> None:
    """Wait (bounded) for the last payments and the outbox's pass.spent to finish."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        busy = await conn.fetchval(
            "SELECT (SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id"
            "  WHERE o.event_id = $1 AND p.state IN ('pending', 'processing'))"
            " + (SELECT count(*) FROM outbox WHERE handle_after IS NOT NULL"
            "  AND handled_at IS NULL)",
            event_id,
        )
        if not busy:
            return
        await asyncio.sleep(0.25)


async def verify(
    fs: FaultStack, sale: Sale, record: FaultRecord | None, spec: SaleSpec
) -> dict[str, Any]:
    """Every invariant of the finished sale, from PostgreSQL, Redis, the provider and fans."""
    conn = await asyncpg.connect(fs.settings.database_url, timeout=10)
    redis = Redis.from_url(fs.redis_server.url, socket_timeout=10, socket_connect_timeout=5)
    try:
        await _settle(conn, sale.event_id, 30)
        pool: Any = conn  # check() needs fetchrow/fetchval only, which a connection has
        checks = await check(pool, redis, Keys(PREFIX), sale.event_id)
        holds = {
            str(r["id"])
            for r in await conn.fetch(
                "SELECT id FROM holds WHERE id = ANY($1::uuid[])", list(sale.acked_holds)
            )
        }
        paying = {
            str(r["hold_id"])
            for r in await conn.fetch(
                "SELECT DISTINCT o.hold_id FROM orders o JOIN payments p ON p.order_id = o.id"
                " WHERE o.hold_id = ANY($1::uuid[])",
                list(sale.acked_payments),
            )
        }
        double_paid = await conn.fetchval(
            "SELECT (SELECT count(*) FROM (SELECT hold_id FROM orders WHERE status = 'paid'"
            "  GROUP BY hold_id HAVING count(*) > 1) h)"
            " + (SELECT count(*) FROM (SELECT order_id FROM payments WHERE state = 'succeeded'"
            "  GROUP BY order_id HAVING count(*) > 1) p)"
        )
        paid_orders = {
            str(r["id"]) for r in await conn.fetch("SELECT id FROM orders WHERE status = 'paid'")
        }
        span_rows = await conn.fetch(_PASS_SPANS, sale.event_id)
        spans = [(r["start"], r["stop"]) for r in span_rows]
        excess, peak = excess_admissions(spans, spec.max_active)
        # When admission went over max_active, every pass with its span and its holds (a
        # failure's message is all CI keeps of the run).
        detail = (
            [
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                for r in await conn.fetch(_PASS_DETAIL, sale.event_id)
            ]
            if excess
            else []
        )
        twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT fan_id FROM queue_passes WHERE event_id = $1"
            " GROUP BY fan_id HAVING count(*) > 1) f",
            sale.event_id,
        )
        resumed = None
        if record is not None:
            first_paid = await conn.fetchval(
                "SELECT extract(epoch FROM min(paid_at))::float8 FROM orders"
                " WHERE event_id = $1 AND paid_at > to_timestamp($2)",
                sale.event_id,
                record.ended_wall,
            )
            if first_paid is not None:
                resumed = round(first_paid - record.ended_wall, 2)
    finally:
        await redis.aclose()
        await conn.close()
    async with httpx.AsyncClient(timeout=10) as http:
        stats = (await http.get(f"{fs.stack.provider_url}/v1/stats")).json()
    captured: dict[str, int] = stats["captured_by_reference"]
    return {
        "checks": checks,
        "oversold": checks["oversold"],
        "acked_lost": len(sale.acked_holds - holds) + len(sale.acked_payments - paying),
        "double_charged": sum(1 for n in captured.values() if n > 1) + int(double_paid),
        "charged_unpaid": sum(1 for ref in captured if ref not in paid_orders),
        "excess_admissions_db": excess,
        "excess_detail": detail,
        "active_peak_db": peak,
        "fans_admitted_twice": int(twice),
        "paid_resumed_s": resumed,
    }


class ActiveSampler:
    """Samples ``ZCARD active`` of the event every 100 ms (errors while Redis is down skip)."""

    def __init__(self, url: str, event_id: str, max_active: int) -> None:
        self.redis = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.key = Keys(PREFIX).event(event_id).active
        self.max_active = max_active
        self.samples = self.over = self.peak = 0
        #: Set to end run() between samples: cancelling it mid-command could leave redis-py a
        #: connection that its aclose() no longer closes (a ResourceWarning at exit).
        self.stopped = False

    async def run(self) -> None:
        while not self.stopped:
            with contextlib.suppress(Exception):
                count = int(await self.redis.zcard(self.key))
                self.samples += 1
                self.over += count > self.max_active
                self.peak = max(self.peak, count)
            await asyncio.sleep(0.1)


def _hung_by_route(calls: Sequence[tuple[str, int, float, float]], hung_s: float) -> dict[str, int]:
    """The slow requests by "route status" (which route hung, and how it ended)."""
    found: dict[str, int] = {}
    for route, status, _, took in calls:
        if took > hung_s:
            name = f"{route} {status}"
            found[name] = found.get(name, 0) + 1
    return found


def _recovery(calls: Sequence[tuple[str, int, float, float]], since: float) -> dict[str, Any]:
    firsts: dict[str, float | None] = {}
    for route in ROUTES:
        done = [
            started + took - since
            for name, status, started, took in calls
            if name == route and status in _SUCCESS[route] and started + took >= since
        ]
        firsts[route] = round(max(0.0, min(done)), 3) if done else None
    known = [v for v in firsts.values() if v is not None]
    return {"recovery_s": max(known) if known else None, "recovery_s_by_route": firsts}


async def run_fault_sale(
    kind: str | None,
    spec: SaleSpec,
    *,
    on_tick: Callable[[str], None] | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """One sale on its own private stack, with fault ``kind`` (None: none); its report.

    The processes' logs go to ``run_dir``; by default a temporary directory, deleted when
    the sale kept every invariant and kept (named in the report) when it did not.
    """
    if kind is not None and kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
    temporary = run_dir is None
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix=f"waitroom-chaos-{kind or 'none'}-"))
    servers = 2 if kind == "server_kill" else 1
    aof = kind == "redis_restart_aof"
    async with fault_stack(run_dir, aof=aof, servers=servers) as fs:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            fs.settings.database_url, min_size=1, max_size=2
        )
        try:
            event_id = await create_sale(pool, spec.tickets, spec.rate, spec.max_active)
        finally:
            await pool.close()
        hung_s = fs.settings.dependency_timeout_s + 1.0
        sale = Sale(fs.urls, event_id, spec, hung_s)
        sampler = ActiveSampler(fs.redis_server.url, event_id, spec.max_active)
        sampling = asyncio.create_task(sampler.run())
        record = FaultRecord(kind) if kind is not None else None
        ticker = asyncio.create_task(_tick(sale, on_tick)) if on_tick is not None else None
        try:
            fans = asyncio.create_task(sale.run())
            if record is not None and kind is not None:
                bound = spec.fault_by_s + spec.outage_s + spec.settle_s + 240
                await sale.stalls.bounded("fault", inject(kind, fs, sale, record), bound, None)
            # The fans keep their own deadline; this bound only guards against a hang.
            await asyncio.wait({fans}, timeout=spec.deadline_s + 30)
            if not fans.done():
                fans.cancel()
                await asyncio.wait({fans}, timeout=5)
            elif (failed := fans.exception()) is not None:
                raise failed
            duration = time.monotonic() - sale.started
            spent_sample = record.spent_sample if record is not None else []
            if len(spent_sample) < spec.spent_checks:
                more = [f for f in sale.fans if f.state == "paid" and f not in spent_sample]
                spent_sample = spent_sample + more[: spec.spent_checks - len(spent_sample)]
            checks = asyncio.gather(
                # The gate refuses a spent pass; should its marker be missing from Redis,
                # the inventory ledger still refuses it (the pass's hold cycle is over).
                *(
                    sale.refused(f, f.queue_pass or "", "pass_spent", also=("pass_used",))
                    for f in spent_sample
                )
            )
            refused = await sale.stalls.bounded("spent checks", checks, 30, [])
            verified = await sale.stalls.bounded(
                "verify", verify(fs, sale, record, spec), 120, None
            )
            if verified is None:
                raise RuntimeError(f"checking the sale stalled (logs in {run_dir})")
            found = verified
        finally:
            sampler.stopped = True
            await asyncio.wait({sampling}, timeout=2)
            for task in (sampling, ticker):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait({task}, timeout=2)
            await sale.stalls.bounded("close", sampler.redis.aclose(), 5, None)
            await sale.http.close()
    report = _report(kind, spec, sale, record, found, sampler, refused, duration, servers, run_dir)
    if temporary and not broken(report):
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


async def _tick(sale: Sale, show: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(1.0)
        states: dict[str, int] = {}
        for fan in sale.fans:
            states[fan.state] = states.get(fan.state, 0) + 1
        show(
            f"{time.monotonic() - sale.started:6.1f}s tickets paid {sale.progress.tickets_paid}"
            f" fans {states} requests {len(sale.http.calls)}"
        )


def _report(
    kind: str | None,
    spec: SaleSpec,
    sale: Sale,
    record: FaultRecord | None,
    found: dict[str, Any],
    sampler: ActiveSampler,
    refused: Sequence[bool],
    duration: float,
    servers: int,
    run_dir: Path,
) -> dict[str, Any]:
    calls = sale.http.calls
    states: dict[str, int] = {}
    for fan in sale.fans:
        states[fan.state] = states.get(fan.state, 0) + 1
    checks = found["checks"]
    unfinished = sum(1 for f in sale.fans if f.state in ("new", "waiting", "admitted"))
    report: dict[str, Any] = {
        "fault": kind or "none",
        "oversold": found["oversold"],
        "acked_lost": found["acked_lost"],
        "double_charged": found["double_charged"],
        "places_lost": 0,
        "order_inversions_after": 0,
        "max_active_exceeded": sampler.over + found["excess_admissions_db"],
        "http_500": sum(1 for c in calls if c[1] >= 500 and c[1] != 503),
        "hung_requests": sum(1 for c in calls if c[3] > sale.http.hung_s),
        "hung_by_route": _hung_by_route(calls, sale.http.hung_s),
        "http_503": sum(1 for c in calls if c[1] == 503),
        "transport_errors": sum(1 for c in calls if c[1] == 0),
        "revoked_accepted": 0,
        "spent_accepted": sum(1 for ok in refused if not ok),
        "completed": unfinished == 0 and checks["sold"] == checks["quantity"],
        "duration_s": round(duration, 1),
        "sold": checks["sold"],
        "tickets": spec.tickets,
        "fans": spec.fans,
        "fan_states": states,
        "fans_unfinished": unfinished,
        "fan_errors": sorted({f.error for f in sale.fans if f.state == "failed" and f.error})[:5],
        "rejoins": sum(f.rejoins for f in sale.fans),
        "receipts_refused": sum(f.receipts_refused for f in sale.fans),
        "charged_unpaid": found["charged_unpaid"],
        "fans_admitted_twice": found["fans_admitted_twice"],
        "active_peak_redis": sampler.peak,
        "active_samples_over": sampler.over,
        "active_peak_db": found["active_peak_db"],
        "excess_admissions_db": found["excess_admissions_db"],
        **({"excess_detail": found["excess_detail"]} if found["excess_detail"] else {}),
        **({"fault_ended_wall": round(record.ended_wall, 3)} if record is not None else {}),
        "spent_checked": len(refused),
        # What the revoked and spent checks got instead of their refusal (none expected).
        "not_refused": sale.not_refused[:10],
        # Spent passes the gate let through (their marker missing) and the ledger refused.
        "refused_otherwise": sale.refused_otherwise[:10],
        "requests": len(calls),
        "status_counts": _status_counts(calls),
        "latency_p99_ms": {
            route: round(percentile([c[3] for c in calls if c[0] == route], 99) * 1000, 1)
            for route in (*ROUTES, "reservation")
        },
        "servers": servers,
        "run_dir": str(run_dir),
        "harness_stalls": sale.stalls.names,
    }
    if record is not None:
        report.update(places(sale, record))
        report.update(_recovery(calls, record.ended))
        report["revoked_accepted"] = int(record.revoked_after is False) + int(
            record.revoked_before is False
        )
        report.update(
            {
                "revoked_checked": record.revoked_after is not None,
                "victim": record.victim,
                "fault_at_s": round(record.started - sale.started, 2),
                "outage_s": round(record.outage_s, 2),
                "paid_resumed_s": found["paid_resumed_s"],
            }
        )
    return report


def _status_counts(calls: Sequence[tuple[str, int, float, float]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for route, status, _, _ in calls:
        key = f"{route}:{status}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


#: The invariants a run must keep at 0 (``completed`` must be true as well).
INVARIANTS = (
    "oversold",
    "acked_lost",
    "double_charged",
    "places_lost",
    "order_inversions_after",
    "max_active_exceeded",
    "http_500",
    "hung_requests",
    "revoked_accepted",
    "spent_accepted",
)


def broken(report: dict[str, Any]) -> dict[str, Any]:
    """The invariants ``report`` breaks (empty when it keeps them all)."""
    bad = {name: report[name] for name in INVARIANTS if report.get(name)}
    if not report["completed"]:
        bad["completed"] = False
    if report.get("harness_stalls"):
        bad["harness_stalls"] = report["harness_stalls"]
    return bad
