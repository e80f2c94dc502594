"""``python -m stress seats``: an arena's seats sold through one event's inventory actor.

Issue 17's benchmark. A generated arena (``--seats``, default 20,000: sections of rows of 20
to 40 seats around a stage, each section with its priority and focal point, four price
levels mapped to four ticket types by tiers of rows, a camera seat killed in the middle of
every seventh row and a few seats held back) is imported with the project's own import
(:func:`inventory.venue.import_seat_map`), and one :class:`~inventory.actor.InventoryActor`
sells it, fed by ``--askers`` concurrent tasks in this process standing for up to ``--fans``
fans, until it is sold out. Every ask carries an idempotency key, as checkout's do.

Fans look at a map that is ``--map-interval`` old at most (a snapshot of the ledger's seat
states, refreshed in the background, as the picker's map is refreshed by diffs), and either
(``--pick-share``) *pick* 1-4 seats side by side that the map shows free, front rows
favoured, so fans on the same stale map collide as real fans do; or ask for the *best
available* 1-6 seats of a price level (small groups weighted: pairs the most). A fan chooses
a level among those with enough free seats on the map, weighted by their free seats, and
buys fewer seats when no level has as many as it wanted. A refusal it can do something
about (``seats_unavailable``: someone got there first; ``not_enough_seats``) makes it wait
for the next map and try again from it, as best available, up to ``--tries`` asks in all. A share
(``--pay-share``) of the fans who got seats pays at once (a :class:`Confirm`, also keyed).
Fans who arrive once the map shows nothing free go away without asking
(``fans_turned_away``): "until sold out".

Figures:

- ``holds_per_s``: holds acknowledged (committed) per second of the sale, from the first
  ask to the last hold's acknowledgement; ``seats_held_per_s`` the same in seats;
  ``p50_ms``/``p99_ms`` of a reserve ask (submit to durable answer), ``pay_p99_ms`` of a
  confirm; refusals by code.
- From PostgreSQL afterwards: ``seats_sold``, the seats in live ``seat_holds`` rows (held or
  paid; ``seats_paid`` and ``seats_held`` split it), against ``capacity`` (the open seats);
  ``double_booked``, seats in more than one live ``seat_holds`` row (must be 0);
  ``ticket_type_mismatches``, ticket types whose ``held``/``sold`` differ from their live
  seat rows (must be 0); ``acked_missing``, acknowledged holds whose seats PostgreSQL does
  not hold for them (must be 0); ``ledger_mismatches``, seats whose state in the actor's
  ledger differs from PostgreSQL's (must be 0).
- ``adjacent_share``: of the best-available holds of two seats or more, the share whose
  seats are *adjacent*: all in one row, at consecutive positions of the row as the map lists
  it. A killed or held-back seat between two seats breaks adjacency (the fans would not sit
  together: an empty, unsellable seat is between them), as does an aisle (a section
  boundary). Target >= 0.95. Picks are not counted: fans choose them.
- ``orphans``: free seats alone between non-free neighbours of their row (held, sold,
  killed or the row's end), with at least one neighbour held or sold (a single seat that
  sales stranded; a pair buyer cannot use it). Counted at the end (``orphans``, with
  ``free_left``: every seat left free, 0 when sold out) and on the fans' maps during the sale
  (``orphans_peak`` and ``orphans_at_half``, when half the capacity was taken).
- Map update fan-out, the actor-side cost of publishing seat changes, independent of any
  transport: the actor's group commits are recorded (the :class:`Changes` each wrote) and,
  after the sale, replayed: each commit's *diff* (seat id -> new state letter, the letters
  of ``GET /v1/events/{id}/seats``) is built and JSON-encoded (``diff_encode_us_per_commit``,
  ``diff_bytes_per_commit``), then the diffs coalesced every 250 ms (``--coalesce-ms``) as a
  publisher would push them (``diffs_per_s``, ``diff_bytes_per_s``: what every viewer of the
  map receives; ``seat_changes_per_s``), by seat id and by seat index
  (``indexed_diff_bytes_per_s``), against pushing the whole map's states every interval
  (``full_map_bytes_per_s``). The three headline figures are repeated at the top level.
- Map update fan-out over WebSockets, with ``--viewers N`` (0, the default, leaves it out):
  after the sale, the recorded commits that changed seats are replayed at the sale's own pace
  (``--replay-speed``) through the real publish path
  (:func:`waitroom.line.seatnews.publish_seat_changes`) to a real ``waitroom serve`` whose
  N viewers, in ``--viewer-clients`` processes of their own, hold
  ``/v1/events/{id}/seats/live`` open on a fresh copy of the arena
  (:mod:`stress.seatfanout`). ``ws_fan_out`` has the messages each viewer got and in all,
  their bytes, the lag from a publication to its arrival at a viewer (``lag_p50_ms``,
  ``lag_p99_ms``), the server process's CPU per 1,000 messages delivered, and what must be 0:
  ``messages_missed``, ``publications_missed`` and ``viewers_diverged`` (viewers whose map,
  rebuilt from the snapshot and their messages, is not the sale's final ledger). Its headline
  figures are repeated at the top level as ``ws_*``.

The default size runs in some 5 s on the 2-core development machine (the sale itself,
about one: 2,048 askers sell 20,000 seats in some 17 group commits); ``--viewers 2000`` adds
some 10 to 30 s (a server to start, 2,000 sockets to open, nearly 1 GB to push).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from prometheus_client import REGISTRY

from inventory import catalogue, store, venue
from inventory.actor import InventoryActor
from inventory.ledger import (
    NOT_ENOUGH_SEATS,
    SEATS_UNAVAILABLE,
    Changes,
    Confirm,
    Confirmed,
    Hold,
    Refused,
    Reserve,
    Reserved,
    Result,
)
from stress import seatfanout
from stress.common import fresh_database, percentile
from waitroom.core.errors import Unavailable
from waitroom.core.settings import Settings, load_settings
from waitroom.line.seatnews import FREE, HELD, SOLD, STATE_NAMES

TARGET_ADJACENT_SHARE = 0.95
#: Price levels, front tiers first, and the ticket type each sells.
LEVELS = (("p1", "Category 1"), ("p2", "Category 2"), ("p3", "Category 3"), ("p4", "Category 4"))
PRICES = (12000, 8500, 6000, 3500)
#: Seats a fan picks (1-4) and asks best available for (1-6): pairs the most.
PICK_SIZES, PICK_WEIGHTS = (1, 2, 3, 4), (0.20, 0.45, 0.15, 0.20)
BEST_SIZES, BEST_WEIGHTS = (1, 2, 3, 4, 5, 6), (0.15, 0.40, 0.15, 0.20, 0.05, 0.05)
#: Refusals after which a fan tries again from a newer map.
RETRYABLE = frozenset({SEATS_UNAVAILABLE, NOT_ENOUGH_SEATS})
PER_FAN_LIMIT = 6
#: The smallest arena: two sections of five rows, so that every price level has seats.
MIN_SEATS = 200


# --- the arena -----------------------------------------------------------------------------


class MapRow(msgspec.Struct, frozen=True):
    """One row as the benchmark reads it: its seats' indexes in map order, its price level
    and how deep in its section it lies (0 is the front row)."""

    seats: list[int]
    level: str
    depth: int


def arena(seats: int) -> venue.SeatMap:
    """A deterministic arena of ``seats`` seats (the import validates it).

    ``max(2, round(seats / 1000))`` sections around a stage; rows of 20 seats at the front
    widening by two a row to 40; a section's last row takes what is left of its share.
    Price levels by tiers of rows (the front quarter of a section is ``p1``). A section
    facing the stage has priority 0, those further round the bowl 1, 2, ...; off-centre
    sections look at the stage end of their front row (``focal``), the others keep the
    default front-centre. The seat in the middle of every seventh row is killed (a camera
    platform: it splits the row; a row too short to split keeps it), and the four seats at
    the end of the second row of the first section are held back. At least
    :data:`MIN_SEATS` seats (``ValueError``).
    """
    if seats < MIN_SEATS:
        raise ValueError(f"an arena has at least {MIN_SEATS} seats, not {seats}")
    count = max(2, round(seats / 1000))
    sections: list[venue.Section] = []
    for s in range(count):
        share = seats // count + (1 if s < seats % count else 0)
        lengths: list[int] = []
        while sum(lengths) < share:
            lengths.append(min(40, 20 + 2 * len(lengths), share - sum(lengths)))
        offset = s * 1000.0
        rows: list[venue.Row] = []
        for r, length in enumerate(lengths):
            level = LEVELS[min(3, r * 4 // len(lengths))][0]
            row: list[venue.Seat] = []
            for p in range(length):
                status: venue.SeatStatus = "open"
                # Only a seat with seats on both sides: a short last row (one seat, at 302
                # seats) would otherwise lose its only seat, and with it a price level.
                if r % 7 == 6 and 0 < p == length // 2 < length - 1:
                    status = "killed"
                elif s == 0 and r == 1 and p >= length - 4:
                    status = "held_back"
                row.append(
                    venue.Seat(
                        label=str(p + 1),
                        x=offset + (p - length / 2) * 10,
                        y=r * 12.0,
                        level=level,
                        accessible=r == 0 and p in (0, length - 1),
                        status=status,
                    )
                )
            rows.append(venue.Row(label=str(r + 1), seats=row))
        away = s - (count - 1) / 2
        focal = None
        if abs(away) >= 2:  # off-centre: the end of the front row nearer the stage
            focal = venue.Point(x=offset + (-100 if away > 0 else 100), y=0)
        sections.append(
            venue.SeatedSection(
                id=f"s{101 + s}",
                name=f"Section {101 + s}",
                rows=rows,
                focal=focal,
                priority=int(abs(away)) // 2,
            )
        )
    return venue.SeatMap(
        sections=sections,
        price_levels=[
            venue.PriceLevel(id=level, ticket_type=ticket_type, name=ticket_type)
            for level, ticket_type in LEVELS
        ],
    )


def map_rows(seat_map: venue.SeatMap) -> tuple[list[str], list[MapRow]]:
    """Every seat id in map order (the ledger's order) and the rows over their indexes."""
    ids: list[str] = []
    rows: list[MapRow] = []
    for section in seat_map.sections:
        if not isinstance(section, venue.SeatedSection):
            continue
        for depth, row in enumerate(section.rows):
            start = len(ids)
            ids += [venue.seat_id(section.id, row.label, seat.label) for seat in row.seats]
            rows.append(MapRow(list(range(start, len(ids))), row.seats[0].level, depth))
    return ids, rows


_TAKEN = frozenset({"held", "sold"})


def count_orphans(states: Sequence[str], rows: Sequence[MapRow]) -> int:
    """Free seats alone between non-free neighbours (or the row's end), one of them taken."""
    orphans = 0
    for row in rows:
        seats = row.seats
        last = len(seats) - 1
        for p, i in enumerate(seats):
            if states[i] != "free":
                continue
            left = states[seats[p - 1]] if p > 0 else "end"
            right = states[seats[p + 1]] if p < last else "end"
            if "free" not in (left, right) and _TAKEN.intersection((left, right)):
                orphans += 1
    return orphans


class FanMap:
    """What fans see: the seat map's free runs per price level, from one ledger snapshot.

    ``runs[level][k]`` lists the runs of at least ``k`` free seats (1 <= k <= 4: what a fan
    picks), front rows first, as ``(row, start, end)`` positions in the row.
    """

    __slots__ = ("free", "orphans", "runs", "taken", "total_free")

    def __init__(self, states: Sequence[str], rows: Sequence[MapRow]) -> None:
        self.free: dict[str, int] = {level: 0 for level, _ in LEVELS}
        runs: dict[str, list[tuple[int, int, int, int]]] = {level: [] for level, _ in LEVELS}
        for r, row in enumerate(rows):
            start = -1
            for p, i in enumerate(row.seats):
                if states[i] == "free":
                    if start < 0:
                        start = p
                elif start >= 0:
                    runs[row.level].append((row.depth, r, start, p))
                    start = -1
            if start >= 0:
                runs[row.level].append((row.depth, r, start, len(row.seats)))
        self.runs: dict[str, list[list[tuple[int, int, int]]]] = {}
        for level, found in runs.items():
            found.sort()
            self.free[level] = sum(b - a for _, _, a, b in found)
            self.runs[level] = [[(r, a, b) for _, r, a, b in found if b - a >= k] for k in range(5)]
        self.total_free = sum(self.free.values())
        self.taken = sum(1 for s in states if s in _TAKEN)
        self.orphans = count_orphans(states, rows)


# --- fans ----------------------------------------------------------------------------------


def choose(
    rng: random.Random,
    fan_map: FanMap,
    rows: Sequence[MapRow],
    ids: Sequence[str],
    fan: str,
    key: str,
    *,
    pick: bool,
) -> Reserve | None:
    """What one fan asks for on ``fan_map``, or None when the map shows nothing free."""
    if fan_map.total_free == 0:
        return None
    sizes, weights = (PICK_SIZES, PICK_WEIGHTS) if pick else (BEST_SIZES, BEST_WEIGHTS)
    want = rng.choices(sizes, weights)[0]
    levels = [level for level, free in fan_map.free.items() if free >= want]
    if not levels:  # no level has that many left: the fan buys what there is
        want = max(fan_map.free.values())
        levels = [level for level, free in fan_map.free.items() if free >= want]
    level = rng.choices(levels, [fan_map.free[level] for level in levels])[0]
    if pick:
        runs = fan_map.runs[level][want] if want <= 4 else []
        if runs:
            # Front rows first in the list; squaring the draw crowds fans towards them.
            r, a, b = runs[int(len(runs) * rng.random() ** 2)]
            start = rng.randrange(a, b - want + 1)
            seats = tuple(ids[i] for i in rows[r].seats[start : start + want])
            return Reserve(fan, "", want, key, None, seats=seats)
    return Reserve(fan, "", want, key, None, level=level)


class Sale(msgspec.Struct):
    """What the askers saw."""

    latencies: list[float] = []
    pay_latencies: list[float] = []
    #: Acknowledged holds: id -> (seats, "pick" or "best").
    acked: dict[str, tuple[tuple[str, ...], str]] = {}
    refusals: dict[str, int] = {}
    errors: dict[str, int] = {}
    paid: int = 0
    pay_refused: int = 0
    asks: int = 0
    fans_asked: int = 0
    fans_turned_away: int = 0
    fans_without_seats: int = 0
    last_hold_at: float = 0.0


class RecordingActor(InventoryActor):
    """The inventory actor, keeping what each successful group commit wrote (for the map
    update fan-out, replayed after the sale so that it costs the sale nothing)."""

    commits: list[tuple[float, list[Hold], list[Hold]]]

    async def _commit(
        self,
        changes: Changes,
        futures: list[asyncio.Future[Result]],
        results: list[Result],
    ) -> bool:
        done = await super()._commit(changes, futures, results)
        if done:
            self.commits.append((time.perf_counter(), changes.new_holds, changes.updated_holds))
        return done


# --- map update fan-out ----------------------------------------------------------------------

_LETTER = {
    "held": HELD,
    "paid": SOLD,
    "expired": FREE,
    "cancelled": FREE,
}


def commit_diff(new_holds: list[Hold], updated_holds: list[Hold]) -> dict[str, str]:
    """Seat id -> new state letter of every seat one commit changed."""
    diff: dict[str, str] = {}
    for hold in new_holds:
        if hold.seats and hold.status in ("held", "paid"):  # created and ended: no change
            letter = _LETTER[hold.status]
            for seat in hold.seats:
                diff[seat] = letter
    for hold in updated_holds:
        letter = _LETTER[hold.status]
        for seat in hold.seats:
            diff[seat] = letter
    return diff


def indexed(version: int, diff: dict[str, str], index: dict[str, int]) -> dict[str, Any]:
    """A diff by seat index (the order of ``GET /seats``' ids, which a viewer has) and one
    letter per index: the compact alternative to seat ids."""
    return {"v": version, "i": [index[s] for s in diff], "s": "".join(diff.values())}


def fan_out(
    commits: list[tuple[float, list[Hold], list[Hold]]],
    coalesce_s: float,
    index: dict[str, int],
) -> dict[str, Any]:
    """The map update fan-out figures of the recorded commits (see the module docstring).

    Two encodings of a diff are measured: by seat id (``{"v": 7, "seats": {"s101:3:12":
    "h"}}``, self-describing) and by seat index (:func:`indexed`). Rates are per second of
    the span from the first to the last commit that changed seats (at least one interval).
    """
    encode = msgspec.json.Encoder().encode
    timed: list[tuple[float, dict[str, str]]] = []
    encode_s = 0.0
    commit_bytes = 0
    for version, (at, new_holds, updated_holds) in enumerate(commits):
        started = time.perf_counter()
        diff = commit_diff(new_holds, updated_holds)
        if diff:
            commit_bytes += len(encode({"v": version, "seats": diff}))
        encode_s += time.perf_counter() - started
        if diff:
            timed.append((at, diff))
    if not timed:
        return {"commits": len(commits), "commits_with_seat_changes": 0}
    first = timed[0][0]
    span = max(timed[-1][0] - first, coalesce_s)
    windows: dict[int, dict[str, str]] = {}
    for at, diff in timed:
        windows.setdefault(int((at - first) / coalesce_s), {}).update(diff)
    started = time.perf_counter()
    sizes = [len(encode({"v": n, "seats": diff})) for n, diff in sorted(windows.items())]
    coalesced_encode_s = time.perf_counter() - started
    compact = [len(encode(indexed(n, diff, index))) for n, diff in sorted(windows.items())]
    # A publisher free to send, each interval, the smaller of the indexed diff and the
    # whole map's states (one letter a seat) would send this much.
    smaller = [min(size, len(index)) for size in compact]
    changes = sum(len(diff) for _, diff in timed)
    return {
        "commits": len(commits),
        "commits_with_seat_changes": len(timed),
        "seat_changes": changes,
        "seat_changes_per_s": round(changes / span, 1),
        # Per commit that changed seats (the others would publish nothing).
        "diff_encode_us_per_commit": round(encode_s / len(timed) * 1e6, 1),
        "diff_bytes_per_commit": round(commit_bytes / len(timed), 1),
        "coalesce_ms": round(coalesce_s * 1000),
        "diffs": len(sizes),
        "diffs_per_s": round(len(sizes) / span, 2),
        "diff_bytes_per_s": round(sum(sizes) / span, 1),
        "diff_bytes_max": max(sizes),
        "coalesced_encode_us_per_diff": round(coalesced_encode_s / len(sizes) * 1e6, 1),
        "indexed_diff_bytes_per_s": round(sum(compact) / span, 1),
        "indexed_diff_bytes_max": max(compact),
        "smaller_of_diff_or_map_bytes_per_s": round(sum(smaller) / span, 1),
        # The whole map's states as GET /seats sends them (one letter a seat), every
        # interval: what pushing snapshots instead of diffs would cost each viewer.
        "full_map_bytes_per_s": round(len(index) / coalesce_s, 1),
        "span_s": round(span, 3),
    }


# --- PostgreSQL checks ---------------------------------------------------------------------


async def pg_states(
    pool: asyncpg.Pool[Any], event_id: str, index: dict[str, int]
) -> tuple[list[str], dict[str, list[str]]]:
    """Every seat's state as PostgreSQL has it (map order), and each live hold's seats."""
    states = ["free"] * len(index)
    for row in await pool.fetch(
        "SELECT seat_id, status FROM seats WHERE event_id = $1 AND status <> 'open'", event_id
    ):
        states[index[row["seat_id"]]] = "killed"
    holds: dict[str, list[str]] = {}
    for row in await pool.fetch(
        "SELECT hold_id::text AS hold_id, seat_id, status FROM seat_holds"
        " WHERE event_id = $1 AND status IN ('held', 'paid') ORDER BY hold_id, position",
        event_id,
    ):
        states[index[row["seat_id"]]] = "sold" if row["status"] == "paid" else "held"
        holds.setdefault(row["hold_id"], []).append(row["seat_id"])
    return states, holds


async def pg_checks(pool: asyncpg.Pool[Any], event_id: str) -> dict[str, int]:
    """Double booking and the agreement of ticket counts, holds and seats."""
    double_booked = await pool.fetchval(
        "SELECT count(*) FROM (SELECT seat_id FROM seat_holds WHERE event_id = $1"
        " AND status IN ('held', 'paid') GROUP BY seat_id HAVING count(*) > 1) d",
        event_id,
    )
    types = await pool.fetch(
        "SELECT t.name, t.quantity, t.held, t.sold,"
        " (SELECT count(*) FROM seat_holds h JOIN seats s"
        "   ON s.event_id = h.event_id AND s.seat_id = h.seat_id"
        "   WHERE h.event_id = t.event_id AND s.ticket_type = t.name AND h.status = 'held')"
        "   AS seats_held,"
        " (SELECT count(*) FROM seat_holds h JOIN seats s"
        "   ON s.event_id = h.event_id AND s.seat_id = h.seat_id"
        "   WHERE h.event_id = t.event_id AND s.ticket_type = t.name AND h.status = 'paid')"
        "   AS seats_paid"
        " FROM ticket_types t WHERE t.event_id = $1",
        event_id,
    )
    status_mismatches = await pool.fetchval(
        "SELECT count(*) FROM seat_holds s JOIN holds h ON h.id = s.hold_id"
        " WHERE s.event_id = $1 AND s.status <> h.status",
        event_id,
    )
    return {
        "double_booked": int(double_booked),
        "oversold": sum(max(0, t["held"] + t["sold"] - t["quantity"]) for t in types),
        "ticket_type_mismatches": sum(
            1 for t in types if (t["held"], t["sold"]) != (t["seats_held"], t["seats_paid"])
        ),
        "seat_status_mismatches": int(status_mismatches),
        "capacity": sum(t["quantity"] for t in types),
    }


def adjacency(
    holds: dict[str, list[str]],
    acked: dict[str, tuple[tuple[str, ...], str]],
    position: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """The share of multi-seat best-available holds whose seats are adjacent (module doc)."""
    together = 0
    multi = 0
    by_size: dict[int, list[int]] = {}
    for hold_id, (_, kind) in acked.items():
        seats = holds.get(hold_id, [])
        if kind != "best" or len(seats) < 2:
            continue
        places = sorted(position[s] for s in seats)
        adjacent = all(b == (places[0][0], places[0][1] + n) for n, b in enumerate(places))
        multi += 1
        together += adjacent
        counts = by_size.setdefault(len(seats), [0, 0])
        counts[0] += adjacent
        counts[1] += 1
    return {
        "adjacent_share": round(together / multi, 4) if multi else 1.0,
        "multi_seat_best_holds": multi,
        "scattered_holds": multi - together,
        "adjacent_share_by_size": {
            str(size): round(a / n, 4) for size, (a, n) in sorted(by_size.items())
        },
    }


# --- the run -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seats", type=int, default=20_000, help="seats in the arena")
    parser.add_argument("--fans", type=int, default=50_000, help="fans who come to buy")
    parser.add_argument("--askers", type=int, default=2048, help="concurrent askers")
    parser.add_argument("--pick-share", type=float, default=0.3, help="fans who pick seats")
    parser.add_argument("--pay-share", type=float, default=0.5, help="holders who pay at once")
    parser.add_argument("--tries", type=int, default=3, help="asks per fan at most")
    parser.add_argument(
        "--map-interval", type=float, default=0.25, help="seconds between fans' map refreshes"
    )
    parser.add_argument("--coalesce-ms", type=float, default=250.0, help="map diff interval")
    parser.add_argument("--seed", type=int, default=17, help="seed of the fans' choices")
    seatfanout.add_arguments(parser)


async def _event(pool: asyncpg.Pool[Any], seat_map: venue.SeatMap, seats: int) -> str:
    event_id = f"seats-{random.randbytes(3).hex()}"
    spec = catalogue.EventCreate(
        id=event_id,
        name="seats benchmark arena",
        ticket_types=[
            # Quantities above the seats: the import sets each to its open seats.
            catalogue.TicketTypeSpec(name, seats, price, "EUR", PER_FAN_LIMIT)
            for (_, name), price in zip(LEVELS, PRICES, strict=True)
        ],
        # Holds outlive the run: the benchmark measures selling, not expiry.
        room=catalogue.RoomSpec(per_fan_limit=PER_FAN_LIMIT, hold_ttl_s=3600),
    )
    await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
    await venue.import_seat_map(pool, event_id, seat_map, actor="stress")
    return event_id


def _histogram(name: str) -> tuple[float, float]:
    """(sum, count) of one of the actor's histograms, process-wide."""
    return (
        REGISTRY.get_sample_value(f"{name}_sum") or 0.0,
        REGISTRY.get_sample_value(f"{name}_count") or 0.0,
    )


async def _sell(
    actor: RecordingActor,
    args: argparse.Namespace,
    ids: list[str],
    rows: list[MapRow],
    capacity: int,
) -> tuple[Sale, dict[str, float]]:
    """Run the fans through the actor until sold out (or out of fans)."""
    sale = Sale()
    fans = iter(range(args.fans))
    seats_ledger = actor.ledger.seats
    assert seats_ledger is not None
    current = FanMap(seats_ledger.states(), rows)
    watch: dict[str, float] = {"orphans_peak": current.orphans, "orphans_at_half": -1, "maps": 1}
    map_s = 0.0
    done = asyncio.Event()
    fresh = asyncio.Event()  # set (and replaced) when the fans' map is refreshed

    async def refresher() -> None:
        nonlocal current, map_s, fresh
        while not done.is_set():
            await asyncio.sleep(args.map_interval)
            ledger = actor.ledger.seats
            assert ledger is not None
            built = time.perf_counter()
            current = FanMap(ledger.states(), rows)
            map_s += time.perf_counter() - built
            fresh.set()
            fresh = asyncio.Event()
            watch["maps"] += 1
            watch["orphans_peak"] = max(watch["orphans_peak"], current.orphans)
            if watch["orphans_at_half"] < 0 and current.taken * 2 >= capacity:
                watch["orphans_at_half"] = current.orphans

    async def ask(command: Reserve | Confirm) -> Result | None:
        try:
            return await actor.ask(command, timeout=60)
        except Unavailable as exc:
            sale.errors[type(exc).__name__] = sale.errors.get(type(exc).__name__, 0) + 1
            return None

    async def asker(rng: random.Random) -> None:
        for i in fans:
            if current.total_free == 0:
                sale.fans_turned_away += 1
                continue
            sale.fans_asked += 1
            fan = f"fan{i}"
            picking = rng.random() < args.pick_share
            got = False
            for attempt in range(args.tries):
                command = choose(rng, current, rows, ids, fan, f"{fan}-{attempt}", pick=picking)
                if command is None:
                    break
                picking = False  # a fan who tries again asks for the best available
                started = time.perf_counter()
                result = await ask(command)
                sale.latencies.append(time.perf_counter() - started)
                sale.asks += 1
                if isinstance(result, Reserved):
                    got = True
                    hold = result.hold
                    sale.last_hold_at = time.perf_counter()
                    sale.acked[hold.id] = (hold.seats, "pick" if command.seats else "best")
                    if rng.random() < args.pay_share:
                        started = time.perf_counter()
                        paid = await ask(Confirm(hold.id, fan, f"pay-{fan}", f"{fan}-pay"))
                        sale.pay_latencies.append(time.perf_counter() - started)
                        if isinstance(paid, Confirmed):
                            sale.paid += 1
                        else:
                            sale.pay_refused += 1
                    break
                if not isinstance(result, Refused):
                    break
                sale.refusals[result.code] = sale.refusals.get(result.code, 0) + 1
                if result.code not in RETRYABLE or attempt == args.tries - 1:
                    break
                # The map was out of date: the fan looks again once it is refreshed.
                await fresh.wait()
            sale.fans_without_seats += not got

    task = asyncio.create_task(refresher())
    seeds = random.Random(args.seed)
    await asyncio.gather(*(asker(random.Random(seeds.random())) for _ in range(args.askers)))
    done.set()
    await task
    # The fans' maps are built in this process, on the actor's loop: their cost is shown so
    # that it can be told apart from the actor's (a real fan's browser pays it).
    watch["map_build_ms"] = round(map_s / watch["maps"] * 1000, 2)
    return sale, watch


async def _push_to_viewers(
    args: argparse.Namespace,
    settings: Settings,
    dsn: str,
    pool: asyncpg.Pool[Any],
    seat_map: venue.SeatMap,
    actor: RecordingActor,
) -> dict[str, Any]:
    """The sale's commits pushed to viewers of a fresh copy of the arena (stress.seatfanout)."""
    ledger = actor.ledger.seats
    assert ledger is not None
    expected = {
        seat: STATE_NAMES[state]
        for seat, state in zip(ledger.seat_ids(), ledger.states(), strict=True)
    }
    diffs = [
        (at, diff) for at, new, updated in actor.commits if (diff := commit_diff(new, updated))
    ]
    event_id = await _event(pool, seat_map, args.seats)
    return await seatfanout.measure(args, settings, dsn, event_id, diffs, expected)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    seat_map = arena(args.seats)
    ids, rows = map_rows(seat_map)
    index = {seat: i for i, seat in enumerate(ids)}
    position = {ids[i]: (r, p) for r, row in enumerate(rows) for p, i in enumerate(row.seats)}
    async with fresh_database(settings) as dsn:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        try:
            started = time.perf_counter()
            event_id = await _event(pool, seat_map, args.seats)
            import_s = time.perf_counter() - started
            epoch = await store.take_ownership(pool, event_id, "stress")
            async with pool.acquire() as conn:
                ledger = await store.load_ledger(conn, event_id)
            actor = RecordingActor(event_id, pool, epoch, ledger)
            actor.commits = []
            seats_ledger = actor.ledger.seats
            assert seats_ledger is not None and seats_ledger.seat_ids() == ids
            capacity_open = sum(1 for s in seats_ledger.states() if s == "free")
            actor_task = asyncio.create_task(actor.run())
            batches0 = _histogram("waitroom_inventory_batch_size")
            commits0 = _histogram("waitroom_inventory_commit_seconds")
            cpu = time.process_time()
            sale_started = time.perf_counter()
            sale, watch = await _sell(actor, args, ids, rows, capacity_open)
            run_s = time.perf_counter() - sale_started
            cpu_s = time.process_time() - cpu
            batches1 = _histogram("waitroom_inventory_batch_size")
            commits1 = _histogram("waitroom_inventory_commit_seconds")
            actor.close()
            await actor_task
            states, holds = await pg_states(pool, event_id, index)
            checks = await pg_checks(pool, event_id)
            final = actor.ledger.seats
            assert final is not None
            ledger_mismatches = sum(
                1 for a, b in zip(final.states(), states, strict=True) if a != b
            )
            ws: dict[str, Any] | None = None
            if args.viewers > 0:
                ws = await _push_to_viewers(args, settings, dsn, pool, seat_map, actor)
        finally:
            await pool.close()
    acked_missing = sum(
        1 for hold_id, (seats, _) in sale.acked.items() if tuple(holds.get(hold_id, ())) != seats
    )
    sale_s = max(sale.last_hold_at - sale_started, 1e-9)
    seats_held = sum(1 for s in states if s == "held")
    seats_paid = sum(1 for s in states if s == "sold")
    seats_sold = seats_held + seats_paid
    holds_count = len(sale.acked)
    acked_seats = sum(len(seats) for seats, _ in sale.acked.values())
    adjacent = adjacency(holds, sale.acked, position)
    figures = fan_out(actor.commits, args.coalesce_ms / 1000, index)
    batches = batches1[1] - batches0[1]
    commits = commits1[1] - commits0[1]
    errors = sum(sale.errors.values())
    ok = (
        checks["double_booked"] == 0
        and checks["oversold"] == 0
        and checks["ticket_type_mismatches"] == 0
        and checks["seat_status_mismatches"] == 0
        and acked_missing == 0
        and ledger_mismatches == 0
        and errors == 0
        and seats_sold == acked_seats
        and (ws is None or ws["ok"])
    )
    return {
        "benchmark": "seats",
        "ok": ok,
        "seats": len(ids),
        "capacity": checks["capacity"],
        "fans": args.fans,
        "fans_asked": sale.fans_asked,
        "fans_turned_away": sale.fans_turned_away,
        "fans_without_seats": sale.fans_without_seats,
        "seats_sold": seats_sold,
        "seats_paid": seats_paid,
        "seats_held": seats_held,
        "sold_out": seats_sold == checks["capacity"],
        "double_booked": checks["double_booked"],
        "oversold": checks["oversold"],
        "ticket_type_mismatches": checks["ticket_type_mismatches"],
        "seat_status_mismatches": checks["seat_status_mismatches"],
        "acked_missing": acked_missing,
        "ledger_mismatches": ledger_mismatches,
        "holds": holds_count,
        "holds_per_s": round(holds_count / sale_s, 1),
        "seats_held_per_s": round(acked_seats / sale_s, 1),
        "sale_s": round(sale_s, 3),
        "asks": sale.asks,
        "asks_per_s": round(sale.asks / run_s, 1),
        "p50_ms": round(percentile(sale.latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(sale.latencies, 99) * 1000, 2),
        "paid": sale.paid,
        "pay_refused": sale.pay_refused,
        "pay_p99_ms": round(percentile(sale.pay_latencies, 99) * 1000, 2),
        "refusals": dict(sorted(sale.refusals.items())),
        "errors": sale.errors,
        **adjacent,
        "orphans": count_orphans(states, rows),
        "free_left": sum(1 for s in states if s == "free"),
        "orphans_peak": watch["orphans_peak"],
        "orphans_at_half": watch["orphans_at_half"],
        "fan_maps": watch["maps"],
        "fan_map_build_ms": watch["map_build_ms"],
        "diff_bytes_per_s": figures.get("diff_bytes_per_s", 0.0),
        "diff_encode_us_per_commit": figures.get("diff_encode_us_per_commit", 0.0),
        "seat_changes_per_s": figures.get("seat_changes_per_s", 0.0),
        "fan_out": figures,
        "fan_out_note": "actor-side diff building and encoding only; the WebSocket push to"
        " viewers is ws_fan_out (with --viewers N)",
        **(_ws_headline(ws) if ws is not None else {}),
        "actor_batches": int(batches),
        "actor_mean_batch": round((batches1[0] - batches0[0]) / batches, 1) if batches else 0,
        "actor_mean_commit_ms": (
            round((commits1[0] - commits0[0]) / commits * 1000, 2) if commits else 0
        ),
        "cpu_us_per_hold": round(cpu_s / max(holds_count, 1) * 1e6, 1),
        "import_s": round(import_s, 3),
        "targets": {"double_booked": 0, "adjacent_share": TARGET_ADJACENT_SHARE},
        "met": {
            "double_booked": checks["double_booked"] == 0,
            "adjacent_share": adjacent["adjacent_share"] >= TARGET_ADJACENT_SHARE,
        },
        "params": {
            "seats": args.seats,
            "fans": args.fans,
            "askers": args.askers,
            "pick_share": args.pick_share,
            "pay_share": args.pay_share,
            "tries": args.tries,
            "map_interval_s": args.map_interval,
            "coalesce_ms": args.coalesce_ms,
            "seed": args.seed,
            "sections": sum(1 for s in seat_map.sections if isinstance(s, venue.SeatedSection)),
            "rows": len(rows),
            "per_fan_limit": PER_FAN_LIMIT,
            "viewers": args.viewers,
        },
    }


def _ws_headline(ws: dict[str, Any]) -> dict[str, Any]:
    """The WebSocket push's figures, headline ones repeated at the top level."""
    return {
        "ws_viewers": ws["viewers"],
        "ws_messages": ws["messages"],
        "ws_viewers_diverged": ws["viewers_diverged"],
        "ws_lag_p50_ms": ws["lag_p50_ms"],
        "ws_lag_p99_ms": ws["lag_p99_ms"],
        "ws_server_cpu_s_per_1000_messages": ws["server_cpu_s_per_1000_messages"],
        "ws_bytes_per_message": ws["bytes_per_message"],
        "ws_fan_out": ws,
    }
