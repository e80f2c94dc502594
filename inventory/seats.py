"""The seat ledger of one event: pure bookkeeping of which seat is free, held or sold.

Like :mod:`inventory.ledger`, this has no I/O and takes time as an argument: the owner (the
event's inventory actor, once wired) is the only code touching it, so nothing here locks,
and the same commands with the same ``now`` always give the same answers, which is what lets
hypothesis compare it with a naive model (``tests/inventory/test_seats.py``).

States of a seat: ``free``; ``held`` (by one hold); ``sold``; ``killed`` (the map's
``killed`` and ``held_back`` seats: the operator keeps them off sale). Commands:

- :meth:`SeatLedger.hold`: hold these seats (pick-your-seat), all or nothing;
- :meth:`SeatLedger.hold_best`: hold the ``count`` best free seats of a price level;
- :meth:`SeatLedger.release` (cancel: held -> free), :meth:`SeatLedger.confirm`
  (held -> sold), :meth:`SeatLedger.expire` (every hold whose deadline passed -> free);
- :meth:`SeatLedger.return_seats`: some seats of a sold hold back on sale (a refund):
  sold -> free, the hold keeps the rest.

A hold's seats count against the fan's limit (``per_fan_limit`` seats held or sold).
Refusals are values (:class:`SeatRefused`), not exceptions, as in the ledger of holds.

Best available (:meth:`SeatLedger.hold_best`), in order of preference:

1. ``count`` seats side by side in one row that leave no single free seat stranded between
   them and the next taken seat of their run (an *orphan*, which nobody buying in pairs can
   use); then, only when no such place exists, side by side even if one seat is stranded;
   then, when no row has ``count`` adjacent free seats, the fewest pieces: the longest free
   runs first.
2. Among places of the same kind: sections of lower ``priority`` first; within equal
   priorities, the smallest mean distance of the seats from their section's focal point
   (:func:`inventory.venue.focal_point`, by default its front-centre); ties go to the earlier
   section, row and seat of the map.

Bookkeeping for a 20,000-seat arena: each row keeps its maximal runs of free seats per price
level, recomputed only when one of its seats changes (a row is at most 1,000 seats); the
seats' distances are prefix-summed per row once, so a window's mean distance costs O(1);
rows are visited in order of their nearest seat to the focal point, and the search of a
section stops at the first row whose nearest seat is farther than the best window found.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from inventory.venue import SeatedSection, SeatMap, distance, focal_point, seat_id

SeatState = Literal["free", "held", "sold", "killed"]
HoldStatus = Literal["held", "paid", "expired", "cancelled"]

_FREE, _HELD, _SOLD, _KILLED = 0, 1, 2, 3
_STATE_NAMES: tuple[SeatState, ...] = ("free", "held", "sold", "killed")

#: HTTP status of each refusal code.
REFUSAL_STATUS = {
    "unknown_seat": 422,
    "unknown_level": 422,
    "duplicate_seat": 422,
    "bad_count": 422,
    "seat_unavailable": 409,
    "not_enough_seats": 409,
    "fan_limit": 409,
    "unknown_hold": 404,
    "hold_not_held": 409,
    "hold_expired": 410,
    "hold_not_paid": 409,
    "seat_not_in_hold": 422,
}


class SeatHold(msgspec.Struct, frozen=True):
    """A hold of seats: who holds them, which, until when, and how it ended."""

    id: str
    fan_id: str
    seats: tuple[str, ...]
    expires_at: float
    status: HoldStatus = "held"


class SeatRefused(msgspec.Struct, frozen=True):
    """A typed refusal; ``code`` is a key of :data:`REFUSAL_STATUS`."""

    code: str
    message: str
    details: dict[str, Any] = {}

    @property
    def status(self) -> int:
        """The HTTP status this refusal is answered with."""
        return REFUSAL_STATUS[self.code]


class _Row:
    """One row's seats (global indexes, in physical order) and its free runs per level."""

    __slots__ = ("bound", "levels", "maxrun", "prefix", "priority", "runs", "seats")

    def __init__(self, seats: list[int], levels: list[str], dists: list[float], priority: int):
        self.seats = seats
        self.levels = levels
        self.priority = priority
        self.prefix = [0.0]
        for d in dists:
            self.prefix.append(self.prefix[-1] + d)
        #: Per level, the smallest distance of its seats here (a lower bound of any window).
        self.bound: dict[str, float] = {}
        for level, d in zip(levels, dists, strict=True):
            self.bound[level] = min(d, self.bound.get(level, d))
        self.runs: dict[str, list[tuple[int, int]]] = {}
        self.maxrun: dict[str, int] = {}


class SeatLedger:
    """Every seat of an event's map and the holds on them."""

    def __init__(
        self,
        seat_map: SeatMap,
        *,
        per_fan_limit: int | None = None,
        holds: Iterable[SeatHold] = (),
    ) -> None:
        """Build the ledger of ``seat_map`` (validated), with ``holds`` restored from storage
        (their seats held or sold as their status says; ended ones are ignored)."""
        self.per_fan_limit = per_fan_limit
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._state: list[int] = []
        self._level: list[str] = []
        self._row_of: list[int] = []
        self._pos: list[int] = []
        self._holder: dict[int, str] = {}
        self._rows: list[_Row] = []
        self._ticket_type = {level.id: level.ticket_type for level in seat_map.price_levels}
        self._free: dict[str, int] = dict.fromkeys(self._ticket_type, 0)
        # Per level: groups of equal priority, each a list of (section order, rows by bound).
        by_level: dict[str, dict[int, list[list[int]]]] = {}
        for section in seat_map.sections:
            if isinstance(section, SeatedSection):
                self._add_section(section, by_level)
        self._groups: dict[str, list[list[int]]] = {
            level: [self._nearest_first(level, groups[p]) for p in sorted(groups)]
            for level, groups in by_level.items()
        }
        for r in range(len(self._rows)):
            self._rerun(r)
        self._holds: dict[str, SeatHold] = {}
        self._fan_seats: dict[str, int] = {}
        self._deadlines: list[tuple[float, str]] = []
        for hold in holds:
            self._restore(hold)

    def _add_section(
        self, section: SeatedSection, by_level: dict[str, dict[int, list[list[int]]]]
    ) -> None:
        focal = focal_point(section)
        section_rows: dict[str, list[int]] = {}
        for row in section.rows:
            r = len(self._rows)
            seats: list[int] = []
            for pos, seat in enumerate(row.seats):
                i = len(self._ids)
                sid = seat_id(section.id, row.label, seat.label)
                self._ids.append(sid)
                self._index[sid] = i
                self._state.append(_FREE if seat.status == "open" else _KILLED)
                self._level.append(seat.level)
                self._row_of.append(r)
                self._pos.append(pos)
                seats.append(i)
                if seat.status == "open":
                    self._free[seat.level] += 1
            self._rows.append(
                _Row(
                    seats,
                    [seat.level for seat in row.seats],
                    [distance(seat, focal) for seat in row.seats],
                    section.priority,
                )
            )
            for level in {seat.level for seat in row.seats}:
                section_rows.setdefault(level, []).append(r)
        for level, rows in section_rows.items():
            by_level.setdefault(level, {}).setdefault(section.priority, []).append(rows)

    def _nearest_first(self, level: str, sections: list[list[int]]) -> list[int]:
        """The rows of ``sections`` holding ``level``, nearest seat of it first (a stable
        sort: ties keep the map's order)."""
        rows = [r for section_rows in sections for r in section_rows]
        return sorted(rows, key=lambda r: self._rows[r].bound[level])

    def _restore(self, hold: SeatHold) -> None:
        if hold.id in self._holds:
            raise ValueError(f"hold {hold.id!r} appears twice")
        if hold.status not in ("held", "paid"):
            self._holds[hold.id] = hold
            return
        indexes = [self._index[s] for s in hold.seats]
        for i in indexes:
            if self._state[i] != _FREE:
                raise ValueError(f"seat {self._ids[i]!r} is in two live holds")
        self._take(hold, indexes, _HELD if hold.status == "held" else _SOLD)

    # --- reading ----------------------------------------------------------------------------

    def state(self, seat: str) -> SeatState:
        """The state of ``seat`` (``KeyError`` when the map has no such seat)."""
        return _STATE_NAMES[self._state[self._index[seat]]]

    def holder(self, seat: str) -> str | None:
        """The id of the hold that holds or bought ``seat``, if any."""
        return self._holder.get(self._index[seat])

    def hold_of(self, hold_id: str) -> SeatHold | None:
        """The hold ``hold_id`` as it stands, or None."""
        return self._holds.get(hold_id)

    def available(self, level: str) -> int:
        """Free seats of price level ``level``."""
        return self._free.get(level, 0)

    def fan_seats(self, fan_id: str) -> int:
        """Seats ``fan_id`` holds or bought."""
        return self._fan_seats.get(fan_id, 0)

    def ticket_types(self, seats: Iterable[str]) -> dict[str, int]:
        """How many of ``seats`` each ticket type has (what a hold costs in tickets)."""
        counts: dict[str, int] = {}
        for s in seats:
            name = self._ticket_type[self._level[self._index[s]]]
            counts[name] = counts.get(name, 0) + 1
        return counts

    def seat_ids(self) -> list[str]:
        """Every seat of the map, in map order."""
        return list(self._ids)

    def level_of(self, seat: str) -> str | None:
        """The price level of ``seat``, or None when the map has no such seat."""
        i = self._index.get(seat)
        return None if i is None else self._level[i]

    def ticket_type_of_level(self, level: str) -> str | None:
        """The ticket type price level ``level`` sells, or None for an unknown level."""
        return self._ticket_type.get(level)

    def seated_ticket_types(self) -> set[str]:
        """The ticket types sold as seats (by a price level of the map)."""
        return set(self._ticket_type.values())

    def states(self) -> list[SeatState]:
        """Every seat's state, in the order of :meth:`seat_ids`."""
        return [_STATE_NAMES[s] for s in self._state]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a live hold, or None."""
        while self._deadlines and self._holds[self._deadlines[0][1]].status != "held":
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    # --- commands ---------------------------------------------------------------------------

    def hold(
        self, hold_id: str, fan_id: str, seats: Sequence[str], *, expires_at: float
    ) -> SeatHold | SeatRefused:
        """Hold exactly ``seats`` (all of them or none)."""
        if not seats:
            return SeatRefused("bad_count", "ask for at least one seat")
        indexes: list[int] = []
        seen: set[int] = set()
        for s in seats:
            i = self._index.get(s)
            if i is None:
                return SeatRefused("unknown_seat", f"no seat {s!r} in the map", {"seat": s})
            if i in seen:
                return SeatRefused("duplicate_seat", f"seat {s!r} is asked twice", {"seat": s})
            seen.add(i)
            if self._state[i] != _FREE:
                return SeatRefused(
                    "seat_unavailable",
                    f"seat {s!r} is not available",
                    {"seat": s, "state": _STATE_NAMES[self._state[i]]},
                )
            indexes.append(i)
        return self._new_hold(hold_id, fan_id, indexes, expires_at)

    def hold_best(
        self, hold_id: str, fan_id: str, level: str, count: int, *, expires_at: float
    ) -> SeatHold | SeatRefused:
        """Hold the ``count`` best free seats of price level ``level`` (see the module)."""
        if level not in self._ticket_type:
            return SeatRefused(
                "unknown_level", f"no price level {level!r} in the map", {"level": level}
            )
        if count < 1:
            return SeatRefused("bad_count", "ask for at least one seat", {"count": count})
        if self._free[level] < count:
            return SeatRefused(
                "not_enough_seats",
                f"only {self._free[level]} seats of level {level!r} are free",
                {"level": level, "available": self._free[level]},
            )
        refused = self._over_limit(fan_id, count)
        if refused is not None:
            return refused
        indexes = self.best_seats(level, count)
        return self._new_hold(hold_id, fan_id, indexes, expires_at)

    def release(self, hold_id: str) -> SeatHold | SeatRefused:
        """Cancel a held hold: its seats are free again."""
        return self._end(hold_id, "cancelled", None)

    def confirm(self, hold_id: str, *, now: float) -> SeatHold | SeatRefused:
        """Held -> sold, before the hold's deadline (410 ``hold_expired`` after it)."""
        return self._end(hold_id, "paid", now)

    def end(self, hold_id: str, status: HoldStatus) -> SeatHold | SeatRefused:
        """Settle a held hold as ``status`` whatever its deadline: the owner of the seat
        ledger (the event's :class:`~inventory.ledger.Ledger`) decides when a hold is due,
        and settles its seats with it."""
        hold = self._holds.get(hold_id)
        if hold is None:
            return SeatRefused("unknown_hold", f"no hold {hold_id!r}", {"hold_id": hold_id})
        if hold.status != "held":
            return SeatRefused(
                "hold_not_held",
                f"the hold is {hold.status}",
                {"hold_id": hold_id, "status": hold.status},
            )
        return self._settle(hold, status)

    def expire(self, now: float) -> list[SeatHold]:
        """End every held hold whose deadline is ``<= now``; their seats are free again."""
        expired: list[SeatHold] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, hold_id = heapq.heappop(self._deadlines)
            if self._holds[hold_id].status == "held":
                expired.append(self._settle(self._holds[hold_id], "expired"))
        return expired

    def return_seats(self, hold_id: str, seats: Sequence[str]) -> SeatHold | SeatRefused:
        """Put ``seats`` of the sold hold ``hold_id`` back on sale (a refund): all or none.

        Each seat goes sold -> free, with everything a cancel would undo for it (its row's
        free runs, its level's free count, the fan's seats); the hold stays ``paid`` with the
        seats it still has, in their order (a hold left with none is still known here).
        """
        hold = self._holds.get(hold_id)
        if hold is None:
            return SeatRefused("unknown_hold", f"no hold {hold_id!r}", {"hold_id": hold_id})
        if hold.status != "paid":
            return SeatRefused(
                "hold_not_paid",
                f"the hold is {hold.status}: only sold seats are returned",
                {"hold_id": hold_id, "status": hold.status},
            )
        if len(set(seats)) != len(seats):
            return SeatRefused("duplicate_seat", "a seat is named twice", {"seats": list(seats)})
        outside = [s for s in seats if s not in hold.seats]
        if outside:
            return SeatRefused(
                "seat_not_in_hold",
                f"not seats of hold {hold_id!r}: {', '.join(outside)}",
                {"hold_id": hold_id, "seats": outside},
            )
        indexes = [self._index[s] for s in seats]
        for i in indexes:
            self._state[i] = _FREE
            del self._holder[i]
            self._free[self._level[i]] += 1
        for r in {self._row_of[i] for i in indexes}:
            self._rerun(r)
        self._fan_seats[hold.fan_id] -= len(indexes)
        given = set(seats)
        kept = msgspec.structs.replace(hold, seats=tuple(s for s in hold.seats if s not in given))
        self._holds[hold_id] = kept
        return kept

    # --- best available -----------------------------------------------------------------------

    def best_seats(self, level: str, count: int) -> list[int]:
        """The seats :meth:`hold_best` would take (indexes; ``count`` <= free seats)."""
        for allow_orphan in (False, True):
            window = self._best_window(level, count, allow_orphan)
            if window is not None:
                r, start = window
                return self._rows[r].seats[start : start + count]
        return self._scattered(level, count)

    def _best_window(self, level: str, n: int, allow_orphan: bool) -> tuple[int, int] | None:
        rows = self._rows
        for group in self._groups.get(level, ()):
            best: tuple[int, int] | None = None
            best_cost = float("inf")
            for r in group:
                row = rows[r]
                if row.bound[level] >= best_cost:
                    break  # rows come nearest first: no later row can do better
                if row.maxrun.get(level, 0) < n:
                    continue
                prefix = row.prefix
                for a, b in row.runs[level]:
                    length = b - a
                    if length < n or (not allow_orphan and length == n + 1):
                        continue
                    for s in range(a, b - n + 1):
                        if not allow_orphan and (s - a == 1 or b - s - n == 1):
                            continue
                        cost = (prefix[s + n] - prefix[s]) / n
                        if cost < best_cost:
                            best, best_cost = (r, s), cost
            if best is not None:
                return best
        return None

    def _scattered(self, level: str, n: int) -> list[int]:
        """No row has ``n`` adjacent free seats: the fewest pieces, longest runs first."""
        runs: list[tuple[int, int, float, int, int]] = []
        for group_no, group in enumerate(self._groups.get(level, ())):
            for r in group:
                for a, b in self._rows[r].runs.get(level, ()):
                    runs.append((-(b - a), group_no, self._rows[r].bound[level], r, a))
        runs.sort()
        taken: list[int] = []
        for negative_length, _, _, r, a in runs:
            k = min(n - len(taken), -negative_length)
            taken.extend(self._rows[r].seats[a : a + k])
            if len(taken) == n:
                break
        return taken

    def _rerun(self, r: int) -> None:
        """Recompute row ``r``'s maximal runs of free seats of one level."""
        row = self._rows[r]
        runs: dict[str, list[tuple[int, int]]] = {}
        state = self._state
        seats = row.seats
        levels = row.levels
        start = -1
        for pos in range(len(seats) + 1):
            if start >= 0 and (
                pos == len(seats) or state[seats[pos]] != _FREE or levels[pos] != levels[start]
            ):
                runs.setdefault(levels[start], []).append((start, pos))
                start = -1
            if start < 0 and pos < len(seats) and state[seats[pos]] == _FREE:
                start = pos
        row.runs = runs
        row.maxrun = {level: max(b - a for a, b in spans) for level, spans in runs.items()}

    # --- changes --------------------------------------------------------------------------------

    def _over_limit(self, fan_id: str, count: int) -> SeatRefused | None:
        if self.per_fan_limit is None:
            return None
        have = self._fan_seats.get(fan_id, 0)
        if have + count > self.per_fan_limit:
            return SeatRefused(
                "fan_limit",
                f"at most {self.per_fan_limit} seats per fan; you have {have}",
                {"limit": self.per_fan_limit, "have": have},
            )
        return None

    def _new_hold(
        self, hold_id: str, fan_id: str, indexes: list[int], expires_at: float
    ) -> SeatHold | SeatRefused:
        if hold_id in self._holds:
            raise ValueError(f"hold id {hold_id!r} is in use")
        refused = self._over_limit(fan_id, len(indexes))
        if refused is not None:
            return refused
        hold = SeatHold(hold_id, fan_id, tuple(self._ids[i] for i in indexes), expires_at)
        self._take(hold, indexes, _HELD)
        heapq.heappush(self._deadlines, (expires_at, hold_id))
        return hold

    def _take(self, hold: SeatHold, indexes: list[int], state: int) -> None:
        for i in indexes:
            self._state[i] = state
            self._holder[i] = hold.id
            self._free[self._level[i]] -= 1
        for r in {self._row_of[i] for i in indexes}:
            self._rerun(r)
        self._holds[hold.id] = hold
        self._fan_seats[hold.fan_id] = self._fan_seats.get(hold.fan_id, 0) + len(indexes)

    def _end(self, hold_id: str, status: HoldStatus, now: float | None) -> SeatHold | SeatRefused:
        hold = self._holds.get(hold_id)
        if hold is None:
            return SeatRefused("unknown_hold", f"no hold {hold_id!r}", {"hold_id": hold_id})
        if hold.status == "held" and now is not None and now >= hold.expires_at:
            self._settle(hold, "expired")
            return SeatRefused("hold_expired", "the hold has expired", {"hold_id": hold_id})
        if hold.status != "held":
            code = "hold_expired" if hold.status == "expired" else "hold_not_held"
            return SeatRefused(
                code, f"the hold is {hold.status}", {"hold_id": hold_id, "status": hold.status}
            )
        return self._settle(hold, status)

    def _settle(self, hold: SeatHold, status: HoldStatus) -> SeatHold:
        indexes = [self._index[s] for s in hold.seats]
        if status == "paid":
            for i in indexes:
                self._state[i] = _SOLD
        else:
            for i in indexes:
                self._state[i] = _FREE
                del self._holder[i]
                self._free[self._level[i]] += 1
            for r in {self._row_of[i] for i in indexes}:
                self._rerun(r)
            self._fan_seats[hold.fan_id] -= len(indexes)
        settled = msgspec.structs.replace(hold, status=status)
        self._holds[hold.id] = settled
        return settled

    def position(self, seat: str) -> tuple[int, int]:
        """(row number in the ledger, position in the row) of ``seat``: adjacency is
        consecutive positions in one row."""
        i = self._index[seat]
        return self._row_of[i], self._pos[i]
