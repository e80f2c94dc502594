"""``python -m stress seats`` at a tiny size, and the pieces it measures with.

The benchmark runs as an operator runs it (its own process and fresh database): a 600-seat
arena, 1,500 fans through one inventory actor. Its speed is not judged here: only that the
JSON line is complete and true to the invariants (no seat in two live holds, ticket counts,
holds and seats in agreement, sold out). With ``--viewers``, the sale's changes reach 20
viewers of the live seat map through a real server, and each viewer's map ends as the
sale's ledger does. The generated arena, the adjacency and orphan
rules and the per-commit map diff are checked directly, without a database.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import hypothesis
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inventory import venue
from inventory.ledger import Hold
from stress import seats as bench
from tests.harness import ROOT
from waitroom.core.settings import Settings, settings_env

SEATS = 600
FANS = 1500

KEYS = {
    "benchmark",
    "ok",
    "seats",
    "capacity",
    "fans",
    "fans_asked",
    "fans_turned_away",
    "seats_sold",
    "seats_paid",
    "seats_held",
    "sold_out",
    "double_booked",
    "oversold",
    "ticket_type_mismatches",
    "seat_status_mismatches",
    "acked_missing",
    "ledger_mismatches",
    "holds",
    "holds_per_s",
    "seats_held_per_s",
    "p50_ms",
    "p99_ms",
    "refusals",
    "adjacent_share",
    "multi_seat_best_holds",
    "orphans",
    "free_left",
    "orphans_peak",
    "fan_out",
    "diff_bytes_per_s",
    "diff_encode_us_per_commit",
    "seat_changes_per_s",
    "params",
    "targets",
    "met",
}
FAN_OUT_KEYS = {
    "commits",
    "seat_changes",
    "seat_changes_per_s",
    "diff_encode_us_per_commit",
    "diff_bytes_per_commit",
    "diffs",
    "diffs_per_s",
    "diff_bytes_per_s",
    "indexed_diff_bytes_per_s",
    "full_map_bytes_per_s",
}


def open_seats(seat_map: venue.SeatMap) -> int:
    return sum(
        seat.status == "open"
        for section in seat_map.sections
        if isinstance(section, venue.SeatedSection)
        for row in section.rows
        for seat in row.seats
    )


WS_KEYS = {
    "ok",
    "viewers",
    "connected",
    "publications",
    "messages",
    "messages_per_viewer",
    "messages_missed",
    "publications_missed",
    "viewers_diverged",
    "bytes_per_message",
    "lag_p50_ms",
    "lag_p99_ms",
    "server_cpu_s",
    "server_cpu_s_per_1000_messages",
    "coalesce_ms",
}
WS_HEADLINE = {
    "ws_viewers",
    "ws_messages",
    "ws_viewers_diverged",
    "ws_lag_p50_ms",
    "ws_lag_p99_ms",
    "ws_server_cpu_s_per_1000_messages",
    "ws_bytes_per_message",
}


def run_benchmark(test_settings: Settings, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stress",
            "seats",
            "--json",
            f"--seats={SEATS}",
            f"--fans={FANS}",
            "--askers=64",
            "--map-interval=0.05",
            "--coalesce-ms=50",
            *extra,
        ],
        env=settings_env(test_settings),
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.not_on_cluster
def test_the_seats_benchmark_sells_the_arena_out_without_a_double_booking(
    settings: Settings,
) -> None:
    report = run_benchmark(settings)
    shown = json.dumps(report, indent=1)[:6000]
    assert report["benchmark"] == "seats" and report["ok"] is True, shown
    assert report.keys() >= KEYS and report["fan_out"].keys() >= FAN_OUT_KEYS, shown
    capacity = open_seats(bench.arena(SEATS))
    assert (report["seats"], report["capacity"], report["fans"]) == (SEATS, capacity, FANS), shown
    # The invariants, as PostgreSQL has them after the sale.
    assert report["double_booked"] == report["oversold"] == 0, shown
    assert report["ticket_type_mismatches"] == report["seat_status_mismatches"] == 0, shown
    assert report["acked_missing"] == report["ledger_mismatches"] == 0, shown
    assert report["errors"] == {} and report["met"]["double_booked"] is True, shown
    # 1,500 fans want some 3,500 seats: the arena sells out, and later fans go away.
    assert report["sold_out"] is True and report["seats_sold"] == capacity, shown
    assert report["free_left"] == report["orphans"] == 0, shown
    assert report["seats_sold"] == report["seats_paid"] + report["seats_held"], shown
    assert report["seats_paid"] > 0 and report["seats_held"] > 0, shown
    assert report["fans_asked"] + report["fans_turned_away"] == FANS, shown
    # Collisions of pickers and too-late best-available asks are the only refusals.
    assert set(report["refusals"]) <= {"seats_unavailable", "not_enough_seats"}, shown
    assert report["multi_seat_best_holds"] > 0, shown
    assert 0.8 <= report["adjacent_share"] <= 1.0, shown
    assert report["holds_per_s"] > 0 and 0 < report["p50_ms"] <= report["p99_ms"], shown
    fan_out = report["fan_out"]
    # Every seat sold changed at least once (to held; paid ones also to sold, unless both
    # happened in one commit).
    assert fan_out["seat_changes"] >= report["seats_sold"], shown
    assert fan_out["diffs"] >= 1 and fan_out["diff_bytes_per_s"] > 0, shown
    assert fan_out["indexed_diff_bytes_per_s"] < fan_out["diff_bytes_per_s"], shown
    # No viewers asked for: no server started, no WebSocket figures.
    assert "ws_fan_out" not in report and report["params"]["viewers"] == 0, shown


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.not_on_cluster
def test_the_seats_benchmark_pushes_every_change_of_the_sale_to_every_live_viewer(
    settings: Settings,
) -> None:
    report = run_benchmark(settings, "--viewers=20", "--viewer-timeout=60")
    shown = json.dumps(report, indent=1)[:6000]
    assert report["ok"] is True and report.keys() >= WS_HEADLINE, shown
    ws = report["ws_fan_out"]
    assert ws.keys() >= WS_KEYS and ws["ok"] is True, shown
    assert ws["viewers"] == ws["connected"] == ws["open_at_end"] == 20, shown
    # Every viewer rebuilt the sold-out map from the snapshot and the messages it got.
    assert ws["viewers_diverged"] == ws["messages_missed"] == ws["publications_missed"] == 0, shown
    assert ws["publications"] >= 1 and ws["messages"] >= 20, shown
    assert ws["messages"] == 20 * ws["messages_sent_per_viewer"], shown
    assert ws["bytes_per_message"] > 0 and 0 < ws["lag_p50_ms"] <= ws["lag_p99_ms"], shown
    assert ws["lag_samples"] == 20 * ws["publications"], shown
    assert ws["server_cpu_s"] >= 0 and ws["coalesce_ms"] == 250, shown
    assert report["ws_viewers_diverged"] == 0 and report["ws_messages"] == ws["messages"], shown


@hypothesis.settings(max_examples=25, deadline=None)
@given(st.integers(min_value=bench.MIN_SEATS, max_value=6000))
@hypothesis.example(302)  # a last row of one seat, which the camera platform used to kill (CI)
def test_the_arena_has_exactly_the_seats_asked_and_imports(seats: int) -> None:
    seat_map = bench.arena(seats)
    # What the import checks, without the database: labels, levels, overlaps.
    venue.validate_seat_map(seat_map)
    summary = venue.summarize("e", seat_map)
    assert summary.seats == seats
    assert {level.level for level in summary.levels if level.open} == {"p1", "p2", "p3", "p4"}
    ids, rows = bench.map_rows(seat_map)
    assert len(ids) == len(set(ids)) == seats
    assert all(1 <= len(row.seats) <= 40 for row in rows)
    # A JSON round trip: the document an operator would import.
    assert msgspec.json.decode(venue.encode(seat_map), type=venue.SeatMap) == seat_map


def test_an_arena_too_small_for_four_price_levels_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        bench.arena(bench.MIN_SEATS - 1)


def rows_of(*lengths: int) -> list[bench.MapRow]:
    rows: list[bench.MapRow] = []
    start = 0
    for depth, length in enumerate(lengths):
        rows.append(bench.MapRow(list(range(start, start + length)), "p1", depth))
        start += length
    return rows


def test_an_orphan_is_a_single_free_seat_that_sales_stranded() -> None:
    rows = rows_of(6, 3)
    f, h, s, x = "free", "held", "sold", "killed"
    # Row 1: seat 0 (row end + held), seat 2 (held, sold) are orphans; 4-5 is a pair.
    # Row 2: a free seat between two killed seats was not stranded by sales.
    states = [f, h, f, s, f, f, x, f, x]
    assert bench.count_orphans(states, rows) == 2
    assert bench.count_orphans([f] * 9, rows) == 0


def test_adjacent_means_consecutive_positions_of_one_row() -> None:
    # Seat 2 is killed: seats 1 and 3 have an unsellable seat between them.
    statuses: list[venue.SeatStatus] = ["open", "open", "killed", "open"]
    seat_map = venue.SeatMap(
        sections=[
            venue.SeatedSection(
                id="a",
                rows=[
                    venue.Row(
                        label="1",
                        seats=[
                            venue.Seat(label=str(n), x=n, y=0, level="p1", status=status)
                            for n, status in enumerate(statuses)
                        ],
                    ),
                    venue.Row(label="2", seats=[venue.Seat(label="0", x=0, y=1, level="p1")]),
                ],
            )
        ],
        price_levels=[venue.PriceLevel(id="p1", ticket_type="T")],
    )
    ids, rows = bench.map_rows(seat_map)
    position = {ids[i]: (r, p) for r, row in enumerate(rows) for p, i in enumerate(row.seats)}
    holds = {
        "together": ["a:1:1", "a:1:0"],
        "across_a_killed_seat": ["a:1:1", "a:1:3"],
        "two_rows": ["a:1:0", "a:2:0"],
        "picked": ["a:1:0", "a:2:0"],
        "single": ["a:1:3"],
    }
    acked = {hold: (tuple(seats), "best") for hold, seats in holds.items()}
    acked["picked"] = (tuple(holds["picked"]), "pick")
    figures = bench.adjacency(holds, acked, position)
    # Picks and single seats are not counted; one of three multi-seat holds is together.
    assert figures["multi_seat_best_holds"] == 3 and figures["scattered_holds"] == 2
    assert figures["adjacent_share"] == round(1 / 3, 4)


def test_a_commits_diff_has_each_changed_seats_new_state() -> None:
    def hold(hid: str, status: str, *seats: str) -> Hold:
        return msgspec.convert(
            {
                "id": hid,
                "fan_id": "f",
                "ticket_type": "T",
                "quantity": len(seats),
                "status": status,
                "expires_at": 0.0,
                "pass_jti": None,
                "seats": seats,
            },
            Hold,
        )

    new = [hold("1", "held", "a", "b"), hold("2", "paid", "c"), hold("3", "cancelled", "d")]
    updated = [hold("4", "paid", "e"), hold("5", "expired", "f")]
    assert bench.commit_diff(new, updated) == {"a": "h", "b": "h", "c": "s", "e": "s", "f": "f"}
    index = {seat: i for i, seat in enumerate("abcdef")}
    commits = [(0.0, new, []), (0.01, [], updated), (0.3, [hold("6", "held", "d")], [])]
    figures = bench.fan_out(commits, 0.25, index)
    assert figures["seat_changes"] == 6 and figures["commits_with_seat_changes"] == 3
    # Two intervals of 250 ms: the first coalesces the first two commits.
    assert figures["diffs"] == 2
    assert bench.indexed(0, {"c": "s", "a": "h"}, index) == {"v": 0, "i": [2, 0], "s": "sh"}
