"""Rooms: each event's waiting line as it lives in Redis, loaded from PostgreSQL on first use.

The line itself is the Redis data model documented in :class:`waitroom.core.keys.EventKeys` and
changed only by the Lua scripts (:mod:`waitroom.line.scripts`). This module is the per-process
front of it: it answers the HTTP routes and the broadcasters with one script call each,
loads a room that is not in Redis yet (404 for an event PostgreSQL does not know either),
applies the lottery draw when a lottery room opens, sweeps abandoned fans, and keeps the
admission-rate estimate behind the waits it shows.

For the admission loop (one leader per event):

- call :func:`open_room` at the room's ``opens_at`` (it is also called lazily here by the
  first join, poll or tick after that time); it is idempotent and safe from many processes.
  In a lottery room, admit nobody until meta ``drawn`` is ``"1"``: until then the pre-queue
  fans are not placed yet and the head of ``queue`` is not the head of the line;
- admit from the head of ``queue`` (lowest score first) in ONE script per batch that, for
  each fan still in ``queue``: ``ZREM queue``, ``ZREM seen``, ``HSET admitted fan <pass>``,
  ``RPUSH order fan``, ``ZADD active <exp> <jti>``, ``HINCRBY meta admitted_total 1``, and
  keeps the fan in ``fans`` (so joining again answers "admitted" with the same pass). A fan
  briefly in ``fans`` but neither waiting nor admitted is shown as next in line;
- skip (or :meth:`Rooms.sweep` first) fans whose ``seen`` is older than the grace period;
- write meta ``paused`` / ``sold_out`` as ``"1"``/``"0"``, and ``rate``/``max_active`` when
  operators change them (PostgreSQL ``room_settings`` stays the source they load from).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from prometheus_client import Counter

from waitroom.core import ids
from waitroom.core.errors import NotFound, Unavailable
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.runtime import cancel_and_wait
from waitroom.line import lottery, receipts, scripts
from waitroom.line.eta import RateEstimator
from waitroom.line.ratelimit import ADDRESS_REQUESTS, JOIN_PER_FAN, JOIN_PER_IP, Decision
from waitroom.line.scripts import Client, JoinGate, JoinReply, Positions, PressureReply, RoomView

log = logging.getLogger("waitroom.line.room")

#: The rule of events.id in PostgreSQL; anything else cannot be an event (and must never
#: reach a Redis key, where a '}' would move it out of the event's hash slot).
EVENT_ID = ids.EVENT_ID
#: How long an event PostgreSQL did not know is answered 404 without asking it again.
UNKNOWN_TTL_S = 2.0
_UNKNOWN_MAX = 10_000
#: Lease of the caller applying a lottery draw; only saves duplicate work (see draw.lua).
DRAW_LEASE_MS = 30_000
#: Fans moved per draw.lua call: keeps each script short so Redis keeps serving joins.
DRAW_BATCH = 5_000
#: Pre-queues larger than this are hashed off the event loop.
_HASH_IN_THREAD = 20_000
#: Least time between two lazy attempts to draw the same room from this process.
DRAW_RETRY_S = 1.0
#: Fans sent away per close_line.lua call (one call per admission tick while more remain).
CLOSE_BATCH = 2_000
#: Fans looked at per sweep.lua call, and calls per sweep at most.
SWEEP_BATCH = 1_000
_SWEEP_ROUNDS = 10
#: Least time between two sweeps of one room triggered by polling in this process.
SWEEP_EVERY_S = 5.0

ABANDONED = Counter(
    "waitroom_abandoned_fans_total",
    "Fans dropped from the line after the grace period without a connection or poll.",
    ["event"],
)


#: How to recompute a draw, by scheme (see waitroom/line/lottery.py).
LOTTERY_METHODS = {
    1: "sort entries by sha256(seed_bytes || entry_ascii); entry = sha256(fan_id)",
    2: "mixed = sha256(seed_bytes || sha256(concat(sorted(entries)))); sort entries by"
    " sha256(mixed || entry_ascii); entry = HMAC-SHA256(secret salt, fan_id), see my_entry",
}


class LotteryInfo(msgspec.Struct, frozen=True):
    """``GET /v1/events/{event_id}/lottery``: the commitment, then the draw to check."""

    event_id: str
    #: sha256 of the seed, in hex: published before the draw.
    commitment: str
    #: The seed (64 hex digits), revealed once drawn; null before.
    seed: str | None
    drawn: bool
    drawn_at: datetime | None
    opens_at: datetime
    #: Every pre-queue fan's entry in hex, in draw order (empty before the draw). An entry is
    #: HMAC-SHA256 of the fan id under a secret salt: it does not tell who entered.
    entries: list[str]
    #: The asking fan's own entry (null without an identity): find it in ``entries``.
    my_entry: str | None = None
    #: How to recompute the order; see waitroom/line/lottery.py.
    scheme: int = 2
    method: str = LOTTERY_METHODS[2]


def not_found(event_id: str) -> NotFound:
    """The 404 of an unknown event."""
    return NotFound(
        f"no event {event_id!r}", code="event_not_found", details={"event_id": event_id}
    )


async def open_room(
    redis: Client, db: asyncpg.Pool[Any], keys: Keys, event_id: str, now: float
) -> str:
    """Open the sale of ``event_id``; for a lottery room, draw and place the pre-queue.

    Idempotent and safe to call from any number of processes at once. Returns ``"fifo"``
    (nothing to draw), ``"drawn"`` (the draw is applied, by this call or an earlier one),
    ``"busy"`` (another caller is applying it now: call again later) or ``"no_room"`` (the
    room is not loaded in Redis; :meth:`Rooms.ensure` loads it).

    The draw list is written to PostgreSQL before any fan moves, and only by the first
    caller to get there (``drawn_at IS NULL``); every caller then applies that one list, so
    a takeover after a crash, or two callers racing, apply the very same places.
    """
    ek = keys.event(event_id)
    token = secrets.token_hex(8)
    reply = await scripts.open_room(redis, ek, now=now, token=token, lease_ms=DRAW_LEASE_MS)
    if reply.outcome != "draw":
        return reply.outcome
    assert reply.seed is not None, "a lottery room always has a seed"
    salt: str | None = await db.fetchval(
        "SELECT entry_salt FROM room_lottery WHERE event_id = $1", event_id
    )
    if salt is None:
        raise RuntimeError(f"lottery room {event_id!r} has no entry salt in PostgreSQL")
    by_entry = {lottery.entry(salt, fan): fan for fan in reply.prequeue}
    if len(by_entry) > _HASH_IN_THREAD:
        order = await asyncio.to_thread(lottery.draw_order, reply.seed, list(by_entry))
    else:
        order = lottery.draw_order(reply.seed, by_entry)
    stored: list[str] | None = await db.fetchval(
        "UPDATE room_lottery SET drawn_at = $2, entries = $3"
        " WHERE event_id = $1 AND drawn_at IS NULL RETURNING entries",
        event_id,
        datetime.fromtimestamp(now, UTC),
        order,
    )
    if stored is None:
        stored = await db.fetchval("SELECT entries FROM room_lottery WHERE event_id = $1", event_id)
        if stored is None:
            raise RuntimeError(f"lottery room {event_id!r} has no draw row in PostgreSQL")
    placements = [
        (place, by_entry[e])
        for place, e in zip(lottery.places(len(stored)), stored, strict=True)
        if e in by_entry
    ]
    for i in range(0, len(placements), DRAW_BATCH):
        await scripts.draw(
            redis, ek, placements[i : i + DRAW_BATCH], now=now, token=token, final=False
        )
    await scripts.draw(redis, ek, [], now=now, token=token, final=True)
    log.info("lottery drawn", extra={"event_id": event_id, "entries": len(stored)})
    return "drawn"


class Rooms:
    """The rooms as one process sees them; built in the app's lifespan, one per process.

    Nothing here is shared between processes except through Redis and PostgreSQL: the
    caches (unknown events, rate estimates, in-flight loads and draws) only save work.
    """

    def __init__(
        self,
        redis: Client,
        db: asyncpg.Pool[Any],
        keys: Keys,
        *,
        known: Callable[[str], Awaitable[bool]] | None = None,
        on_drawn: Callable[[str], None] | None = None,
        restore: Callable[[str], Awaitable[int]] | None = None,
    ) -> None:
        self.redis = redis
        self.db = db
        self.keys = keys
        #: Whether an event id exists, without a query for most unknown ids (the app passes
        #: inventory.catalogue.EventDirectory.exists); None: ask room_settings every time.
        self._known = known
        #: Told when this process applied a lottery draw (the app drops its cached view).
        self._on_drawn = on_drawn
        #: Rebuilds the event's admission state from PostgreSQL when Redis has none (never
        #: loaded, or lost) and answers the last pass number (the app passes
        #: admission.recovery.restore); None: a room starts from nothing.
        self._restore = restore
        self._unknown: dict[str, float] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._estimators: dict[str, RateEstimator] = {}
        self._draw_tried: dict[str, float] = {}
        self._swept: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    # --- loading ---------------------------------------------------------------------------

    def check(self, event_id: str) -> EventKeys:
        """The keys of ``event_id``, or 404 at once for an id that cannot be or was not found."""
        if not EVENT_ID.matches(event_id):
            raise EVENT_ID.not_found()
        until = self._unknown.get(event_id)
        if until is not None:
            if time.monotonic() < until:
                raise not_found(event_id)
            del self._unknown[event_id]
        return self.keys.event(event_id)

    async def ensure(self, event_id: str) -> None:
        """Load the room into Redis unless it is there; 404 ``event_not_found`` if unknown.

        Concurrent callers in this process share one load; a caller that gives up (a client
        gone) does not cancel it for the others.
        """
        self.check(event_id)
        task = self._loading.get(event_id)
        if task is None:
            task = asyncio.create_task(self._load(event_id), name=f"load-room:{event_id}")
            self._loading[event_id] = task
            task.add_done_callback(lambda t: self._settled(self._loading, event_id, t))
        await asyncio.shield(task)

    @staticmethod
    def _settled(table: dict[str, Any], key: str, task: asyncio.Task[Any]) -> None:
        if table.get(key) is task:
            del table[key]
        # Retrieve the outcome so an error nobody awaited is not reported as lost.
        if not task.cancelled():
            task.exception()

    async def _load(self, event_id: str) -> None:
        if self._known is not None and not await self._known(event_id):
            # Not remembered as unknown here: the directory already limits its own lookups,
            # and an event just created elsewhere (the CLI, another node) must be served as
            # soon as the directory knows it, not UNKNOWN_TTL_S later (a first join or an
            # admission tick racing the creation would otherwise shut the line for that long).
            raise not_found(event_id)
        async with self.db.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT queue_mode, extract(epoch FROM opens_at)::float8 AS opens_at,"
                " rate_per_second, max_active, paused, pass_ttl_s, abandon_grace_s,"
                " per_fan_limit,"
                # The waitlist as in force now: past its deadline it is over (the admission
                # poll mirrors the same expression when the deadline passes).
                " waitlist AND (waitlist_until IS NULL OR waitlist_until > now()) AS waitlist"
                " FROM room_settings WHERE event_id = $1",
                event_id,
            )
            if row is None:
                self._forget(event_id)
                raise not_found(event_id)
            seed: str | None = None
            commitment = ""
            drawn = False
            if row["queue_mode"] == "lottery":
                # The first process to load the room creates the seed; the others, racing,
                # read that one back, so every process (and Redis) agrees on it.
                candidate = lottery.new_seed()
                await conn.execute(
                    "INSERT INTO room_lottery (event_id, seed, commitment, entry_salt)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
                    event_id,
                    candidate,
                    lottery.commitment(candidate),
                    lottery.new_salt(),
                )
                lot = await conn.fetchrow(
                    "SELECT seed, commitment, drawn_at FROM room_lottery WHERE event_id = $1",
                    event_id,
                )
                assert lot is not None
                seed, commitment, drawn = (
                    lot["seed"],
                    lot["commitment"],
                    lot["drawn_at"] is not None,
                )
        # A meta without its mode was never loaded, or Redis lost it (a leader's lease renewal
        # or the actor's sold-out flag may have written a field or two since): rebuild the
        # passes first, so the room is never served half-rebuilt, and go on numbering passes
        # after the last one PostgreSQL has.
        ek = self.keys.event(event_id)
        admitted_total = 0
        seq_base = 0
        if not await scripts.room_loaded(self.redis, ek):
            if self._restore is not None:
                admitted_total = await self._restore(event_id)
            # A new generation of the line: its join numbers start above every earlier one,
            # so fans put back by their place receipts stay ahead of newcomers.
            generation = await self.db.fetchval(
                "UPDATE room_settings SET line_generation = line_generation + 1"
                " WHERE event_id = $1 RETURNING line_generation",
                event_id,
            )
            seq_base = receipts.generation_base(int(generation or 0))
        fields = {
            "mode": row["queue_mode"],
            "opens_at": repr(row["opens_at"]),
            "grace_s": str(row["abandon_grace_s"]),
            "rate": repr(row["rate_per_second"]),
            "max_active": str(row["max_active"]),
            "pass_ttl_s": str(row["pass_ttl_s"]),
            "paused": "1" if row["paused"] else "0",
            "sold_out": "0",
            "admitted_total": str(admitted_total),
            "abandoned_total": "0",
            # A room whose draw PostgreSQL already recorded must never be drawn again.
            "opened": "1" if drawn else "0",
            "drawn": "1" if drawn else "0",
            "commitment": commitment,
            "seq_base": str(seq_base),
            # The waitlist (admission/waitlist.py): the setting, and what an offer may claim.
            "waitlist": "1" if row["waitlist"] else "0",
            "per_fan_limit": str(row["per_fan_limit"]),
        }
        await scripts.init_room(self.redis, ek, fields, seed)

    def _forget(self, event_id: str) -> None:
        """Answer ``event_id`` 404 without asking anyone for the next UNKNOWN_TTL_S."""
        if len(self._unknown) >= _UNKNOWN_MAX:
            self._unknown.clear()
        self._unknown[event_id] = time.monotonic() + UNKNOWN_TTL_S

    # --- the line --------------------------------------------------------------------------

    async def join(
        self,
        event_id: str,
        fan_id: str,
        *,
        now: float,
        ip: str,
        known_fan: bool,
        gate: JoinGate | None = None,
    ) -> JoinReply:
        """Join ``fan_id`` to the line, charging the IP's and (``known_fan``) the fan's limits.

        ``gate`` is what a new place costs: a challenge (spent by the place it buys) and
        room under the caps per address and subnet (see :mod:`waitroom.line.challenge`).
        """
        ek = self.check(event_id)
        fan_limit = JOIN_PER_FAN if known_fan else None
        for _ in range(2):
            reply = await scripts.join(
                self.redis,
                ek,
                fan_id,
                now=now,
                ip=ip,
                ip_limit=JOIN_PER_IP,
                fan_limit=fan_limit,
                gate=gate,
            )
            if reply is not None:
                break
            await self.ensure(event_id)
        else:
            raise Unavailable("the room could not be loaded; try again", retry_after=1)
        if reply.outcome == "joined":
            self.estimator(event_id).observe(reply.admitted_total, now)
            if reply.draw_due:
                self.draw_soon(event_id)
        return reply

    async def pressure(
        self, event_id: str, *, now: float, ip: str, address: str, subnet: str, half_life_s: float
    ) -> PressureReply:
        """Count a challenge asked for by ``ip`` (charged to its address bucket); the counts."""
        ek = self.check(event_id)
        for _ in range(2):
            reply = await scripts.pressure(
                self.redis,
                ek,
                now=now,
                ip=ip,
                address=address,
                subnet=subnet,
                limit=ADDRESS_REQUESTS,
                half_life_s=half_life_s,
            )
            if reply.outcome != "no_room":
                return reply
            await self.ensure(event_id)
        raise Unavailable("the room could not be loaded; try again", retry_after=1)

    async def charge_address(self, event_id: str, subject: str, *, now: float) -> Decision:
        """Charge one request of client address ``subject`` to its bucket in ``event_id``.

        Polls and WebSocket handshakes call this with ``client_subject(conn)``; the caller
        refuses the request when the decision is not ``allowed`` (429 / close 1013).
        """
        ek = self.check(event_id)
        return await scripts.charge(self.redis, ek, subject, now=now, limit=ADDRESS_REQUESTS)

    async def positions(self, event_id: str, fan_ids: Sequence[str], *, now: float) -> Positions:
        """Codes of ``fan_ids`` and the room's state, refreshing the fans' ``seen``."""
        ek = self.check(event_id)
        for _ in range(2):
            result = await scripts.positions(self.redis, ek, fan_ids, now=now)
            if result is not None:
                break
            await self.ensure(event_id)
        else:
            raise Unavailable("the room could not be loaded; try again", retry_after=1)
        self.estimator(event_id).observe(result.room.admitted_total, now)
        if result.room.draw_due(now):
            self.draw_soon(event_id)
        return result

    async def status(
        self, event_id: str, fan_id: str, *, now: float
    ) -> tuple[RoomView, int, str | None]:
        """One fan's code (see :mod:`waitroom.line.scripts`), its pass if admitted, and the room."""
        result = await self.positions(event_id, [fan_id], now=now)
        return result.room, result.codes[0], (result.passes[0] if result.passes else None)

    async def leave(self, event_id: str, fan_id: str) -> str:
        """Take the fan out of line: "left", "not_in_line" or "admitted" (see leave.lua)."""
        ek = self.check(event_id)
        outcome = await scripts.leave(self.redis, ek, fan_id)
        if outcome == "no_room":
            await self.ensure(event_id)
            outcome = await scripts.leave(self.redis, ek, fan_id)
        return "not_in_line" if outcome == "no_room" else outcome

    def estimator(self, event_id: str) -> RateEstimator:
        """This process's estimate of the room's admission rate."""
        estimator = self._estimators.get(event_id)
        if estimator is None:
            estimator = self._estimators[event_id] = RateEstimator()
        return estimator

    # --- abandonment -----------------------------------------------------------------------

    async def sweep(self, event_id: str, *, now: float) -> int:
        """Drop the room's abandoned fans (bounded work); how many were dropped."""
        ek = self.check(event_id)
        total = 0
        for _ in range(_SWEEP_ROUNDS):
            dropped, more = await scripts.sweep(self.redis, ek, now=now, limit=SWEEP_BATCH)
            total += dropped
            if not more:
                break
        if total:
            ABANDONED.labels(event_id).inc(total)
        return total

    async def close_line(self, event_id: str) -> bool:
        """In a sold-out room, send the waiting fans away (bounded work: a few thousand per
        call) and stop counting passes against ``max_active``; whether more remain."""
        ek = self.check(event_id)
        removed, more = await scripts.close_line(self.redis, ek, limit=CLOSE_BATCH)
        if removed:
            log.info(
                "closed the line of a sold-out room", extra={"event": event_id, "fans": removed}
            )
        return more

    def sweep_soon(self, event_id: str, now: float) -> None:
        """Sweep the room in the background unless this process did so recently.

        Broadcasters sweep their rooms every few ticks; this covers rooms whose fans only
        poll, so that positions shown to them never count the abandoned for long.
        """
        if now - self._swept.get(event_id, 0.0) < SWEEP_EVERY_S:
            return
        self._swept[event_id] = now
        self._spawn(f"sweep:{event_id}", self.sweep(event_id, now=now))

    # --- opening and the lottery -----------------------------------------------------------

    async def open_room(self, event_id: str, now: float) -> str:
        """:func:`open_room` for this process's clients, loading the room if needed."""
        self.check(event_id)
        outcome = await open_room(self.redis, self.db, self.keys, event_id, now)
        if outcome == "no_room":
            await self.ensure(event_id)
            outcome = await open_room(self.redis, self.db, self.keys, event_id, now)
        if outcome == "drawn" and self._on_drawn is not None:
            self._on_drawn(event_id)
        return outcome

    def draw_soon(self, event_id: str) -> None:
        """Apply a due lottery draw in the background (at most one attempt per second here)."""
        at = time.monotonic()
        if at - self._draw_tried.get(event_id, -DRAW_RETRY_S) < DRAW_RETRY_S:
            return
        self._draw_tried[event_id] = at
        self._spawn(f"draw:{event_id}", self.open_room(event_id, time.time()))

    async def lottery(self, event_id: str, fan_id: str | None = None) -> LotteryInfo:
        """The room's commitment, and once drawn its seed and entries in draw order; with
        ``fan_id``, that fan's own entry too."""
        self.check(event_id)
        for _ in range(2):
            row = await self.db.fetchrow(
                "SELECT r.queue_mode, r.opens_at, l.commitment, l.seed, l.drawn_at, l.entries,"
                " l.entry_salt, l.scheme"
                " FROM room_settings r LEFT JOIN room_lottery l ON l.event_id = r.event_id"
                " WHERE r.event_id = $1",
                event_id,
            )
            if row is None:
                raise not_found(event_id)
            if row["queue_mode"] != "lottery":
                raise NotFound(
                    f"event {event_id!r} lines fans up first come, first served: no lottery",
                    code="no_lottery",
                    details={"event_id": event_id},
                )
            if row["commitment"] is not None:
                break
            await self.ensure(event_id)  # creates the seed and its commitment
        else:
            raise Unavailable("the lottery could not be set up; try again", retry_after=1)
        drawn = row["drawn_at"] is not None
        if not drawn and time.time() >= row["opens_at"].timestamp():
            self.draw_soon(event_id)
        scheme = row["scheme"]
        mine = None
        if fan_id is not None:
            salt = row["entry_salt"]
            mine = lottery.entry(salt, fan_id) if scheme == 2 else lottery.legacy_entry(fan_id)
        return LotteryInfo(
            event_id=event_id,
            commitment=row["commitment"],
            seed=row["seed"] if drawn else None,
            drawn=drawn,
            drawn_at=row["drawn_at"],
            opens_at=row["opens_at"],
            entries=list(row["entries"] or []),
            my_entry=mine,
            scheme=scheme,
            method=LOTTERY_METHODS[scheme],
        )

    # --- lifecycle -------------------------------------------------------------------------

    def _spawn(self, name: str, work: Coroutine[Any, Any, Any]) -> None:
        if name in self._tasks:
            work.close()  # the same work is under way
            return

        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:  # background work: log it, the next trigger retries
                log.warning("background room work failed", extra={"task": name}, exc_info=True)

        task = asyncio.create_task(guarded(), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._settled(self._tasks, name, t))

    async def close(self) -> None:
        """Cancel this process's background loads, draws and sweeps, and wait for them."""
        pending = [*self._tasks.values(), *self._loading.values()]
        await asyncio.gather(*(cancel_and_wait(task) for task in pending))
