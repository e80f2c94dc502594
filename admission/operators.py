"""What operators do to a live sale, shared by the admin API and the CLI (same code, same rules).

Every change is made in PostgreSQL first (``room_settings`` is the source of truth), in the
same transaction as its ``audit_log`` row (who, when, old, new), then mirrored into the
room's live state in Redis, where the leader of the event's admission loop reads it on its
next tick (within :data:`admission.loop.TICK_S`). Should the mirror fail, the leader's own
reconciliation from PostgreSQL (every :data:`admission.loop.POLL_S`) applies the change.

Also here: the read side of the operators' view (:func:`admission_status`, :func:`plan`), and
the two calls that end a pass's claim on a shopping slot: :func:`complete_pass` (the order is
paid or the holds released; called by checkout) and :func:`revoke_pass`.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from msgspec import UNSET, Meta, UnsetType
from redis.asyncio import Redis

from admission import leader
from waitroom.core import audit
from waitroom.core.errors import NotFound, ValidationFailed
from waitroom.core.keys import Keys

Rate = Annotated[float, Meta(gt=0, le=100_000, description="admissions per second")]
MaxActive = Annotated[int, Meta(ge=1, le=10_000_000, description="passes active at once")]
#: An observed rate older than this is stale (no leader is publishing it).
OBSERVED_STALE_S = 5.0


class AdmissionPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``PATCH /v1/admin/events/{event_id}/admission``: the fields to change."""

    rate_per_second: Rate | UnsetType = UNSET
    max_active: MaxActive | UnsetType = UNSET
    paused: bool | UnsetType = UNSET
    #: Keep the line as a waitlist once sold out (admission/waitlist.py); turning it off in
    #: a sold-out sale ends the waitlist: the line closes and the fans are told sold out.
    waitlist: bool | UnsetType = UNSET
    #: When the waitlist ends (a time with its zone); null: when it is turned off.
    waitlist_until: Annotated[datetime, Meta(tz=True)] | UnsetType | None = UNSET


class AdmissionSettings(msgspec.Struct, frozen=True):
    """An event's admission settings as stored."""

    event_id: str
    rate_per_second: float
    max_active: int
    paused: bool
    updated_at: datetime
    waitlist: bool = False
    waitlist_until: datetime | None = None


class RevokedPass(msgspec.Struct, frozen=True):
    """Answer of a revocation."""

    jti: str
    event_id: str
    fan_id: str
    seq: int
    expires_at: datetime
    revoked_at: datetime


class AdmissionStatus(msgspec.Struct, frozen=True):
    """The live view of a sale (``waitroom status``, and ``admission`` in the event's stats)."""

    event_id: str
    status: str
    #: Fans in line (placed, or in a lottery's pre-queue).
    fans_waiting: int
    admitted_total: int
    abandoned_total: int
    active_passes: int
    max_active: int
    rate_per_second: float
    #: Admissions per second over the last seconds, as the leader sees them; null without one.
    observed_rate: float | None
    paused: bool
    sold_out: bool
    tickets_left: int
    #: Estimated seconds until the last fan in line is admitted; null while paused.
    last_fan_wait_s: float | None
    #: Whether some process leads the event's admission loop now.
    leader: bool
    at: datetime
    #: The waitlist in force (admission/waitlist.py): its setting, unless ``waitlist_until``
    #: has passed; ``waitlisted`` once the sale sold out and the line is kept as a waitlist,
    #: with the tickets that came back since.
    waitlist: bool = False
    waitlist_until: datetime | None = None
    waitlisted: bool = False
    tickets_returned: int = 0


class AdmissionPlan(msgspec.Struct, frozen=True):
    """``waitroom admission plan``: what a rate would mean for the fans in line now."""

    event_id: str
    fans_waiting: int
    rate_per_second: float
    last_fan_wait_s: float
    median_fan_wait_s: float
    current_rate_per_second: float
    current_last_fan_wait_s: float
    tickets_left: int


def make_patch(**fields: Any) -> AdmissionPatch:
    """A patch from keyword values (the CLI), with the same validation as the API."""
    try:
        patch = msgspec.convert({k: v for k, v in fields.items() if v is not None}, AdmissionPatch)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = message.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in message else None
        raise ValidationFailed(message, field=field) from None
    check_patch(patch)
    return patch


def check_patch(patch: AdmissionPatch) -> None:
    """Rules beyond the field types: something to change, and a finite rate."""
    if patch.rate_per_second is not UNSET and not math.isfinite(patch.rate_per_second):
        raise ValidationFailed("rate_per_second must be a finite number", field="rate_per_second")
    if all(
        v is UNSET
        for v in (
            patch.rate_per_second,
            patch.max_active,
            patch.paused,
            patch.waitlist,
            patch.waitlist_until,
        )
    ):
        raise ValidationFailed(
            "nothing to change: give rate_per_second, max_active, paused, waitlist or"
            " waitlist_until",
            code="empty_patch",
        )


def _event_not_found(event_id: str) -> NotFound:
    return NotFound(
        f"no event {event_id!r}", code="event_not_found", details={"event_id": event_id}
    )


def _settings_json(s: AdmissionSettings) -> str:
    return msgspec.json.encode(
        {
            "rate_per_second": s.rate_per_second,
            "max_active": s.max_active,
            "paused": s.paused,
            "waitlist": s.waitlist,
            "waitlist_until": None if s.waitlist_until is None else s.waitlist_until.isoformat(),
        }
    ).decode()


def _revocation_json(jti: str, fan_id: str, *, revoked: bool) -> str:
    return msgspec.json.encode({"jti": jti, "fan_id": fan_id, "revoked": revoked}).decode()


def _version(at: datetime) -> int:
    return round(at.timestamp() * 1_000_000)


async def update_admission(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    event_id: str,
    patch: AdmissionPatch,
    *,
    actor: audit.Actor | str,
) -> AdmissionSettings:
    """Apply ``patch`` to the event's admission settings, audit it, and mirror it live.

    404 ``event_not_found`` for an unknown event. A patch that changes nothing is still
    audited (an operator did ask), and mirrored again, which is harmless.
    """
    check_patch(patch)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT rate_per_second, max_active, paused, updated_at, waitlist, waitlist_until"
            " FROM room_settings WHERE event_id = $1 FOR UPDATE",
            event_id,
        )
        if row is None:
            raise _event_not_found(event_id)
        old = AdmissionSettings(
            event_id,
            row["rate_per_second"],
            row["max_active"],
            row["paused"],
            row["updated_at"],
            row["waitlist"],
            row["waitlist_until"],
        )
        rate = old.rate_per_second if patch.rate_per_second is UNSET else patch.rate_per_second
        max_active = old.max_active if patch.max_active is UNSET else patch.max_active
        paused = old.paused if patch.paused is UNSET else patch.paused
        waitlist = old.waitlist if patch.waitlist is UNSET else patch.waitlist
        until = old.waitlist_until if patch.waitlist_until is UNSET else patch.waitlist_until
        # clock_timestamp(), not now(): the version must grow even within one transaction's
        # clock, and be later than anything a reconciliation read before this commit.
        updated_at = await conn.fetchval(
            "UPDATE room_settings SET rate_per_second = $2, max_active = $3, paused = $4,"
            " waitlist = $5, waitlist_until = $6,"
            " updated_at = greatest(clock_timestamp(), updated_at + interval '1 microsecond')"
            " WHERE event_id = $1 RETURNING updated_at",
            event_id,
            float(rate),
            max_active,
            paused,
            waitlist,
            until,
        )
        new = AdmissionSettings(
            event_id, float(rate), max_active, paused, updated_at, waitlist, until
        )
        await audit.record(
            conn,
            actor,
            "admission.update",
            event_id,
            old=_settings_json(old),
            new=_settings_json(new),
        )
    await leader.mirror_settings(
        redis,
        keys.event(event_id),
        version=_version(new.updated_at),
        rate=new.rate_per_second,
        max_active=new.max_active,
        paused=new.paused,
        # As in force now: a deadline already past ends the waitlist at once.
        waitlist=new.waitlist
        and (new.waitlist_until is None or new.waitlist_until > datetime.now(UTC)),
    )
    return new


async def complete_pass(redis: Redis, keys: Keys, event_id: str, jti: str) -> bool:
    """The pass's fan is done shopping (order paid, or holds released): free its slot.

    The pass itself stays valid until it expires (the fan may still look at the order);
    it just no longer counts against ``max_active``. True if it was counting.
    """
    return bool(await redis.zrem(keys.event(event_id).active, jti))


#: How long a spent-pass marker is kept: the longest a pass can live (pass_ttl_s <= 1 day).
SPENT_TTL_S = 86_400


async def spend_pass(redis: Redis, keys: Keys, event_id: str, jti: str) -> None:
    """The pass's order is paid: free its slot and refuse any further reservation with it."""
    # Not MULTI/EXEC: on a Redis Cluster, redis-py's asyncio pipeline runs each command queued
    # in a transaction in a new thread with an event loop of its own, and joins it, stalling
    # this loop (a thread, a loop and a socket pair per command: most of the payment workers'
    # CPU in a cluster sale). Atomicity buys nothing here: both commands are idempotent, in
    # one slot and one round trip, and the outbox retries the task until both are applied.
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.event(event_id).spent_pass(jti), "1", ex=SPENT_TTL_S)
        pipe.zrem(keys.event(event_id).active, jti)
        await pipe.execute()


async def revoke_pass(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, jti: str, *, actor: audit.Actor | str
) -> RevokedPass:
    """Revoke a pass: the gate refuses it from now on, and its slot is freed.

    The revocation is kept in Redis until the pass would have expired anyway. Revoking again
    is harmless (the first revocation time is kept). 404 ``pass_not_found`` for an id no
    loop has issued.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE queue_passes SET revoked_at = coalesce(revoked_at, clock_timestamp())"
            " WHERE jti = $1 RETURNING event_id, fan_id, seq, expires_at, revoked_at",
            jti,
        )
        if row is None:
            raise NotFound(f"no queue pass {jti!r}", code="pass_not_found", details={"jti": jti})
        revoked = RevokedPass(
            jti=jti,
            event_id=row["event_id"],
            fan_id=row["fan_id"],
            seq=row["seq"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
        )
        await audit.record(
            conn,
            actor,
            "pass.revoke",
            revoked.event_id,
            old=_revocation_json(jti, revoked.fan_id, revoked=False),
            new=_revocation_json(jti, revoked.fan_id, revoked=True),
        )
    # Until expiry plus the gate's leeway: a pass it still accepts is still refused here.
    ttl_ms = int((revoked.expires_at.timestamp() - time.time() + 10) * 1000)
    pipe = redis.pipeline(transaction=False)
    if ttl_ms > 0:
        pipe.set(keys.event(revoked.event_id).revoked_pass(jti), revoked.event_id, px=ttl_ms)
    pipe.zrem(keys.event(revoked.event_id).active, jti)
    await pipe.execute()
    return revoked


# --- the live view ------------------------------------------------------------------------


async def _event_row(pool: asyncpg.Pool[Any], event_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT e.status, r.rate_per_second, r.max_active, r.paused, r.waitlist,"
        " r.waitlist_until,"
        " (SELECT coalesce(sum(quantity - held - sold), 0) FROM ticket_types t"
        "   WHERE t.event_id = e.id) AS tickets_left"
        " FROM events e JOIN room_settings r ON r.event_id = e.id WHERE e.id = $1",
        event_id,
    )
    if row is None:
        raise _event_not_found(event_id)
    record: asyncpg.Record = row
    return record


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


async def admission_status(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, event_id: str, *, now: float
) -> AdmissionStatus:
    """The live figures of a sale: PostgreSQL for settings and tickets, Redis for the line."""
    row = await _event_row(pool, event_id)
    ek = keys.event(event_id)
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(ek.queue)
    pipe.zcard(ek.prequeue)
    pipe.hmget(
        ek.meta,
        [
            "admitted_total",
            "abandoned_total",
            "sold_out",
            "observed_rate",
            "observed_at",
            "waitlisting",
            "returned",
        ],
    )
    pipe.zcount(ek.active, f"({now!r}", "+inf")
    pipe.exists(ek.leader)
    queued, prequeued, meta, active, has_leader = await pipe.execute()
    admitted_total, abandoned_total, sold_out, observed, observed_at, listing, returned = meta
    until: datetime | None = row["waitlist_until"]
    # The waitlist as in force now: past its deadline it is over.
    waitlist = bool(row["waitlist"]) and (until is None or until.timestamp() > now)
    waitlisted = waitlist and listing in (b"1", "1")
    observed_rate = _float(observed)
    at = _float(observed_at)
    if not has_leader or at is None or now - at > OBSERVED_STALE_S:
        observed_rate = None
    rate: float = row["rate_per_second"]
    waiting = int(queued) + int(prequeued)
    paused: bool = row["paused"]
    # The observed rate is what fans really get (max_active may hold it below the setting).
    effective = observed_rate if observed_rate else rate
    return AdmissionStatus(
        event_id=event_id,
        status=row["status"],
        fans_waiting=waiting,
        admitted_total=int(admitted_total or 0),
        abandoned_total=int(abandoned_total or 0),
        active_passes=int(active),
        max_active=row["max_active"],
        rate_per_second=rate,
        observed_rate=None if observed_rate is None else round(observed_rate, 3),
        paused=paused,
        sold_out=sold_out in (b"1", "1"),
        tickets_left=int(row["tickets_left"]),
        # No wait on a waitlist: whether tickets come back at all is unknowable.
        last_fan_wait_s=None if paused or waitlisted else round(waiting / effective, 1),
        leader=bool(has_leader),
        at=datetime.fromtimestamp(now, UTC),
        waitlist=waitlist,
        waitlist_until=until,
        waitlisted=waitlisted,
        tickets_returned=int(returned or 0) if waitlisted else 0,
    )


async def plan(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, event_id: str, rate: float
) -> AdmissionPlan:
    """A dry run: the waits ``rate`` would give the fans in line now (nothing changes)."""
    if not (math.isfinite(rate) and 0 < rate <= 100_000):
        raise ValidationFailed("rate must be above 0 and at most 100000", field="rate_per_second")
    row = await _event_row(pool, event_id)
    ek = keys.event(event_id)
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(ek.queue)
    pipe.zcard(ek.prequeue)
    queued, prequeued = await pipe.execute()
    waiting = int(queued) + int(prequeued)
    current: float = row["rate_per_second"]
    return AdmissionPlan(
        event_id=event_id,
        fans_waiting=waiting,
        rate_per_second=rate,
        last_fan_wait_s=round(waiting / rate, 1),
        median_fan_wait_s=round(waiting / 2 / rate, 1),
        current_rate_per_second=current,
        current_last_fan_wait_s=round(waiting / current, 1),
        tickets_left=int(row["tickets_left"]),
    )
