"""Seat maps through the admin API, the real console script and PostgreSQL's last defence."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from inventory.venue import MAX_BODY_BYTES
from tests.harness import ServerThread, run_cli
from tests.test_errors import assert_error
from waitroom.core.settings import Settings

JSON = {"Content-Type": "application/json"}


def make_event(admin: httpx.Client, *, stalls: int = 100) -> str:
    event_id = f"venue-{uuid.uuid4().hex[:10]}"
    created = admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "Seated test",
            "ticket_types": [
                {"name": "Stalls", "quantity": stalls, "price_minor": 5000, "currency": "EUR"},
                {"name": "Balcony", "quantity": 100, "price_minor": 3000, "currency": "EUR"},
                {"name": "Standing", "quantity": 500, "price_minor": 2000, "currency": "EUR"},
            ],
        },
    )
    assert created.status_code == 201, created.text
    return event_id


def seat_map(rows: int = 2, seats: int = 4) -> dict[str, Any]:
    return {
        "format": 1,
        "price_levels": [
            {"id": "stalls", "ticket_type": "Stalls", "name": "Stalls"},
            {"id": "balcony", "ticket_type": "Balcony"},
        ],
        "sections": [
            {
                "kind": "seated",
                "id": "main",
                "name": "Main floor",
                "rows": [
                    {
                        "label": chr(ord("A") + r) if r < 26 else f"R{r}",
                        "seats": [
                            {
                                "label": str(k + 1),
                                "x": k * 10.0,
                                "y": r * 10.0,
                                "level": "stalls" if r < rows - 1 else "balcony",
                                **({"accessible": True} if k == 0 else {}),
                                **({"status": "killed"} if (r, k) == (0, seats - 1) else {}),
                            }
                            for k in range(seats)
                        ],
                    }
                    for r in range(rows)
                ],
            },
            {"kind": "general_admission", "id": "pit", "ticket_type": "Standing", "capacity": 400},
        ],
    }


def test_an_operator_imports_and_exports_a_mixed_seat_map(admin: httpx.Client) -> None:
    event_id = make_event(admin)
    body = seat_map()
    put = admin.put(f"/v1/admin/events/{event_id}/seatmap", json=body)
    assert put.status_code == 200, put.text
    summary = put.json()
    assert (summary["seats"], summary["seated_sections"]) == (8, 1)
    assert summary["general_admission_sections"] == 1
    assert summary["levels"][0] == {
        "level": "stalls",
        "ticket_type": "Stalls",
        "open": 3,
        "held_back": 0,
        "killed": 1,
    }
    exported = admin.get(f"/v1/admin/events/{event_id}/seatmap")
    assert exported.status_code == 200
    # Defaults omitted, the rest as sent (integral coordinates come back as numbers).
    assert exported.json() == body

    # A second import replaces the first (no seat has been held yet).
    again = admin.put(f"/v1/admin/events/{event_id}/seatmap", json=seat_map(rows=3))
    assert again.status_code == 200 and again.json()["seats"] == 12


def test_bad_maps_get_a_422_naming_the_section_row_and_seat(admin: httpx.Client) -> None:
    event_id = make_event(admin)
    url = f"/v1/admin/events/{event_id}/seatmap"

    body = seat_map()
    body["sections"][0]["rows"][1]["seats"][2]["label"] = "2"
    error = assert_error(admin.put(url, json=body), 422, "duplicate_seat")
    assert error["details"]["field"] == "sections[0].rows[1].seats[2].label"
    assert "section 'main' row 'B' seat '2'" in error["message"]

    body = seat_map()
    body["sections"][0]["rows"][0]["seats"][1]["level"] = "gold"
    error = assert_error(admin.put(url, json=body), 422, "unknown_price_level")
    assert error["details"]["field"] == "sections[0].rows[0].seats[1].level"

    body = seat_map()
    body["price_levels"][1]["ticket_type"] = "Boxes"
    assert_error(admin.put(url, json=body), 422, "unknown_ticket_type")

    body = seat_map()
    body["sections"][1]["ticket_type"] = "Stalls"
    assert_error(admin.put(url, json=body), 422, "mixed_ticket_type")

    body = seat_map()
    body["sections"][0]["rows"][1]["label"] = "a"
    assert_error(admin.put(url, json=body), 422, "duplicate_row")

    body = seat_map()
    body["sections"][0]["rows"][0]["seats"][0]["x"] = "left"
    error = assert_error(admin.put(url, json=body), 422, "validation_failed")
    assert error["details"]["field"] == "sections[0].rows[0].seats[0].x"

    body = seat_map()
    body["sections"][0]["kind"] = "boxes"
    assert_error(admin.put(url, json=body), 422)

    body = seat_map()
    body["sections"][0]["rows"][0]["seats"][0]["label"] = "A:1"
    assert_error(admin.put(url, json=body), 422)

    # More seats of a ticket type than its quantity: the map decides a seated ticket type's
    # quantity (its open seats), so the import sets it.
    small = make_event(admin, stalls=2)
    assert admin.put(f"/v1/admin/events/{small}/seatmap", json=seat_map()).status_code == 200
    types = admin.get(f"/v1/events/{small}").json()["ticket_types"]
    assert {t["name"]: t["quantity"] for t in types}["Stalls"] == 3  # one is killed

    for raw in (b"{", b"[]", b"null", b'{"sections": 3}'):
        response = admin.put(url, content=raw, headers=JSON)
        assert response.status_code in (400, 422), response.text
    assert_error(admin.put(url, content=b"{", headers=JSON), 400)
    assert_error(admin.put(url, content=b"<map/>", headers={"Content-Type": "text/xml"}), 415)
    assert admin.get(url).status_code == 404  # nothing was stored


def test_unknown_events_and_maps_are_404(admin: httpx.Client) -> None:
    assert_error(admin.put("/v1/admin/events/no-such-evt/seatmap", json=seat_map()), 404)
    assert_error(admin.get("/v1/admin/events/no-such-evt/seatmap"), 404, "event_not_found")
    event_id = make_event(admin)
    assert_error(admin.get(f"/v1/admin/events/{event_id}/seatmap"), 404, "seat_map_not_found")


def test_an_arena_sized_map_fits_the_seat_map_limit_and_a_larger_body_is_413(
    admin: httpx.Client, client: httpx.Client
) -> None:
    event_id = make_event(admin, stalls=5000)
    url = f"/v1/admin/events/{event_id}/seatmap"
    big = seat_map(rows=41, seats=100)  # 4,100 seats: far over the 64 KiB of other bodies
    raw = json.dumps(big).encode()
    assert len(raw) > 64 * 1024
    put = admin.put(url, content=raw, headers=JSON)
    assert put.status_code == 200, put.text[:300]
    assert put.json()["seats"] == 4100

    too_big = b" " * (MAX_BODY_BYTES + 1)
    error = assert_error(admin.put(url, content=too_big, headers=JSON), 413)
    assert error["details"]["limit"] == MAX_BODY_BYTES
    # Without an operator's token the body is not even read.
    assert_error(client.put(url, content=raw, headers=JSON), 401)


def test_the_cli_imports_and_exports_a_seat_map(
    admin: httpx.Client, settings: Settings, tmp_path: Path
) -> None:
    event_id = make_event(admin)
    source = tmp_path / "venue.json"
    source.write_text(json.dumps(seat_map()))
    imported = run_cli(settings, "venue", "import", event_id, str(source))
    assert imported.returncode == 0, imported.stderr
    assert "8 seats" in imported.stdout

    exported = run_cli(settings, "venue", "export", event_id)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout) == seat_map()
    out = tmp_path / "out.json"
    assert run_cli(settings, "venue", "export", event_id, "-o", str(out)).returncode == 0
    assert json.loads(out.read_text()) == seat_map()

    bad = seat_map()
    bad["sections"][0]["rows"][0]["seats"][1]["label"] = "1"
    source.write_text(json.dumps(bad))
    failed = run_cli(settings, "venue", "import", event_id, str(source))
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1
    assert "sections[0].rows[0].seats[1].label" in failed.stderr
    assert "row 'A' seat '1'" in failed.stderr

    source.write_text("{not json")
    assert run_cli(settings, "venue", "import", event_id, str(source)).returncode == 1
    missing = run_cli(settings, "venue", "import", event_id, str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


@pytest.mark.anyio
async def test_postgresql_refuses_a_seat_in_two_live_holds_and_freezes_the_map(
    admin: httpx.Client, server: ServerThread, pool: asyncpg.Pool[Any]
) -> None:
    event_id = make_event(admin)
    url = f"/v1/admin/events/{event_id}/seatmap"

    def operator() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.url, headers=dict(admin.headers), timeout=10)

    async with operator() as http:
        assert (await http.put(url, json=seat_map())).status_code == 200

    async def hold(status: str, seat: str = "main:A:1") -> uuid.UUID:
        hold_id = uuid.uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status,"
                " expires_at) VALUES ($1, $2, 'Stalls', 'fan', 1, 'held', now() + interval '1h')",
                hold_id,
                event_id,
            )
            await conn.execute(
                "INSERT INTO seat_holds (hold_id, event_id, seat_id, status)"
                " VALUES ($1, $2, $3, $4)",
                hold_id,
                event_id,
                seat,
                status,
            )
        return hold_id

    await hold("held")
    with pytest.raises(asyncpg.UniqueViolationError):
        await hold("held")
    with pytest.raises(asyncpg.UniqueViolationError):
        await hold("paid")
    await hold("expired")  # an ended hold does not block the seat
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await hold("held", seat="main:Z:9")
    # Once seats are held the map cannot change under the sale.
    async with operator() as http:
        assert_error(await http.put(url, json=seat_map()), 409, "seat_map_in_use")
