"""The admission loop of an event, and the per-process service that runs the loops it leads.

Every server process runs one :class:`AdmissionService`. Every :data:`POLL_S` it asks
PostgreSQL for the events whose sale is open or opens within :data:`OPEN_SOON_S` (status not
closed) and keeps one :class:`EventAdmission` per such event. Each of those tries to take the
event's lease (:mod:`admission.leader`); the one process that holds it runs the loop:

1. at the sale's opening time, open the room (``waitroom.line.room.Rooms.open_room``); a lottery
   room is drawn first, and nobody is admitted until the draw is applied;
2. every tick (:data:`TICK_S`): read the room's live state (rate, ``max_active``, paused,
   sold out, active passes) from Redis in one pipeline, so an operator's change shows within
   one tick; ask the token bucket (:mod:`admission.bucket`) how many to admit; read that many
   fans from the head of the line, sign their passes, and admit them with ONE fenced script
   (``admit.lua``); then take from the bucket exactly as many as were admitted.

The passes are recorded in PostgreSQL (``queue_passes``) BEFORE the script issues them, and
the ones it did not issue are deleted after: PostgreSQL is the truth and Redis a cache of it
(:mod:`admission.recovery` rebuilds a lost room from it), so no pass can exist that a rebuild
would not know. The price: while PostgreSQL is down nobody is admitted (nobody could check
out either). The loop also publishes the observed admission rate in the room's meta with each
lease renewal, for the operators' status view.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis

from admission import bucket as buckets
from admission import leader, recovery
from admission import waitlist as waitlist_core
from admission.passes import PassClaims, PassKeys, new_jti
from waitroom.core import runtime, tracing
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.metrics import forget
from waitroom.line.broadcast import FANS_WAITING
from waitroom.line.room import Rooms

log = logging.getLogger("waitroom.admission")

#: Seconds between two ticks of a leader's loop.
TICK_S = 0.05
#: Seconds between two looks at PostgreSQL for events to run.
POLL_S = 2.0
#: Events whose sale opens within this many seconds get their loop (and leader) early.
OPEN_SOON_S = 60
#: The observed rate is the admissions of the last this many seconds.
OBSERVE_WINDOW_S = 5.0
#: Extra fans read beyond the number to admit, to step over abandoned ones in one tick.
CANDIDATE_SLACK = 8
#: Deletes the records of passes (by id) that were never issued.
#: Passes signed in one turn of the event loop. A tick catching up at a high rate signs
#: thousands (tens of microseconds each), and in one go that held the process's event loop,
#: the inventory actor's and the lease renewals' with it, for 100-270 ms at 20,000
#: admissions/s (the stall watch's "running" stalls, in the checkout benchmark's setup).
SIGN_CHUNK = 256

_DELETE_PASSES = "DELETE FROM queue_passes WHERE event_id = $1 AND jti = ANY($2::text[])"
#: Seconds after a failed ``admit.lua`` before its passes are settled (issued or not).
SETTLE_UNCERTAIN_S = 1.0
_ERROR_LOG_EVERY_S = 10.0

ADMITTED = Counter("waitroom_admitted_total", "Fans admitted (passes issued).", ["event"])
RECONCILED = Counter(
    "waitroom_admission_rooms_rebuilt_total",
    "Rooms whose pass state the admission leader wrote again from PostgreSQL because Redis"
    " restarted under them (from its append-only file, or a promoted replica).",
    ["event"],
)
ABANDONED_SKIPPED = Counter(
    "waitroom_admission_abandoned_total",
    "Abandoned fans the admission loop found at the head of the line and dropped.",
    ["event"],
)
# The leader's view of its event: reported by the leading process only, and forgotten when
# it stops leading (waitroom.core.metrics.forget), so a former leader never shows stale figures.
ACTIVE_PASSES = Gauge(
    "waitroom_active_passes",
    "Passes counting against max_active: fans shopping now (leader's view).",
    ["event"],
    multiprocess_mode="livemax",
)
RATE_CONFIGURED = Gauge(
    "waitroom_admission_rate_configured",
    "Configured admissions per second.",
    ["event"],
    multiprocess_mode="livemax",
)
RATE_OBSERVED = Gauge(
    "waitroom_admission_rate_observed",
    f"Admissions per second over the last {OBSERVE_WINDOW_S:g} s (leader's view).",
    ["event"],
    multiprocess_mode="livemax",
)
MAX_ACTIVE = Gauge(
    "waitroom_admission_max_active",
    "Configured max_active.",
    ["event"],
    multiprocess_mode="livemax",
)
PAUSED = Gauge(
    "waitroom_admission_paused",
    "1 while an operator has paused the event's admissions (leader's view).",
    ["event"],
    multiprocess_mode="livemax",
)
LAST_FAN_ETA = Gauge(
    "waitroom_line_last_fan_eta_seconds",
    "Wait of the last fan in line at the observed admission rate (leader's view; absent while"
    " that rate is unknown or nobody waits).",
    ["event"],
    multiprocess_mode="livemax",
)
_LEADER_VIEW = (
    ACTIVE_PASSES,
    RATE_CONFIGURED,
    RATE_OBSERVED,
    MAX_ACTIVE,
    PAUSED,
    LAST_FAN_ETA,
    FANS_WAITING,
)
LEADER_CHANGES = Counter(
    "waitroom_admission_leader_changes_total",
    "Times a process of this deployment took the lead of an event's admission loop.",
    ["event"],
)
LEADING = Gauge(
    "waitroom_admission_leading",
    "1 while a process of this server leads the event's admission.",
    ["event"],
    multiprocess_mode="livesum",
)
TICK_SECONDS = Histogram(
    "waitroom_admission_tick_seconds",
    "Time of one admission tick.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

_META_FIELDS = (
    "rate",
    "max_active",
    "paused",
    "sold_out",
    "pass_ttl_s",
    "grace_s",
    "admitted_total",
    "mode",
    "opens_at",
    "opened",
    "drawn",
    # The waitlist (admission/waitlist.py).
    "waitlist",
    "waitlisting",
    "wl_seen",
    "returned",
    "per_fan_limit",
)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class RoomState:
    """What a tick needs from the room's meta, and the active passes right now."""

    rate: float
    max_active: int
    paused: bool
    sold_out: bool
    pass_ttl_s: int
    grace_s: float
    admitted_total: int
    mode: str
    opens_at: float
    opened: bool
    drawn: bool
    active: int
    #: Fans placed in the line (the queue's size).
    waiting: int = 0
    #: The waitlist setting, and where the room stands with it (admission/waitlist.py).
    waitlist: bool = False
    phase: waitlist_core.Phase = field(default_factory=waitlist_core.Phase)
    per_fan_limit: int = 1
    #: Tickets available in all, as the inventory actor last published; None before it did.
    available: int | None = None

    @classmethod
    def parse(
        cls, meta: list[Any], active: int, waiting: int = 0, available: int | None = None
    ) -> RoomState | None:
        """From ``HMGET meta`` of :data:`_META_FIELDS`; None without a room."""
        values = dict(zip(_META_FIELDS, (_text(v) for v in meta), strict=True))
        if values["mode"] is None:
            return None
        return cls(
            waitlist=values["waitlist"] == "1",
            phase=waitlist_core.Phase(
                waitlisting=values["waitlisting"] == "1",
                seen=int(values["wl_seen"] or 0),
                returned=int(values["returned"] or 0),
            ),
            per_fan_limit=max(1, int(values["per_fan_limit"] or 1)),
            available=available,
            rate=float(values["rate"] or 1.0),
            max_active=int(values["max_active"] or 1),
            paused=values["paused"] == "1",
            sold_out=values["sold_out"] == "1",
            pass_ttl_s=int(values["pass_ttl_s"] or 900),
            grace_s=float(values["grace_s"] or 60),
            admitted_total=int(values["admitted_total"] or 0),
            mode=values["mode"] or "fifo",
            opens_at=float(values["opens_at"] or 0),
            opened=values["opened"] == "1",
            drawn=values["drawn"] == "1",
            active=active,
            waiting=waiting,
        )

    def ready(self) -> bool:
        """The line may be admitted from: open, and drawn if it is a lottery."""
        return self.opened and (self.mode != "lottery" or self.drawn)


async def read_state(redis: Redis, ek: EventKeys, now: float) -> RoomState | None:
    """The room's state in one round trip, dropping expired passes from ``active`` first."""
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(ek.meta, list(_META_FIELDS))
    pipe.zremrangebyscore(ek.active, "-inf", now)
    pipe.zcard(ek.active)
    pipe.zcard(ek.queue)
    pipe.hvals(ek.availability)
    meta, _, active, waiting, available = await pipe.execute()
    return RoomState.parse(
        meta, int(active), int(waiting), waitlist_core.parse_available(available)
    )


class RateObserver:
    """Admissions per second over a sliding window of ``(clock, admitted_total)`` samples."""

    def __init__(self, window_s: float = OBSERVE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def observe(self, at: float, total: int) -> None:
        """Record the counter as seen at ``at`` (monotonic seconds)."""
        self._samples.append((at, total))
        while len(self._samples) > 2 and at - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        """The rate over the window; None until a second of samples exists."""
        if len(self._samples) < 2:
            return None
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        return max(0.0, (c1 - c0) / (t1 - t0))


@dataclass(frozen=True, slots=True)
class PassRow:
    """A pass to record in ``queue_passes``."""

    jti: str
    fan_id: str
    seq: int
    issued_at: float
    expires_at: float
    #: The signed pass: a room rebuilt after Redis lost it gives the fan this same pass back.
    token: str


class EventAdmission:
    """One event in one process: follows, or leads and runs the loop."""

    def __init__(self, service: AdmissionService, event_id: str) -> None:
        self.service = service
        self.event_id = event_id
        self.ek = service.keys.event(event_id)
        self.token: str | None = None
        self.bucket: buckets.TokenBucket | None = None
        self.observer = RateObserver()
        self.task: asyncio.Task[None] | None = None
        #: The last tenure's ending (renewer stopped, lease released), in a task of its own.
        self._letting_go: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        #: Pass rows recorded for a tick that did not issue them, still to delete (a failed
        #: delete is tried again before anyone else is admitted).
        self._unissued: list[str] = []
        #: Pass rows recorded for a tick whose admit.lua failed (a connection lost, a
        #: timeout): it may or may not have run. Settled once Redis answers again and
        #: :data:`SETTLE_UNCERTAIN_S` have passed (see _settle_uncertain).
        self._uncertain: list[tuple[float, list[PassRow]]] = []
        #: Whether this tenure has dropped the rows a previous leader recorded but never
        #: issued (it died between recording and admit.lua).
        self._cleaned = False
        #: Whether the line of this sold-out room has been closed (reset when it is not).
        self._line_closed = False
        #: The events.status this tenure last wrote (written again only when it changes).
        self._status: str | None = None
        self._opened_tried = 0.0
        self._error_logged_at = 0.0

    @property
    def leading(self) -> bool:
        """True while this process holds the event's lease."""
        return self.token is not None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"admission:{self.event_id}")

    async def run(self) -> None:
        """Try to lead; lead until the lease is lost; repeat until cancelled."""
        redis = self.service.redis
        while True:
            try:
                token = leader.new_token()
                if await leader.acquire(redis, self.ek, token):
                    await self._lead(token)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep trying, quietly
                self._log_error("admission lease attempt failed", exc)
            # Jitter keeps the processes from asking in lockstep.
            await asyncio.sleep(self.service.acquire_every_s * random.uniform(0.8, 1.2))

    async def _lead(self, token: str) -> None:
        LEADER_CHANGES.labels(self.event_id).inc()
        LEADING.labels(self.event_id).set(1)
        log.info("leading admission", extra={"event_id": self.event_id})
        if self.service.on_lead is not None:
            self.service.on_lead(self.event_id)
        self.token = token
        self._lost = asyncio.Event()
        self._cleaned = False
        self._line_closed = False
        self._status = None
        self.bucket = None
        self.observer = RateObserver()
        renewer = asyncio.create_task(self._renew(token), name=f"lease:{self.event_id}")
        try:
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            tick_s = self.service.tick_s
            while not self._lost.is_set():
                next_at += tick_s
                delay = next_at - loop.time()
                if delay < 0:
                    next_at, delay = loop.time(), 0.0  # overran: no burst of missed ticks
                # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow a cancellation
                # that lands as its timeout fires, and the loop would then never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._lost.wait()
                if self._lost.is_set():
                    break
                try:
                    await self.tick(token)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one failed tick; the next one retries
                    self._log_error("admission tick failed", exc)
        finally:
            self.token = None
            LEADING.labels(self.event_id).set(0)
            for gauge in _LEADER_VIEW:
                forget(gauge, self.event_id)
            # In a task of its own, which a second cancellation of this one cannot cut short:
            # a stopper re-cancels a task still running after a second (runtime.cancel_and_
            # wait), and that second cancellation, landing here, left the renewer running
            # and renewing a lease nobody used, so no other process could lead the event.
            self._letting_go = asyncio.create_task(
                self._let_go(renewer, token), name=f"let-go:{self.event_id}"
            )
            await asyncio.shield(self._letting_go)

    async def _let_go(self, renewer: asyncio.Task[None], token: str) -> None:
        """End a tenure: stop renewing, and release the lease so that another process
        leads at its next attempt instead of after the lease lapses."""
        await runtime.cancel_and_wait(renewer)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await leader.release(self.service.redis, self.ek, token)
        log.info("stopped leading admission", extra={"event_id": self.event_id})

    async def _renew(self, token: str) -> None:
        redis = self.service.redis
        renewed_at = time.monotonic()
        every = self.service.lease_ms / 3000
        while True:
            await asyncio.sleep(every)
            try:
                # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow a cancellation
                # that lands as the renewal answers, and this loop would go on renewing.
                async with asyncio.timeout(every):
                    held = await leader.renew(
                        redis,
                        self.ek,
                        token,
                        lease_ms=self.service.lease_ms,
                        observed_rate=self.observer.rate,
                        now=time.time(),
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log_error("admission lease renewal failed", exc)
                held = time.monotonic() - renewed_at < self.service.lease_ms / 1000
            else:
                renewed_at = time.monotonic()
            if not held:
                log.warning("admission lease lost", extra={"event_id": self.event_id})
                self._lost.set()
                return

    async def tick(self, token: str) -> int:
        """One round of the loop; how many fans it admitted."""
        started = time.perf_counter()
        redis = self.service.redis
        now = time.time()
        state = await read_state(redis, self.ek, now)
        # Before anyone else is admitted: a row of a pass never issued would make a room
        # rebuilt from PostgreSQL admit its fan (and count it against max_active). When the
        # room had to be rebuilt first, this tick's state is stale.
        if (self._unissued or (not self._cleaned and state is not None)) and (
            await self._drop_unissued(state)
        ):
            return 0
        if self._uncertain:
            await self._settle_uncertain()
        if state is None:
            await self.service.rooms.ensure(self.event_id)
            return 0
        phase = await self._follow_waitlist(state)
        await self._follow_sale(state)
        if not state.ready():
            if now >= state.opens_at and time.monotonic() - self._opened_tried >= 0.5:
                self._opened_tried = time.monotonic()
                outcome = await self.service.rooms.open_room(self.event_id, now)
                log.info("opened room", extra={"event_id": self.event_id, "outcome": outcome})
            return 0
        mono = time.monotonic()
        current = self.bucket or buckets.TokenBucket.start(state.rate, mono)
        current, count = buckets.decide(
            current,
            mono,
            rate=state.rate,
            max_active=state.max_active,
            active=state.active,
            paused=state.paused,
            sold_out=state.sold_out,
        )
        claims: list[int] | None = None
        if count > 0 and phase.waitlisting:
            # Sold out with a waitlist: only as many fans as tickets came back and are not
            # offered yet (admission/waitlist.py); none while nothing is available.
            claims = waitlist_core.offer_claims(
                available=state.available or 0,
                offered=await waitlist_core.offered(redis, self.ek, now),
                per_fan_limit=state.per_fan_limit,
                most=count,
            )
            count = len(claims)
        admitted = 0
        total = state.admitted_total
        if count > 0:
            # A span only for ticks that admit someone: 20 idle ticks a second are no trace.
            with tracing.span("admission.admit", event=self.event_id, wanted=count) as span:
                admitted, total = await self._admit(token, state, count, now, claims)
                span.set_attribute("admitted", admitted)
            current = buckets.take(current, admitted)
        self.bucket = current
        self.observer.observe(mono, total)
        event = self.event_id
        RATE_CONFIGURED.labels(event).set(state.rate)
        MAX_ACTIVE.labels(event).set(state.max_active)
        ACTIVE_PASSES.labels(event).set(state.active + admitted)
        RATE_OBSERVED.labels(event).set(self.observer.rate or 0.0)
        PAUSED.labels(event).set(1 if state.paused else 0)
        waiting = max(0, state.waiting - admitted)
        FANS_WAITING.labels(event).set(waiting)
        # No wait is promised to a waitlist: whether tickets come back is unknowable.
        if self.observer.rate and waiting and not phase.waitlisting:
            LAST_FAN_ETA.labels(event).set(waiting / self.observer.rate)
        else:
            forget(LAST_FAN_ETA, event)
        TICK_SECONDS.observe(time.perf_counter() - started)
        return admitted

    async def _follow_sale(self, state: RoomState) -> None:
        """What follows from the room's state besides admitting: the event's status in
        PostgreSQL ('open' once the room opened, 'sold_out' while nothing is left and
        nothing held could come back), and a sold-out room's line closed (its waiting fans
        told and sent away, its passes no longer counted against max_active); a room whose
        waitlist is on keeps its line (admission/waitlist.py)."""
        if state.sold_out and state.waitlist:
            self._line_closed = False
        elif state.sold_out and not self._line_closed:
            self._line_closed = not await self.service.rooms.close_line(self.event_id)
        elif not state.sold_out:
            self._line_closed = False
        status = "sold_out" if state.sold_out else ("open" if state.opened else None)
        if status is not None and status != self._status:
            await self.service.db.execute(
                "UPDATE events SET status = $2 WHERE id = $1 AND status NOT IN ($2, 'closed')",
                self.event_id,
                status,
            )
            self._status = status

    async def _follow_waitlist(self, state: RoomState) -> waitlist_core.Phase:
        """Where the room stands with its waitlist after this look; written to the meta (for
        the fans' messages) only when it changed."""
        phase = waitlist_core.follow(
            state.phase,
            enabled=state.waitlist,
            available=state.available,
            sold_out=state.sold_out,
        )
        if phase != state.phase:
            await waitlist_core.store_phase(self.service.redis, self.ek, phase)
        return phase

    async def _admit(
        self,
        token: str,
        state: RoomState,
        count: int,
        now: float,
        offers: list[int] | None = None,
    ) -> tuple[int, int]:
        redis = self.service.redis
        raw = await redis.zrange(self.ek.queue, 0, count + CANDIDATE_SLACK - 1)
        if not raw:
            return 0, state.admitted_total
        fans = [f.decode() if isinstance(f, bytes) else str(f) for f in raw]
        seen = await redis.zmscore(self.ek.seen, fans)
        cutoff = now - state.grace_s
        keys = self.service.pass_keys
        issuer = self.service.issuer
        issued = int(now)
        expires = issued + state.pass_ttl_s
        seq = state.admitted_total
        # In line order: a fan to admit with the claims of its pass, or one predicted
        # abandoned (None: dropped by the script, no pass).
        heads: list[tuple[str, PassClaims | None]] = []
        to_sign: list[PassClaims] = []
        for fan, last in zip(fans, seen, strict=True):
            if last is not None and last < cutoff:
                heads.append((fan, None))
                continue
            if len(to_sign) == count:
                break
            seq += 1
            claims = PassClaims(
                iss=issuer,
                sub=fan,
                evt=self.event_id,
                jti=new_jti(),
                iat=issued,
                nbf=issued,
                exp=expires,
                seq=seq,
            )
            heads.append((fan, claims))
            to_sign.append(claims)
        passes = iter(await sign_passes(keys, to_sign))
        candidates = [
            leader.Candidate(fan)
            if claims is None
            else leader.Candidate(fan, next(passes), claims.jti, claims.exp, claims.seq)
            for fan, claims in heads
        ]
        rows = [
            PassRow(c.jti, c.fan_id, c.seq, float(issued), float(c.exp), c.queue_pass)
            for c in candidates
            if c.jti
        ]
        # Written ahead: PostgreSQL has every pass before Redis (and so the fan) sees it, so
        # a Redis that loses the room is rebuilt with every pass ever issued (no fan admitted
        # twice, max_active kept). A PostgreSQL that cannot take them admits nobody: the
        # tick fails and the next one tries again (nobody could check out meanwhile anyway).
        await self._record(rows)
        if offers is not None:
            # Claimed ahead too, in line order, so a pass in `active` always has its claim
            # counted (admission/waitlist.py).
            await waitlist_core.record_offers(
                redis, self.ek, list(zip((r.jti for r in rows), offers, strict=False))
            )
        try:
            reply = await leader.admit(
                redis, self.ek, token, candidates, limit=count, cutoff=cutoff
            )
        except BaseException:
            # Whether the script ran is unknown: its passes are settled later, by whether
            # their fans hold them (a row of a pass never issued would count against
            # max_active until it expires, in the record and in any rebuild).
            if rows:
                self._uncertain.append((time.monotonic(), rows))
            raise
        picked = {candidates[i].jti for i in reply.picked}
        # Passes signed for fans the script did not admit (they left, or the batch stopped):
        # nobody holds them, and a rebuilt room must not admit their fans.
        await self._unrecord([r.jti for r in rows if r.jti not in picked])
        if reply.outcome == "fenced":
            log.warning("admission fenced: the lease is gone", extra={"event_id": self.event_id})
            self._lost.set()
            return 0, state.admitted_total
        if reply.outcome == "unreconciled":
            await self._reconcile()
            return 0, state.admitted_total
        if reply.admitted and tracing.enabled():
            await self._link_joins([c.fan_id for c in candidates if c.jti in picked])
        if reply.abandoned:
            ABANDONED_SKIPPED.labels(self.event_id).inc(reply.abandoned)
        if reply.admitted:
            ADMITTED.labels(self.event_id).inc(reply.admitted)
        return reply.admitted, reply.admitted_total

    async def _reconcile(self) -> None:
        """Redis restarted under the room since its pass state was last written from
        PostgreSQL (``admit.lua`` answered 'unreconciled'), and may have lost its last
        second (a pass issued in it missing from ``active``, a spent marker): write it again
        before anyone else is admitted, then mark the room (the next tick admits)."""
        svc = self.service
        rebuilt = await recovery.rebuild(svc.db, svc.redis, svc.keys, self.event_id)
        run = await leader.mark_incarnation(svc.redis, self.ek, rebuilt.last_seq)
        RECONCILED.labels(self.event_id).inc()
        log.warning(
            "room rebuilt from postgresql after a redis restart",
            extra={"event_id": self.event_id, "run_id": run, "passes": rebuilt.passes},
        )

    async def _link_joins(self, fans: list[str]) -> None:
        """Link this tick's span to the joins of the fans it admitted (their traceparents,
        kept by the join while tracing is on), and forget them; a failure loses links only."""
        redis = self.service.redis
        try:
            values = await redis.hmget(self.ek.traces, fans)
            tracing.add_links(v.decode() if isinstance(v, bytes) else v for v in values)
            await redis.hdel(self.ek.traces, *fans)
        except Exception as exc:
            self._log_error("linking the admitted fans' joins failed", exc)

    async def _record(self, rows: list[PassRow]) -> None:
        """Record the passes about to be issued in ``queue_passes`` (raises when it fails)."""
        if not rows:
            return
        await self.service.db.execute(
            "INSERT INTO queue_passes"
            " (jti, event_id, fan_id, seq, issued_at, expires_at, token)"
            " SELECT t.jti, $1, t.fan, t.seq, to_timestamp(t.iat), to_timestamp(t.exp),"
            " t.token FROM unnest($2::text[], $3::text[], $4::bigint[], $5::float8[],"
            " $6::float8[], $7::text[]) AS t(jti, fan, seq, iat, exp, token)"
            " ON CONFLICT (jti) DO NOTHING",
            self.event_id,
            [r.jti for r in rows],
            [r.fan_id for r in rows],
            [r.seq for r in rows],
            [r.issued_at for r in rows],
            [r.expires_at for r in rows],
            [r.token for r in rows],
        )

    async def _unrecord(self, jtis: list[str]) -> None:
        """Forget recorded passes that were never issued; on failure the next tick tries
        again before it admits anyone."""
        if not jtis:
            return
        try:
            await self.service.db.execute(
                _DELETE_PASSES,
                self.event_id,
                jtis,
            )
        except Exception as exc:
            self._unissued += jtis
            self._log_error("forgetting passes never issued failed", exc)

    async def _settle_uncertain(self) -> None:
        """Delete the rows of the passes of failed ``admit.lua`` calls that were not issued.

        A pass was issued iff its fan's ``admitted`` entry is that very pass (a room rebuilt
        after a Redis restart gets it back from its row, so a rebuilt pass stays too; the
        rebuild's other passes of the same fan are taken out of ``active`` again).
        Looked at only :data:`SETTLE_UNCERTAIN_S` after the failure, with Redis answering
        again (this tick read the room): a script written before its connection broke has
        run, or never will, by then.
        """
        now = time.monotonic()
        due = [rows for at, rows in self._uncertain if now - at >= SETTLE_UNCERTAIN_S]
        if not due:
            return
        rows = [row for batch in due for row in batch]
        tokens = await self.service.redis.hmget(self.ek.admitted, [r.fan_id for r in rows])
        unissued = [
            row.jti for row, token in zip(rows, tokens, strict=True) if _text(token) != row.token
        ]
        if unissued:
            await self.service.db.execute(
                _DELETE_PASSES,
                self.event_id,
                unissued,
            )
            # A room rebuilt meanwhile took the rows for issued passes and counts them.
            await self.service.redis.zrem(self.ek.active, *unissued)
            log.info(
                "dropped the records of passes a failed admission did not issue",
                extra={"event_id": self.event_id, "rows": len(unissued)},
            )
        self._uncertain = [(at, r) for at, r in self._uncertain if now - at < SETTLE_UNCERTAIN_S]

    async def _drop_unissued(self, state: RoomState | None) -> bool:
        """Delete the rows of passes that were recorded but never issued (raises on failure);
        True when the room had to be rebuilt first (the caller's ``state`` is stale).

        This tenure's own leftovers by id. A previous leader's, once per tenure: it may have
        died between recording a tick's passes and running ``admit.lua``. Passes are issued
        strictly in number order, each numbered ``admitted_total + 1``, so every recorded
        pass numbered above the room's ``admitted_total`` was never issued. (A room that
        Redis lost has no total to compare with: its rebuild counts such rows as issued,
        the safe side for ``max_active``.) Unless Redis restarted under the room since it
        was last rebuilt: its ``admitted_total`` may have lost the passes issued in its last
        second, whose rows this would delete (their fans shopping uncounted, their numbers
        issued again). Such a room is rebuilt first, which carries the total on after
        PostgreSQL's highest number; the next tick cleans against that.
        """
        if self._unissued:
            await self.service.db.execute(
                _DELETE_PASSES,
                self.event_id,
                self._unissued,
            )
            self._unissued = []
        if not self._cleaned and state is not None:
            if not await leader.reconciled(self.service.redis, self.ek):
                await self._reconcile()
                return True
            dropped = await self.service.db.execute(
                "DELETE FROM queue_passes WHERE event_id = $1 AND seq > $2",
                self.event_id,
                state.admitted_total,
            )
            self._cleaned = True
            if dropped != "DELETE 0":
                log.info(
                    "dropped the records of passes a previous leader never issued",
                    extra={"event_id": self.event_id, "rows": dropped},
                )
        return False

    async def reconcile(
        self,
        version: int,
        rate: float,
        max_active: int,
        paused: bool,
        waitlist: bool | None = None,
    ) -> None:
        """Bring the room's meta up to PostgreSQL's admission settings (leader only)."""
        if self.leading:
            await leader.mirror_settings(
                self.service.redis,
                self.ek,
                version=version,
                rate=rate,
                max_active=max_active,
                paused=paused,
                waitlist=waitlist,
            )

    async def stop(self) -> None:
        """Stop following or leading (a lease held is released)."""
        if self.task is not None:
            await cancel_and_wait(self.task)
        if self._letting_go is not None:
            # Not cancelled: it releases the lease. Bounded: the renewer stops at its next
            # await, and the release has a second.
            await asyncio.wait({self._letting_go})
        for gauge in (*_LEADER_VIEW, LEADING):
            forget(gauge, self.event_id)

    def _log_error(self, message: str, exc: BaseException) -> None:
        if time.monotonic() - self._error_logged_at > _ERROR_LOG_EVERY_S:
            self._error_logged_at = time.monotonic()
            log.warning(message, extra={"event_id": self.event_id, "error": repr(exc)})


async def sign_passes(keys: PassKeys, claims: list[PassClaims]) -> list[str]:
    """The passes of ``claims``, in order, signed :data:`SIGN_CHUNK` at a time with a turn of
    the event loop between chunks."""
    signed: list[str] = []
    for start in range(0, len(claims), SIGN_CHUNK):
        if start:
            await asyncio.sleep(0)
        signed += [keys.sign(c) for c in claims[start : start + SIGN_CHUNK]]
    return signed


class AdmissionService:
    """This process's share of admission: one :class:`EventAdmission` per open event."""

    def __init__(
        self,
        *,
        redis: Redis,
        db: asyncpg.Pool[Any],
        keys: Keys,
        pass_keys: PassKeys,
        issuer: str,
        rooms: Rooms,
        tick_s: float = TICK_S,
        poll_s: float = POLL_S,
        lease_ms: int = leader.LEASE_MS,
        acquire_every_s: float = leader.ACQUIRE_EVERY_S,
        on_lead: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.db = db
        self.keys = keys
        self.pass_keys = pass_keys
        self.issuer = issuer
        self.rooms = rooms
        self.tick_s = tick_s
        self.poll_s = poll_s
        self.lease_ms = lease_ms
        self.acquire_every_s = acquire_every_s
        #: Called with an event's id as this process starts leading its admission (the
        #: server warms the event's inventory actor: InventoryHost.warm).
        self.on_lead = on_lead
        self.events: dict[str, EventAdmission] = {}
        self._task: asyncio.Task[None] | None = None
        self._error_logged_at = 0.0

    async def start(self) -> None:
        """Start watching PostgreSQL for events to run."""
        with contextlib.suppress(Exception):  # Redis may come up later: scripts load lazily
            await asyncio.wait_for(leader.load_all(self.redis), 2.0)
        self._task = asyncio.create_task(self._supervise(), name="admission-service")

    async def _supervise(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - self._error_logged_at > _ERROR_LOG_EVERY_S:
                    self._error_logged_at = time.monotonic()
                    log.warning("admission poll failed", extra={"error": repr(exc)})
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> None:
        """Start loops for events now open (or opening soon), stop those of closed events."""
        rows = await self.db.fetch(
            "SELECT e.id, r.rate_per_second, r.max_active, r.paused,"
            # The waitlist as in force now: a deadline passed ends it within one poll.
            " r.waitlist AND (r.waitlist_until IS NULL OR r.waitlist_until > now())"
            " AS waitlist,"
            " (extract(epoch FROM r.updated_at) * 1000000)::bigint AS version"
            " FROM events e JOIN room_settings r ON r.event_id = e.id"
            " WHERE e.status <> 'closed' AND r.opens_at <= now() + make_interval(secs => $1)",
            float(OPEN_SOON_S),
        )
        wanted = {row["id"]: row for row in rows}
        for event_id in [e for e in self.events if e not in wanted]:
            # Stopped before it is forgotten: whoever sees the event gone also sees its
            # lease released.
            try:
                await self.events[event_id].stop()
            finally:
                self.events.pop(event_id, None)
        for event_id, row in wanted.items():
            runner = self.events.get(event_id)
            if runner is None:
                runner = self.events[event_id] = EventAdmission(self, event_id)
                runner.start()
            try:
                await runner.reconcile(
                    row["version"],
                    row["rate_per_second"],
                    row["max_active"],
                    row["paused"],
                    row["waitlist"],
                )
            except Exception as exc:
                runner._log_error("reconciling admission settings failed", exc)

    def leading(self) -> list[str]:
        """The events this process leads now."""
        return sorted(e for e, runner in self.events.items() if runner.leading)

    async def stop(self) -> None:
        """Stop every loop, releasing the leases held (another process takes over at once)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        runners = list(self.events.values())
        self.events.clear()
        await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has really finished (see
    :func:`waitroom.core.runtime.cancel_and_wait`), logging the error it ended with."""
    error = await runtime.cancel_and_wait(task)
    if error is not None:
        log.warning("admission task ended with an error", extra={"error": repr(error)})
