"""PostgreSQL adapter of the inventory actor: load a ledger, take ownership, group-commit a batch.

A batch is persisted in one transaction whose first statement locks the event's row in
``inventory_owners`` and checks the actor's fencing epoch, so a stale owner (one whose lease
lapsed while it was paused, say) can never write: a new owner bumps the epoch under the same
row lock, and from then on every commit of the old one fails with :class:`Fenced`. Rows go in
with COPY or one set-based INSERT, and one set-based UPDATE, never a statement per row, so the
database's statement triggers that keep ``held``/``sold`` fire once per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from inventory.ledger import (
    Changes,
    EventRules,
    Hold,
    Ledger,
    Refused,
    Reserved,
    Restock,
    Result,
    TicketTypeRules,
    decode_result,
    encode_result,
)
from inventory.venue import SeatMap
from waitroom.core.errors import NotFound, WaitroomError

_json = msgspec.json.Encoder()
_seat_map_decoder = msgspec.json.Decoder(SeatMap)

#: A connection, whether taken from a pool or opened directly.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

#: Outbox topics, by the status a hold reached.
TOPIC_BY_STATUS = {
    "held": "hold.created",
    "paid": "order.paid",
    "expired": "hold.expired",
    "cancelled": "hold.cancelled",
}


class Fenced(WaitroomError):
    """This process no longer owns the event: another took over with a newer epoch."""

    status = 503
    default_code = "owner_changed"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def load_rules(conn: Conn, event_id: str) -> EventRules:
    """The inventory rules of ``event_id``; 404 if there is no such event."""
    room = await conn.fetchrow(
        "SELECT per_fan_limit, hold_ttl_s FROM room_settings WHERE event_id = $1", event_id
    )
    if room is None:
        raise NotFound(f"no event {event_id!r}", code="event_not_found")
    rows = await conn.fetch(
        "SELECT name, quantity, per_fan_limit, price_minor, currency FROM ticket_types"
        " WHERE event_id = $1 ORDER BY position",
        event_id,
    )
    return EventRules(
        event_id=event_id,
        per_fan_limit=room["per_fan_limit"],
        hold_ttl_s=room["hold_ttl_s"],
        ticket_types=tuple(
            TicketTypeRules(
                name=r["name"],
                quantity=r["quantity"],
                per_fan_limit=r["per_fan_limit"],
                price_minor=r["price_minor"],
                currency=r["currency"].strip(),
            )
            for r in rows
        ),
    )


def _hold(row: asyncpg.Record) -> Hold:
    return Hold(
        id=str(row["id"]),
        fan_id=row["fan_id"],
        ticket_type=row["ticket_type"],
        quantity=row["quantity"],
        status=row["status"],
        expires_at=row["expires_at"].timestamp(),
        pass_jti=row["pass_jti"],
        payment_ref=row["payment_ref"],
    )


async def load_ledger(conn: Conn, event_id: str) -> Ledger:
    """The ledger of ``event_id`` rebuilt from PostgreSQL: live holds and idempotency keys.

    A successful keyed reserve keeps its key on the hold row (see :func:`commit`); its first
    result is the hold as it was created (status ``held``, no payment), rebuilt here exactly.
    """
    rules = await load_rules(conn, event_id)
    rows = await conn.fetch(
        "SELECT id, fan_id, ticket_type, quantity, status, expires_at, pass_jti, payment_ref,"
        " idempotency_key, request_hash FROM holds"
        " WHERE event_id = $1 AND (status IN ('held', 'paid') OR idempotency_key IS NOT NULL)",
        event_id,
    )
    # Oldest first: past the per-fan cap of kept refusals, the ledger drops the oldest.
    keys = await conn.fetch(
        "SELECT fan_id, key, request_hash, response FROM idempotency_keys WHERE event_id = $1"
        " ORDER BY created_at",
        event_id,
    )
    # Passes whose hold cycle may be over although none of their holds is loaded above
    # (their holds were cancelled or expired): on the holds_released_pass index (schema 7).
    used = await conn.fetch(
        "SELECT DISTINCT fan_id, pass_jti FROM holds WHERE event_id = $1"
        " AND status IN ('expired', 'cancelled') AND pass_jti IS NOT NULL",
        event_id,
    )
    idempotency: dict[tuple[str, str], tuple[bytes, Result]] = {
        (r["fan_id"], r["key"]): (bytes.fromhex(r["request_hash"]), decode_result(r["response"]))
        for r in keys
    }
    seat_map, seats_of = await _load_seats(conn, event_id)
    holds = []
    for row in rows:
        hold = _hold(row)
        seats = seats_of.get(hold.id)
        if seats is not None:
            hold = msgspec.structs.replace(hold, seats=seats)
        holds.append(hold)
        if row["idempotency_key"] is not None:
            created = msgspec.structs.replace(hold, status="held", payment_ref=None)
            idempotency[(hold.fan_id, row["idempotency_key"])] = (
                bytes.fromhex(row["request_hash"]),
                Reserved(created),
            )
    # Tickets refunds gave back (schema 15) and their seats (schema 19): stock, fans' counts
    # and free seats as they are now.
    returns = await conn.fetch(
        "SELECT refund_id, hold_id::text, fan_id, ticket_type, quantity, seats FROM stock_returns"
        " WHERE event_id = $1",
        event_id,
    )
    return Ledger.restore(
        rules,
        holds,
        idempotency,
        used_passes=[(r["fan_id"], r["pass_jti"]) for r in used],
        returns=[
            Restock(
                r["refund_id"],
                r["hold_id"],
                r["fan_id"],
                r["ticket_type"],
                r["quantity"],
                tuple(r["seats"]),
            )
            for r in returns
        ],
        seat_map=seat_map,
    )


async def _load_seats(
    conn: Conn, event_id: str
) -> tuple[SeatMap | None, dict[str, tuple[str, ...]]]:
    """The event's seat map (None without one) and the seats of its holds, by hold id.

    Settled holds' seats too when they carry an idempotency key: a keyed reserve's first
    answer (rebuilt from its hold row) lists its seats, in the order of ``position``
    (schema 17).
    """
    document = await conn.fetchval(
        "SELECT document::text FROM seat_maps WHERE event_id = $1", event_id
    )
    if document is None:
        return None, {}
    # The holds load_ledger loads: live ones, and keyed ones (their first answer).
    rows = await conn.fetch(
        "SELECT s.hold_id::text, array_agg(s.seat_id ORDER BY s.position) AS seats"
        " FROM seat_holds s JOIN holds h ON h.id = s.hold_id WHERE s.event_id = $1"
        " AND (h.status IN ('held', 'paid') OR h.idempotency_key IS NOT NULL)"
        " GROUP BY s.hold_id",
        event_id,
    )
    return _seat_map_decoder.decode(document), {r["hold_id"]: tuple(r["seats"]) for r in rows}


async def take_ownership(pool: asyncpg.Pool[Any], event_id: str, owner: str) -> int:
    """Become the event's owner in PostgreSQL: a new, higher fencing epoch.

    Called once per tenure, only once the caller holds the event's owner lease (a restart of
    the actor within a tenure keeps its epoch): every call fences off whoever owned the event
    before, the caller's own earlier actors included (ADR 0009). The UPDATE waits for the row
    lock any in-flight commit of the previous owner holds, so once this returns, every later
    commit of that owner sees a newer epoch and is refused.
    """
    epoch: int = await pool.fetchval(
        "INSERT INTO inventory_owners (event_id, epoch, owner) VALUES ($1, 1, $2)"
        " ON CONFLICT (event_id) DO UPDATE"
        " SET epoch = inventory_owners.epoch + 1, owner = EXCLUDED.owner, since = now()"
        " RETURNING epoch",
        event_id,
        owner,
    )
    return epoch


def outbox_rows(event_id: str, changes: Changes) -> list[tuple[str, str, str]]:
    """The outbox messages announcing ``changes``: one per topic per batch, listing its holds.

    One message per batch rather than per hold keeps a group commit of thousands of holds to
    a handful of rows; consumers dedupe on the message id and read the ``holds`` list.
    """
    by_topic: dict[str, list[Hold]] = {}
    for hold in changes.new_holds:
        by_topic.setdefault("hold.created", []).append(hold)
        if hold.status != "held":  # created and settled within the same batch
            by_topic.setdefault(TOPIC_BY_STATUS[hold.status], []).append(hold)
    for hold in changes.updated_holds:
        by_topic.setdefault(TOPIC_BY_STATUS[hold.status], []).append(hold)
    return [
        (event_id, topic, _json.encode({"event_id": event_id, "holds": holds}).decode())
        for topic, holds in by_topic.items()
    ]


def _status_code(result: Result) -> int:
    if isinstance(result, Refused):
        return result.status
    return 200


_HOLD_COLUMNS = (
    "id",
    "event_id",
    "ticket_type",
    "fan_id",
    "quantity",
    "status",
    "pass_jti",
    "payment_ref",
    "expires_at",
    "idempotency_key",
    "request_hash",
)
#: What ``inventory_commit()`` raises when the caller's epoch is not the current one.
FENCED_SQLSTATE = "WR001"


async def commit(conn: Conn, event_id: str, epoch: int, changes: Changes) -> None:
    """Persist one batch durably in one transaction, fenced by ``epoch``.

    ``inventory_commit()`` (schema 5) checks the fence first (the event's
    ``inventory_owners`` row is locked and its epoch compared, so a stale owner's batch
    writes nothing, and a takeover, which bumps the epoch under the same lock, waits for a
    batch in flight), then updates settled holds and writes the idempotency records and the
    outbox messages from arrays; the new holds go in after it.
    The round trips matter more than the rows: while this process is busy with HTTP work,
    every reply from PostgreSQL waits for a turn of its event loop. So a batch of holds
    without seats or stock returns (every batch of a general-admission sale) is **one
    statement in one round trip**: ``inventory_commit_json()`` (schema 23) sent outside an
    explicit transaction, which PostgreSQL runs in one implicit transaction. Its rows go as
    one JSON document (one jsonb parameter) that msgspec encodes, not as arrays: asyncpg
    encodes an array element by element, which cost this process, the one serving the
    sale's HTTP requests, ~11 us of CPU per new hold where the document costs a fraction
    (the schema-23 migration describes the document).
    Other batches (and batches of more than :data:`ONE_TRIP_MAX_HOLDS` new holds, where the
    rows matter more than the round trips) take four or more: BEGIN; ``inventory_commit()``;
    the seats and the stock returns; a binary COPY of the new holds; COMMIT. Seated holds
    add an UPDATE of the settled holds' ``seat_holds`` rows (before any new one goes in, so
    a seat freed in the batch may be taken again in it), then a COPY of the new holds'
    seats. The partial unique
    index of schema 13 and the trigger of schema 17 refuse a seat taken twice or not on sale,
    which fails the whole batch (and the actor rebuilds from PostgreSQL).
    Raises :class:`Fenced` when another process owns the event now.
    """
    # A successful keyed reserve is recorded on its new hold row; everything else keyed
    # (refusals, confirms, cancels) gets an idempotency_keys row.
    # A batch's holds share a handful of deadlines and fingerprints: each is converted once.
    hexes: dict[bytes, str] = {}
    on_hold: dict[str, tuple[str, str]] = {}
    # A key comes twice in one batch only when the ledger forgot its refusal (its per-fan
    # cap) and it was used again: the later record wins, as in the ledger (and in the
    # upsert of inventory_commit, which may not touch one row twice in a statement).
    keyed: dict[tuple[str, str], tuple[bytes, Result]] = {}
    for fan, key, fp, result in changes.idempotency:
        if isinstance(result, Reserved):
            digest = hexes.get(fp)
            if digest is None:
                digest = hexes[fp] = fp.hex()
            on_hold[result.hold.id] = (key, digest)
        else:
            keyed.pop((fan, key), None)
            keyed[(fan, key)] = (fp, result)
    keys: list[tuple[str, str, str, int, bytes]] = []
    for (fan, key), (fp, result) in keyed.items():
        digest = hexes.get(fp)
        if digest is None:
            digest = hexes[fp] = fp.hex()
        keys.append((fan, key, digest, _status_code(result), encode_result(result)))
    new_holds = changes.new_holds
    outbox = outbox_rows(event_id, changes)
    settled = changes.updated_holds
    # Seats of settled holds move first, so that a seat freed in this batch can go to a new
    # hold of the same batch without meeting the one-live-hold-per-seat index.
    seats_settled = [h for h in settled if h.seats]
    seat_rows = [
        (h.id, event_id, seat, h.status, position)
        for h in new_holds
        for position, seat in enumerate(h.seats)
    ]
    no_key = (None, None)
    if len(new_holds) <= ONE_TRIP_MAX_HOLDS and not (
        seats_settled or seat_rows or changes.restocks
    ):
        # Microseconds since the epoch, the very instant the COPY path's datetime stands for.
        micros = {
            at: (_ts(at) - _EPOCH) // _MICROSECOND for at in {h.expires_at for h in new_holds}
        }
        # The document of schema 23: rows as arrays, in its columns' order; a response as
        # JSON (it is jsonb in the end), an outbox payload as a string (kept as sent).
        rows = _json.encode(
            {
                "u": [(h.id, h.status, h.payment_ref) for h in settled],
                "k": [(f, k, d, c, msgspec.Raw(r)) for f, k, d, c, r in keys],
                "o": [(topic, payload) for _, topic, payload in outbox],
                "h": [
                    (
                        h.id,
                        h.ticket_type,
                        h.fan_id,
                        h.quantity,
                        h.status,
                        h.pass_jti,
                        h.payment_ref,
                        micros[h.expires_at],
                        *on_hold.get(h.id, no_key),
                    )
                    for h in new_holds
                ],
            }
        )
        with _fenced(event_id, epoch):
            await conn.execute(_COMMIT_JSON, event_id, epoch, rows.decode())
        return
    stamps = {at: _ts(at) for at in {h.expires_at for h in new_holds}}
    holds = [
        (
            h.id,
            event_id,
            h.ticket_type,
            h.fan_id,
            h.quantity,
            h.status,
            h.pass_jti,
            h.payment_ref,
            stamps[h.expires_at],
            *on_hold.get(h.id, no_key),
        )
        for h in new_holds
    ]
    async with conn.transaction():
        with _fenced(event_id, epoch):
            await conn.execute(
                "SELECT inventory_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                event_id,
                epoch,
                [h.id for h in settled],
                [h.status for h in settled],
                [h.payment_ref for h in settled],
                [fan for fan, _, _, _, _ in keys],
                [key for _, key, _, _, _ in keys],
                [digest for _, _, digest, _, _ in keys],
                [status for _, _, _, status, _ in keys],
                [response.decode() for _, _, _, _, response in keys],
                [topic for _, topic, _ in outbox],
                [payload for _, _, payload in outbox],
            )
        if seats_settled:
            await conn.execute(
                "UPDATE seat_holds s SET status = u.status"
                " FROM unnest($1::uuid[], $2::text[]) AS u(id, status) WHERE s.hold_id = u.id",
                [h.id for h in seats_settled],
                [h.status for h in seats_settled],
            )
        if changes.restocks:
            # After inventory_commit: the fence is checked and the owner row locked first.
            # Before the new holds, like the settled seats above: tickets and seats a refund
            # gave back may be taken again in this very batch, and sold must go down before
            # held goes up (no_oversell) and a seat leave the live set before a new hold
            # takes it (the one-live-hold-per-seat index). A returned hold is never new in
            # its batch: a refund needs the hold's tickets, issued once its payment committed.
            await _insert_returns(conn, event_id, changes.restocks)
        if holds:
            await conn.copy_records_to_table("holds", records=holds, columns=_HOLD_COLUMNS)
        if seat_rows:
            await conn.copy_records_to_table(
                "seat_holds",
                records=seat_rows,
                columns=("hold_id", "event_id", "seat_id", "status", "position"),
            )


#: The most new holds a batch may have to go in one statement. Past it the rows cost more
#: than the round trips: an INSERT from the statement's parameters costs PostgreSQL more per
#: row than a binary COPY, and an actor committing batches of a thousand holds did ~15% fewer
#: holds/s that way (``python -m stress reserve``, measured with schema 22's arrays, which
#: PostgreSQL reads no faster than schema 23's JSON document), where at checkout rates (a
#: dozen holds a batch) the one round trip took the commit from 6.4 to 3.8 ms
#: (``python -m stress checkout``).
ONE_TRIP_MAX_HOLDS = 256

#: One group commit of holds without seats or returns, one statement (schema 23): its rows
#: as one JSON document (see :func:`commit`).
_COMMIT_JSON = "SELECT inventory_commit_json($1, $2, $3)"


@contextlib.contextmanager
def _fenced(event_id: str, epoch: int) -> Iterator[None]:
    """Turn ``inventory_commit()``'s fence error into :class:`Fenced`."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == FENCED_SQLSTATE:
            raise Fenced(
                f"inventory of {event_id!r} is owned under a newer epoch than {epoch}",
                details={"event_id": event_id},
            ) from None
        raise


async def _insert_returns(conn: Conn, event_id: str, restocks: list[Restock]) -> None:
    """The batch's stock returns (refunds), one statement: its trigger lowers ``sold`` and
    takes the returned seats' ``seat_holds`` rows out of the live ones (schema 19)."""
    # Each return's seats as a JSON array: a PostgreSQL array of arrays must be rectangular.
    await conn.execute(
        "INSERT INTO stock_returns"
        " (refund_id, event_id, hold_id, ticket_type, fan_id, quantity, seats)"
        " SELECT r, $1, h, t, f, q, ARRAY(SELECT x.seat FROM jsonb_array_elements_text(s::jsonb)"
        "  WITH ORDINALITY AS x(seat, n) ORDER BY x.n)"
        " FROM unnest($2::text[], $3::uuid[], $4::text[], $5::text[], $6::integer[], $7::text[])"
        " AS u(r, h, t, f, q, s)",
        event_id,
        [r.refund_id for r in restocks],
        [r.hold_id for r in restocks],
        [r.ticket_type for r in restocks],
        [r.fan_id for r in restocks],
        [r.quantity for r in restocks],
        [_json.encode(r.seats).decode() for r in restocks],
    )
