"""The pure seat ledger: examples, then hypothesis against a naive model of the seats."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from hypothesis import event, given, settings
from hypothesis import strategies as st

from inventory.seats import SeatHold, SeatLedger, SeatRefused
from inventory.venue import (
    Point,
    PriceLevel,
    Row,
    Seat,
    SeatedSection,
    SeatMap,
    distance,
    focal_point,
    seat_id,
    validate_seat_map,
)

LEVELS = ("a", "b")
FANS = ("f1", "f2", "f3")


def one_row(statuses: str, *, level: str = "a") -> SeatMap:
    """One section of one row 'A'; ``statuses`` has one letter per seat: o(pen), k(illed)."""
    seats = [
        Seat(
            label=str(k + 1),
            x=k * 10.0,
            y=0.0,
            level=level,
            status="killed" if c == "k" else "open",
        )
        for k, c in enumerate(statuses)
    ]
    return SeatMap(
        sections=[SeatedSection(id="s", rows=[Row(label="A", seats=seats)])],
        price_levels=[PriceLevel(id=level, ticket_type="T")],
    )


def labels(hold: SeatHold | SeatRefused) -> list[str]:
    assert isinstance(hold, SeatHold), hold
    return [s.rsplit(":", 1)[1] for s in hold.seats]


def test_best_available_takes_adjacent_seats_at_the_front_centre() -> None:
    rows = [
        Row(
            label=r,
            seats=[Seat(label=str(k), x=k * 10.0, y=i * 10.0, level="a") for k in range(1, 10)],
        )
        for i, r in enumerate("ABC")
    ]
    seat_map = SeatMap(
        sections=[SeatedSection(id="s", rows=rows)], price_levels=[PriceLevel("a", "T")]
    )
    ledger = SeatLedger(seat_map)
    hold = ledger.hold_best("h1", "f1", "a", 3, expires_at=100)
    assert isinstance(hold, SeatHold)
    assert hold.seats == ("s:A:4", "s:A:5", "s:A:6")


def test_best_available_leaves_no_single_orphan_when_it_can() -> None:
    # Free run 1..5 nearest the focal point at seat 1: taking 1-2 or 4-5 leaves three or
    # one... 2-3 would strand seat 1, so the ledger takes 1-2 (leaving 3 seats together).
    ledger = SeatLedger(one_row("ooooo"))
    hold = ledger.hold_best("h1", "f1", "a", 2, expires_at=100)
    assert labels(hold) in (["1", "2"], ["4", "5"])
    # A run of exactly three: any pair strands one seat; the other run of two is used.
    ledger = SeatLedger(one_row("ooo" + "k" + "oo"))
    assert labels(ledger.hold_best("h1", "f1", "a", 2, expires_at=100)) == ["5", "6"]


def test_best_available_splits_a_group_only_when_no_row_seats_it_together() -> None:
    ledger = SeatLedger(one_row("ookooko"))
    hold = ledger.hold_best("h1", "f1", "a", 4, expires_at=100)
    assert sorted(labels(hold)) == ["1", "2", "4", "5"]
    assert isinstance(ledger.hold_best("h2", "f1", "a", 2, expires_at=100), SeatRefused)


def test_killed_seats_are_never_held_and_picks_are_all_or_nothing() -> None:
    ledger = SeatLedger(one_row("okoo"))
    refused = ledger.hold("h1", "f1", ["s:A:1", "s:A:2"], expires_at=100)
    assert isinstance(refused, SeatRefused)
    assert (refused.code, refused.status, refused.details["seat"]) == (
        "seat_unavailable",
        409,
        "s:A:2",
    )
    assert ledger.state("s:A:1") == "free"
    assert ledger.available("a") == 3


def test_a_hold_is_released_confirmed_or_expired_and_limits_count_seats() -> None:
    ledger = SeatLedger(one_row("oooooo"), per_fan_limit=3)
    assert isinstance(ledger.hold("h1", "f1", ["s:A:1", "s:A:2"], expires_at=10), SeatHold)
    refused = ledger.hold_best("h2", "f1", "a", 2, expires_at=10)
    assert isinstance(refused, SeatRefused) and refused.code == "fan_limit"
    released = ledger.release("h1")
    assert isinstance(released, SeatHold) and released.status == "cancelled"
    assert released.seats == ("s:A:1", "s:A:2")
    assert ledger.fan_seats("f1") == 0
    hold = ledger.hold_best("h3", "f1", "a", 3, expires_at=10)
    assert isinstance(ledger.confirm("h3", now=5), SeatHold)
    assert isinstance(hold, SeatHold)
    assert {ledger.state(s) for s in hold.seats} == {"sold"}
    free = next(s for s in ledger.seat_ids() if ledger.state(s) == "free")
    assert isinstance(ledger.hold("h4", "f2", [free], expires_at=10), SeatHold)
    assert [h.id for h in ledger.expire(now=10)] == ["h4"]
    assert ledger.state(free) == "free"
    late = ledger.confirm("h4", now=11)
    assert isinstance(late, SeatRefused) and late.status == 410


def test_a_ledger_restored_from_its_holds_is_the_same() -> None:
    seat_map = one_row("oooo")
    ledger = SeatLedger(seat_map)
    ledger.hold("h1", "f1", ["s:A:1"], expires_at=10)
    ledger.hold("h2", "f2", ["s:A:3", "s:A:4"], expires_at=10)
    ledger.confirm("h2", now=1)
    holds = [h for h in (ledger.hold_of("h1"), ledger.hold_of("h2")) if h is not None]
    restored = SeatLedger(seat_map, holds=holds)
    assert [restored.state(s) for s in restored.seat_ids()] == ["held", "free", "sold", "sold"]


# --- hypothesis against a naive model --------------------------------------------------------


@st.composite
def seat_maps(draw: st.DrawFn) -> SeatMap:
    """Small valid maps: 1-3 sections of 1-4 rows of 1-8 seats, two levels, some killed."""
    sections = []
    for s in range(draw(st.integers(1, 3))):
        rows = []
        for r in range(draw(st.integers(1, 4))):
            seats = [
                Seat(
                    label=str(k + 1),
                    x=s * 1000 + k * 10.0 + draw(st.sampled_from((0.0, 3.0))),
                    y=r * 10.0,
                    level=draw(st.sampled_from(LEVELS)),
                    status=draw(st.sampled_from(("open",) * 6 + ("killed", "held_back"))),
                )
                for k in range(draw(st.integers(1, 8)))
            ]
            rows.append(Row(label=f"R{r}", seats=seats))
        focal = draw(st.none() | st.builds(lambda x, y: (x, y), st.integers(-50, 80), st.just(-5)))
        section = SeatedSection(id=f"s{s}", rows=rows, priority=draw(st.integers(0, 1)))
        if focal is not None:
            section = SeatedSection(
                id=section.id,
                rows=rows,
                priority=section.priority,
                focal=Point(x=s * 1000 + focal[0], y=focal[1]),
            )
        sections.append(section)
    seat_map = SeatMap(
        sections=list(sections), price_levels=[PriceLevel("a", "TA"), PriceLevel("b", "TB")]
    )
    validate_seat_map(seat_map)
    return seat_map


@dataclass
class Model:
    """The naive truth: a state per seat, scanned in full for every question."""

    seat_map: SeatMap
    state: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    holds: dict[str, tuple[str, list[str], float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for section, row, seat in self.seats():
            sid = seat_id(section.id, row.label, seat.label)
            self.state[sid] = "free" if seat.status == "open" else "killed"

    def seats(self) -> list[tuple[SeatedSection, Row, Seat]]:
        return [
            (section, row, seat)
            for section in self.seat_map.sections
            if isinstance(section, SeatedSection)
            for row in section.rows
            for seat in row.seats
        ]

    def runs(self, level: str) -> list[tuple[SeatedSection, Row, int, int]]:
        """Maximal runs [a, b) of free seats of ``level`` in each row."""
        found = []
        for section in self.seat_map.sections:
            assert isinstance(section, SeatedSection)
            for row in section.rows:
                ok = [
                    s.level == level
                    and self.state[seat_id(section.id, row.label, s.label)] == "free"
                    for s in row.seats
                ]
                for key, group in itertools.groupby(enumerate(ok), key=lambda p: p[1]):
                    spans = [p[0] for p in group]
                    if key:
                        found.append((section, row, spans[0], spans[-1] + 1))
        return found

    def free(self, level: str) -> int:
        return sum(b - a for _, _, a, b in self.runs(level))

    def fan_seats(self, fan: str) -> int:
        return sum(
            len(seats)
            for hold_id, (owner, seats, _) in self.holds.items()
            if owner == fan and all(self.holder.get(s) == hold_id for s in seats)
        )

    def best_key(self, level: str, n: int) -> tuple[bool, int, float] | None:
        """The best (orphan?, priority, mean distance) of any n adjacent free seats."""
        keys = []
        for section, row, a, b in self.runs(level):
            focal = focal_point(section)
            for s in range(a, b - n + 1):
                orphan = s - a == 1 or b - s - n == 1
                cost = sum(distance(seat, focal) for seat in row.seats[s : s + n]) / n
                keys.append((orphan, section.priority, cost))
        return min(keys) if keys else None

    def key_of(self, seats: tuple[str, ...], level: str) -> tuple[bool, int, float] | None:
        """The key of ``seats`` if they are adjacent in one row (judged before the hold)."""
        for section, row, a, b in self.runs(level):
            ids = [seat_id(section.id, row.label, s.label) for s in row.seats]
            if seats[0] in ids[a:b]:
                s = ids.index(seats[0])
                if tuple(ids[s : s + len(seats)]) != seats or s + len(seats) > b:
                    return None
                focal = focal_point(section)
                cost = sum(distance(seat, focal) for seat in row.seats[s : s + len(seats)])
                return (
                    s - a == 1 or b - s - len(seats) == 1,
                    section.priority,
                    cost / len(seats),
                )
        return None


step = st.one_of(
    st.tuples(st.just("pick"), st.lists(st.integers(0, 40), min_size=1, max_size=4)),
    st.tuples(st.just("best"), st.sampled_from(LEVELS), st.integers(1, 5)),
    st.tuples(st.just("release"), st.integers(0, 12)),
    st.tuples(st.just("confirm"), st.integers(0, 12)),
    st.tuples(st.just("expire"), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None)
@given(
    seat_map=seat_maps(),
    steps=st.lists(st.tuples(st.sampled_from(FANS), step), max_size=40),
    limit=st.none() | st.integers(2, 8),
)
def test_the_seat_ledger_agrees_with_a_naive_model(
    seat_map: SeatMap, steps: list[tuple[str, tuple[object, ...]]], limit: int | None
) -> None:
    ledger = SeatLedger(seat_map, per_fan_limit=limit)
    model = Model(seat_map)
    all_seats = list(model.state)
    killed = {s for s, state in model.state.items() if state == "killed"}
    level_of = {seat_id(c.id, r.label, s.label): s.level for c, r, s in model.seats()}
    now = 0.0
    made = 0
    for fan, (kind, *args) in steps:
        if kind == "pick":
            (indexes,) = args
            assert isinstance(indexes, list)
            wanted = [all_seats[i % len(all_seats)] for i in indexes]
            result = ledger.hold(f"h{made}", fan, wanted, expires_at=now + 2)
            fits = len(set(wanted)) == len(wanted) and all(model.state[s] == "free" for s in wanted)
            within = limit is None or model.fan_seats(fan) + len(wanted) <= limit
            assert isinstance(result, SeatHold) == (fits and within), (wanted, result)
        elif kind == "best":
            level, count = args
            assert isinstance(level, str) and isinstance(count, int)
            best = model.best_key(level, count)
            enough = model.free(level) >= count
            within = limit is None or model.fan_seats(fan) + count <= limit
            result = ledger.hold_best(f"h{made}", fan, level, count, expires_at=now + 2)
            assert isinstance(result, SeatHold) == (enough and within), result
            if isinstance(result, SeatHold):
                assert len(result.seats) == len(set(result.seats)) == count
                assert all(level_of[s] == level for s in result.seats)
                assert all(model.state[s] == "free" for s in result.seats)
                assert ledger.ticket_types(result.seats) == {f"T{level.upper()}": count}
                key = model.key_of(result.seats, level)
                event(
                    f"best-available: {'split' if best is None else 'orphan' if best[0] else 'adjacent'}"
                )
                if best is not None:
                    # Some row had `count` adjacent free seats: the hold is adjacent, never
                    # strands a seat when a place without an orphan existed, and is as
                    # near the focal point as the best such place.
                    assert key is not None, (result.seats, best)
                    assert key[:2] == best[:2]
                    assert math.isclose(key[2], best[2], rel_tol=1e-9, abs_tol=1e-9)
        elif kind in ("release", "confirm"):
            (n,) = args
            assert isinstance(n, int)
            hold_id = f"h{n}"
            live = hold_id in model.holds and all(
                model.holder.get(s) == hold_id and model.state[s] == "held"
                for s in model.holds[hold_id][1]
            )
            if kind == "release":
                result = ledger.release(hold_id)
                assert isinstance(result, SeatHold) == live
                if isinstance(result, SeatHold):
                    # Exactly the released seats come back.
                    assert list(result.seats) == model.holds[hold_id][1]
                    for s in result.seats:
                        model.state[s] = "free"
                        del model.holder[s]
            else:
                result = ledger.confirm(hold_id, now=now)
                in_time = live and now < model.holds[hold_id][2]
                assert isinstance(result, SeatHold) == in_time
                for s in model.holds[hold_id][1] if live else ():
                    if in_time:
                        model.state[s] = "sold"
                    else:
                        model.state[s] = "free"
                        del model.holder[s]
            check(ledger, model, killed, limit)
            continue
        else:
            (wait,) = args
            assert isinstance(wait, int)
            now += wait
            expired = ledger.expire(now)
            due = sorted(
                hold_id
                for hold_id, (_, seats, deadline) in model.holds.items()
                if deadline <= now
                and all(model.state[s] == "held" for s in seats)
                and all(model.holder.get(s) == hold_id for s in seats)
            )
            assert sorted(h.id for h in expired) == due
            for hold in expired:
                for s in hold.seats:
                    model.state[s] = "free"
                    del model.holder[s]
            check(ledger, model, killed, limit)
            continue
        if isinstance(result, SeatHold):
            model.holds[result.id] = (fan, list(result.seats), result.expires_at)
            for s in result.seats:
                model.state[s] = "held"
                model.holder[s] = result.id
            made += 1
        check(ledger, model, killed, limit)


def check(ledger: SeatLedger, model: Model, killed: set[str], limit: int | None) -> None:
    """The same world on both sides; no seat in two live holds; killed seats stay killed."""
    assert {s: ledger.state(s) for s in model.state} == model.state
    assert all(ledger.holder(s) == model.holder.get(s) for s in model.state)
    assert all(model.state[s] == "killed" for s in killed)
    taken: list[str] = []
    for hold_id in model.holds:
        hold = ledger.hold_of(hold_id)
        if hold is not None and hold.status in ("held", "paid"):
            taken.extend(hold.seats)
    assert len(taken) == len(set(taken))
    assert not killed & set(taken)
    for level in LEVELS:
        assert ledger.available(level) == model.free(level)
    for fan in FANS:
        assert ledger.fan_seats(fan) == model.fan_seats(fan)
        assert limit is None or ledger.fan_seats(fan) <= limit


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet="ook", min_size=1, max_size=24), count=st.integers(1, 4))
def test_best_available_strands_a_single_seat_only_when_every_place_would(
    pattern: str, count: int
) -> None:
    seat_map = one_row(pattern)
    model = Model(seat_map)
    best = model.best_key("a", count)
    result = SeatLedger(seat_map).hold_best("h1", "f1", "a", count, expires_at=10)
    if best is None:
        assert isinstance(result, SeatRefused) or len(result.seats) == count
        return
    event(f"stranding one seat: {'unavoidable' if best[0] else 'avoidable'}")
    assert isinstance(result, SeatHold)
    key = model.key_of(result.seats, "a")
    assert key is not None and key[0] == best[0]
    assert math.isclose(key[2], best[2], rel_tol=1e-9, abs_tol=1e-9)
