"""The admission lease: which one process runs an event's admission loop, and its Redis calls.

The lease is the event's ``leader`` key (:mod:`waitroom.core.lease`): ``SET NX PX`` with a
random token. The holder renews it every :data:`RENEW_EVERY_S` with the lease script; everyone else
tries to take it every :data:`ACQUIRE_EVERY_S`. A leader that dies stops renewing and its
lease lapses after at most :data:`LEASE_MS`, so another process leads within
``LEASE_MS + ACQUIRE_EVERY_S`` (under 2 s) of the last renewal.

A lease alone cannot stop a leader that was paused (GC, a stalled host) from acting after it
lapsed: so every admission is fenced, too. ``admit.lua`` checks inside Redis, atomically with
its writes, that the ``leader`` key still holds the caller's token.

This module also holds the thin adapters of the admission scripts (``admission/lua``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from waitroom.core import lease, lua_scripts
from waitroom.core.keys import EventKeys
from waitroom.core.lua_scripts import Script

#: Lease lifetime; at most 2 s so that a dead leader is replaced within 3 s.
LEASE_MS = 1500
#: The holder renews at a third of the lifetime: two renewals may fail before it lapses.
RENEW_EVERY_S = LEASE_MS / 3000
#: How often a follower tries to take the lease.
ACQUIRE_EVERY_S = 0.25


ADMIT = Script("admission.lua", "admit.lua")
SETTINGS = Script("admission.lua", "settings.lua")
INCARNATION = Script("admission.lua", "incarnation.lua")
RECONCILED = Script("admission.lua", "reconciled.lua")
ALL = (*lease.SCRIPTS, ADMIT, SETTINGS, INCARNATION, RECONCILED)


async def load_all(redis: Redis) -> None:
    """Register the admission scripts with Redis, so the loop only ever sends ``EVALSHA``."""
    await lua_scripts.load(redis, ALL)


def new_token() -> str:
    """A lease token: unique to one tenure of one process."""
    return secrets.token_hex(12)


async def acquire(redis: Redis, ek: EventKeys, token: str, *, lease_ms: int = LEASE_MS) -> bool:
    """Take the lease if nobody holds it."""
    return await lease.acquire(redis, ek.leader, token, lease_ms=lease_ms)


async def renew(
    redis: Redis,
    ek: EventKeys,
    token: str,
    *,
    lease_ms: int = LEASE_MS,
    observed_rate: float | None = None,
    now: float = 0.0,
) -> bool:
    """Extend our lease (and publish the observed rate); False when it is not ours any more."""
    figures = (
        None
        if observed_rate is None
        else {"observed_rate": f"{observed_rate:.3f}", "observed_at": f"{now:.3f}"}
    )
    return await lease.renew(
        redis, ek.leader, token, lease_ms=lease_ms, publish_to=ek.meta, figures=figures
    )


async def release(redis: Redis, ek: EventKeys, token: str) -> bool:
    """Give the lease up at once (a clean shutdown), if it is still ours."""
    return await lease.release(redis, ek.leader, token)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A fan at the head of the line, with the pass signed for it (``""`` when predicted
    abandoned)."""

    fan_id: str
    queue_pass: str = ""
    jti: str = ""
    exp: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class AdmitReply:
    """What ``admit.lua`` did."""

    outcome: str  # "done" | "moved" | "stale" | "fenced" | "unreconciled"
    admitted: int
    abandoned: int
    admitted_total: int
    #: Indices (0-based) of the candidates admitted, in order.
    picked: list[int]


async def admit(
    redis: Redis,
    ek: EventKeys,
    token: str,
    candidates: Sequence[Candidate],
    *,
    limit: int,
    cutoff: float | None,
) -> AdmitReply:
    """Admit up to ``limit`` of ``candidates`` from the head of the line, fenced by ``token``."""
    args: list[str | int] = [token, "" if cutoff is None else repr(cutoff), limit]
    for c in candidates:
        args += [c.fan_id, c.queue_pass, c.jti, c.exp, c.seq]
    keys = [
        ek.leader,
        ek.meta,
        ek.queue,
        ek.seen,
        ek.fans,
        ek.admitted,
        ek.active,
        ek.order,
        ek.live,
        ek.incarnation,
    ]
    outcome, admitted, abandoned, total, picked = await ADMIT(redis, keys, args)
    return AdmitReply(
        outcome=outcome.decode() if isinstance(outcome, bytes) else str(outcome),
        admitted=int(admitted),
        abandoned=int(abandoned),
        admitted_total=int(total),
        picked=[int(i) - 1 for i in picked],
    )


async def mark_incarnation(redis: Redis, ek: EventKeys, last_seq: int) -> str:
    """Mark the room's pass state as written from PostgreSQL under the running Redis
    process (``admit.lua`` admits again), its pass numbers going on after ``last_seq``;
    the run id."""
    run = await INCARNATION(redis, [ek.incarnation, ek.meta], [last_seq])
    return run.decode() if isinstance(run, bytes) else str(run)


async def reconciled(redis: Redis, ek: EventKeys) -> bool:
    """Whether the room was marked (:func:`mark_incarnation`) under the running Redis process."""
    return bool(int(await RECONCILED(redis, [ek.incarnation], [])))


async def mirror_settings(
    redis: Redis,
    ek: EventKeys,
    *,
    version: int,
    rate: float,
    max_active: int,
    paused: bool,
    waitlist: bool | None = None,
) -> bool:
    """Write the admission settings into the room's meta unless a newer version is there
    (``waitlist`` None leaves the room's waitlist setting as it is)."""
    reply = await SETTINGS(
        redis,
        [ek.meta, ek.news],
        [
            version,
            repr(float(rate)),
            max_active,
            "1" if paused else "0",
            "" if waitlist is None else "1" if waitlist else "0",
        ],
    )
    return int(reply) == 1
