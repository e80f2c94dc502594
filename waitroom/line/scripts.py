"""Thin adapter over the waiting room's Lua scripts (the ``.lua`` files in ``waitroom/line/lua``).

Each script is read once, at import, by :class:`waitroom.core.lua_scripts.Script` (a line
``--!include NAME.lua`` splices in the token bucket); :func:`load_all` registers them with
Redis at start-up. The functions below run one script each, in one round trip, and turn its
reply into typed values; the reply layouts are documented at the top of each ``.lua`` file.

Per-event scripts take only keys of that event (one Redis Cluster slot); the rate-limit
buckets of a join are per event too (:meth:`waitroom.core.keys.EventKeys.bucket`), so a join and
its limits run in one script.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis

from waitroom.core import lua_scripts
from waitroom.core.keys import EventKeys
from waitroom.core.lua_scripts import Script
from waitroom.core.redis import Multiplexer
from waitroom.line.ratelimit import Decision, Limit

#: Either client runs the scripts: redis-py's, or the pipelined one of the hot path.
Client = Redis | Multiplexer

#: ``positions`` codes of fans who are not waiting with a place.
PREQUEUE = -1
ADMITTED = -2
GONE = -3
ADMITTING = -4


def _script(name: str) -> Script:
    return Script("waitroom.line.lua", name)


INIT_ROOM = _script("init_room.lua")
JOIN = _script("join.lua")
LEAVE = _script("leave.lua")
POSITIONS = _script("positions.lua")
SWEEP = _script("sweep.lua")
OPEN_ROOM = _script("open_room.lua")
DRAW = _script("draw.lua")
CHALLENGE = _script("challenge.lua")
CHARGE = _script("charge.lua")
CLOSE_LINE = _script("close_line.lua")
ALL = (INIT_ROOM, JOIN, LEAVE, POSITIONS, SWEEP, OPEN_ROOM, DRAW, CHALLENGE, CHARGE, CLOSE_LINE)


async def load_all(redis: Client) -> None:
    """Register every script with Redis (``SCRIPT LOAD``), so the hot path is ``EVALSHA``."""
    await lua_scripts.load(redis, ALL)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# --- replies ------------------------------------------------------------------------------


class JoinReply(msgspec.Struct, frozen=True):
    """What ``join.lua`` answered (see its header)."""

    #: "joined" | "limited" | "challenge_required" | "challenge_replayed" | "capped"
    outcome: str
    #: "waiting" | "prequeue" | "admitted" | "none"; for "capped": "address" | "subnet"
    state: str
    rank: int | None
    created: bool
    queue_pass: str | None
    paused: bool
    sold_out: bool
    admitted_total: int
    draw_due: bool
    limit: Decision
    #: The fan's score in the queue (its join number or drawn place): what its receipt names.
    place: int | None = None
    #: A receipt put the fan back where it stood before Redis lost the line.
    restored: bool = False
    #: The sale sold out and the room keeps its line as a waitlist (admission/waitlist.py).
    waitlisted: bool = False
    #: Tickets that came back since the waitlist began.
    returned: int = 0


class RoomView(msgspec.Struct, frozen=True):
    """A room's live state as ``positions.lua`` read it."""

    mode: str
    opens_at: float
    opened: bool
    drawn: bool
    paused: bool
    sold_out: bool
    admitted_total: int
    #: Fans in line: placed in the queue or waiting in the lottery pre-queue.
    waiting: int
    commitment: str | None
    #: The sale sold out and the room keeps its line as a waitlist (admission/waitlist.py);
    #: ``sold_out`` is never true in such a room.
    waitlisted: bool = False
    #: Tickets that came back since the waitlist began.
    returned: int = 0

    def draw_due(self, now: float) -> bool:
        """A lottery room whose sale has opened (or should have) but is not drawn yet."""
        return self.mode == "lottery" and not self.drawn and (self.opened or now >= self.opens_at)


class Positions(msgspec.Struct, frozen=True):
    """``positions.lua``'s answer: the room, one code per fan asked about, and passes."""

    room: RoomView
    #: Per fan, in the order asked: fans ahead (>= 0), or PREQUEUE, ADMITTED, GONE, ADMITTING.
    codes: list[int]
    #: The passes of the fans whose code is ADMITTED, in order.
    passes: list[str]


class OpenReply(msgspec.Struct, frozen=True):
    """``open_room.lua``'s answer."""

    outcome: str  # "no_room" | "fifo" | "drawn" | "busy" | "draw"
    seed: str | None = None
    prequeue: tuple[str, ...] = ()


class JoinGate(msgspec.Struct, frozen=True):
    """What a new place costs in ``join.lua``: a challenge, and room under the caps."""

    #: Counter names of the client's address and subnet (``challenge.networks``).
    address: str
    subnet: str
    #: A verified challenge's id (its hash), spent by the join that creates a place.
    challenge: str | None = None
    challenge_ttl_ms: int = 1
    #: A new place is refused ("challenge_required") without ``challenge``.
    need_challenge: bool = False
    #: Live places (fans waiting in line) per address / subnet; unbounded unless given (the
    #: HTTP join gives :data:`waitroom.line.challenge.CAPS`).
    address_cap: int = 2**31 - 1
    subnet_cap: int = 2**31 - 1
    #: What a fan refused by a cap is told to wait (``Retry-After``).
    capped_retry_ms: int = 30_000
    #: The place a verified receipt proves (:mod:`waitroom.line.receipts`): a fan not in line
    #: is put back there if Redis lost the line since, else refused ("receipt_stale").
    receipt_place: int | None = None


class PressureReply(msgspec.Struct, frozen=True):
    """``challenge.lua``'s answer: the counts behind the next challenge, or a refusal."""

    outcome: str  # "ok" | "limited" | "no_room"
    crowd: float = 0.0
    address: float = 0.0
    subnet: float = 0.0
    join_rate: float = 0.0
    limit: Decision | None = None


# --- calls --------------------------------------------------------------------------------


async def room_loaded(redis: Client, ek: EventKeys) -> bool:
    """Whether the room's meta was written by :func:`init_room` (it has a ``mode``)."""
    if isinstance(redis, Multiplexer):
        return bool(await redis.execute("HEXISTS", ek.meta, "mode"))
    return bool(await redis.hexists(ek.meta, "mode"))


async def init_room(redis: Client, ek: EventKeys, fields: dict[str, str], seed: str | None) -> None:
    """Write a room's initial live state, keeping any field that exists already."""
    args: list[str] = [seed or ""]
    for name, value in fields.items():
        args += [name, value]
    await INIT_ROOM(redis, [ek.meta, ek.seed, ek.seq, ek.incarnation], args)


@functools.lru_cache(maxsize=1024)
def _join_keys(ek: EventKeys) -> tuple[str, ...]:
    # The same seven keys on every join of an event: built once, not seven f-strings a join.
    return (ek.meta, ek.queue, ek.prequeue, ek.seq, ek.fans, ek.seen, ek.admitted)


async def join(
    redis: Client,
    ek: EventKeys,
    fan_id: str,
    *,
    now: float,
    ip: str,
    ip_limit: Limit,
    fan_limit: Limit | None,
    gate: JoinGate | None = None,
) -> JoinReply | None:
    """Join ``fan_id`` to the line; ``None`` when the room is not in Redis yet.

    ``gate`` says what a new place costs (challenge, caps); without one a new place needs no
    challenge and the caps count under the IP's own name.
    """
    gate = gate or JoinGate(address=f"a:{ip}", subnet=f"n:{ip}")
    keys = [
        *_join_keys(ek),
        ek.bucket("ip", ip),
        ek.bucket("fan", fan_id),
        # A key in the event's slot even without a challenge: scripts declare every key.
        ek.challenge_used(gate.challenge or "-"),
        ek.live,
    ]
    args: list[str | int | float] = [
        fan_id,
        repr(now),
        int(now * 1000),
        ip_limit.rate,
        ip_limit.burst,
        fan_limit.rate if fan_limit else 0,
        fan_limit.burst if fan_limit else 0,
        gate.challenge or "",
        gate.challenge_ttl_ms,
        1 if gate.need_challenge else 0,
        gate.address_cap,
        gate.subnet_cap,
        gate.address,
        gate.subnet,
        gate.capped_retry_ms,
        "" if gate.receipt_place is None else gate.receipt_place,
    ]
    reply = await JOIN(redis, keys, args)
    if len(reply) == 1:
        return None
    limit, remaining, retry_ms, reset_ms = (int(v) for v in reply[9:13])
    return JoinReply(
        outcome=_text(reply[0]) or "",
        state=_text(reply[1]) or "",
        rank=None if reply[2] is None else int(reply[2]),
        created=reply[3] == 1,
        queue_pass=_text(reply[4]),
        paused=reply[5] == b"1",
        sold_out=reply[6] == 1,
        admitted_total=int(reply[7]),
        draw_due=reply[8] == 1,
        limit=Decision(
            allowed=_text(reply[0]) == "joined",
            limit=limit,
            remaining=remaining,
            retry_after_ms=retry_ms,
            reset_ms=reset_ms,
        ),
        place=int(reply[13]) if len(reply) > 13 and reply[13] is not None else None,
        restored=len(reply) > 14 and reply[14] == 1,
        waitlisted=len(reply) > 15 and reply[15] == 1,
        returned=int(reply[16]) if len(reply) > 16 else 0,
    )


async def pressure(
    redis: Client,
    ek: EventKeys,
    *,
    now: float,
    ip: str,
    address: str,
    subnet: str,
    limit: Limit,
    half_life_s: float,
) -> PressureReply:
    """Charge ``ip``'s bucket and count one more challenge for it; the counts after."""
    keys = [
        ek.meta,
        ek.seq,
        ek.join_rate,
        ek.pressure("crowd"),
        ek.pressure(address),
        ek.pressure(subnet),
        ek.bucket("addr", ip),
    ]
    reply = await CHALLENGE(
        redis, keys, [int(now * 1000), int(half_life_s * 1000), limit.rate, limit.burst]
    )
    outcome = _text(reply[0]) or ""
    if outcome == "limited":
        retry_ms, burst, left = (int(v) for v in reply[1:4])
        return PressureReply(
            outcome,
            limit=Decision(False, burst, left, retry_ms, math.ceil(burst * 1000 / limit.rate)),
        )
    if outcome != "ok":
        return PressureReply(outcome)
    crowd, address_count, subnet_count, join_rate = (float(_text(v) or 0) for v in reply[1:5])
    return PressureReply(outcome, crowd, address_count, subnet_count, join_rate)


async def charge(redis: Client, ek: EventKeys, ip: str, *, now: float, limit: Limit) -> Decision:
    """Take one token from ``ip``'s address bucket (scope ``addr``) of the event."""
    allowed, burst, left, retry_ms, reset_ms = await CHARGE(
        redis, [ek.bucket("addr", ip)], [int(now * 1000), limit.rate, limit.burst, 1]
    )
    return Decision(allowed == 1, int(burst), int(left), int(retry_ms), int(reset_ms))


async def leave(redis: Client, ek: EventKeys, fan_id: str) -> str:
    """Take ``fan_id`` out of the line: "left", "not_in_line", "admitted" or "no_room"."""
    keys = [ek.meta, ek.queue, ek.prequeue, ek.fans, ek.seen, ek.admitted, ek.live]
    return _text(await LEAVE(redis, keys, [fan_id])) or ""


def _flag(value: Any) -> bool:
    return bool(value == b"1" or value == "1")


async def positions(
    redis: Client, ek: EventKeys, fan_ids: Sequence[str], *, now: float
) -> Positions | None:
    """Codes of all ``fan_ids`` and the room's state in one call; ``None`` without a room."""
    keys = [ek.meta, ek.queue, ek.prequeue, ek.fans, ek.seen, ek.admitted]
    reply = await POSITIONS(redis, keys, [repr(now), *fan_ids])
    if not reply:
        return None
    room, codes, passes = reply
    mode, opens_at, opened, drawn, paused, sold_out, admitted_total, waiting, commitment = room[:9]
    waitlisted, returned = (room[9], room[10]) if len(room) > 10 else (0, 0)
    return Positions(
        room=RoomView(
            mode=_text(mode) or "fifo",
            opens_at=float(opens_at or 0),
            opened=_flag(opened),
            drawn=_flag(drawn),
            paused=_flag(paused),
            sold_out=_flag(sold_out),
            admitted_total=int(admitted_total or 0),
            waiting=int(waiting),
            commitment=_text(commitment) or None,
            waitlisted=waitlisted == 1,
            returned=int(returned or 0),
        ),
        codes=codes,
        passes=[p.decode() for p in passes],
    )


async def sweep(redis: Client, ek: EventKeys, *, now: float, limit: int) -> tuple[int, bool]:
    """Drop up to ``limit`` abandoned fans; (how many were dropped, whether more are due)."""
    keys = [ek.meta, ek.queue, ek.prequeue, ek.fans, ek.seen, ek.live]
    dropped, more = await SWEEP(redis, keys, [repr(now), limit])
    return int(dropped), more == 1


async def close_line(redis: Client, ek: EventKeys, *, limit: int) -> tuple[int, bool]:
    """In a sold-out room, remove up to ``limit`` waiting fans from the line (and, once it is
    empty, stop counting passes against max_active); (how many left, whether more remain)."""
    keys = [ek.meta, ek.queue, ek.prequeue, ek.fans, ek.seen, ek.live, ek.active]
    removed, more = await CLOSE_LINE(redis, keys, [limit])
    return int(removed), more == 1


async def open_room(
    redis: Client, ek: EventKeys, *, now: float, token: str, lease_ms: int
) -> OpenReply:
    """Mark the room open; for a lottery, hand over the pre-queue and seed to one caller."""
    keys = [ek.meta, ek.prequeue, ek.seed, ek.draw_lease]
    reply = await OPEN_ROOM(redis, keys, [repr(now), token, lease_ms])
    outcome = _text(reply[0]) or ""
    if outcome != "draw":
        return OpenReply(outcome)
    return OpenReply(outcome, _text(reply[1]), tuple(f.decode() for f in reply[2]))


async def draw(
    redis: Client,
    ek: EventKeys,
    placements: Sequence[tuple[int, str]],
    *,
    now: float,
    token: str,
    final: bool,
) -> int:
    """Move pre-queue fans to their drawn ``(place, fan)``; ``final`` marks the room drawn."""
    args: list[str | int] = [repr(now), token, 1 if final else 0]
    for place, fan_id in placements:
        args += [place, fan_id]
    keys = [ek.meta, ek.queue, ek.prequeue, ek.draw_lease]
    return int(await DRAW(redis, keys, args))
