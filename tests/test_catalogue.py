"""The event catalogue through the admin API, the public view and the real console script."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from inventory.catalogue import EventCreate, RoomSpec, TicketTypeSpec, validate_event
from tests.harness import run_cli
from tests.test_errors import assert_error
from waitroom.core.errors import ValidationFailed
from waitroom.core.settings import Settings


def event_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"cat-{uuid.uuid4().hex[:10]}",
        "name": "Catalogue Test",
        "venue": "Hall",
        "room": {"queue_mode": "lottery", "rate_per_second": 0.5, "max_active": 50},
        "ticket_types": [
            {"name": "ga", "quantity": 100, "price_minor": 4500, "currency": "EUR"},
            {
                "name": "vip",
                "quantity": 5,
                "price_minor": 20000,
                "currency": "EUR",
                "per_fan_limit": 1,
            },
        ],
    }
    body.update(overrides)
    return body


def test_an_operator_creates_an_event_and_fans_see_its_public_view(
    admin: httpx.Client, client: httpx.Client
) -> None:
    body = event_body()
    created = admin.post("/v1/admin/events", json=body)
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == f"/v1/admin/events/{body['id']}"
    detail = created.json()
    assert detail["room"]["queue_mode"] == "lottery"
    assert detail["room"]["rate_per_second"] == 0.5
    assert detail["room"]["paused"] is False
    assert [t["name"] for t in detail["ticket_types"]] == ["ga", "vip"]

    public = client.get(f"/v1/events/{body['id']}").json()
    assert public["name"] == "Catalogue Test"
    assert public["queue_mode"] == "lottery"
    assert public["ticket_types"][1] == {
        "name": "vip",
        "price_minor": 20000,
        "currency": "EUR",
        "per_fan_limit": 1,
        "quantity": 5,
        "available": 5,
        "held": 0,
    }
    assert "room" not in public  # operators' settings stay private

    listed = admin.get("/v1/admin/events").json()
    assert body["id"] in [e["id"] for e in listed]
    stats = admin.get(f"/v1/admin/events/{body['id']}/stats").json()
    assert (stats["quantity"], stats["held"], stats["sold"], stats["available"]) == (105, 0, 0, 105)


def test_an_id_is_generated_when_none_is_given(admin: httpx.Client) -> None:
    body = event_body()
    del body["id"]
    created = admin.post("/v1/admin/events", json=body)
    assert created.status_code == 201
    assert created.json()["id"].startswith("evt-")


def test_creating_the_same_id_twice_is_a_conflict(admin: httpx.Client) -> None:
    body = event_body()
    assert admin.post("/v1/admin/events", json=body).status_code == 201
    assert_error(admin.post("/v1/admin/events", json=body), 409, "event_exists")


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        (
            {
                "ticket_types": [
                    {"name": "ga", "quantity": 1, "price_minor": 1, "currency": "EUR"},
                    {"name": "GA", "quantity": 1, "price_minor": 1, "currency": "EUR"},
                ]
            },
            "ticket_types[1].name",
            "duplicate_ticket_type",
        ),
        (
            {"ticket_types": [{"name": "ga", "quantity": 1, "price_minor": 1, "currency": "XXQ"}]},
            "ticket_types[0].currency",
            "validation_failed",
        ),
        (
            {"ticket_types": [{"name": "ga", "quantity": 1, "price_minor": 1, "currency": "eur"}]},
            "ticket_types[0].currency",
            "validation_failed",
        ),
        (
            {"ticket_types": [{"name": "ga", "quantity": 1, "price_minor": -1, "currency": "EUR"}]},
            "ticket_types[0].price_minor",
            "validation_failed",
        ),
        ({"room": {"opens_at": "2001-01-01T00:00:00Z"}}, "room.opens_at", "validation_failed"),
        ({"starts_at": "2001-01-01T00:00:00Z"}, "starts_at", "validation_failed"),
    ],
)
def test_invalid_events_are_refused_naming_the_field(
    admin: httpx.Client, change: dict[str, Any], field: str, code: str
) -> None:
    error = assert_error(admin.post("/v1/admin/events", json=event_body(**change)), 422, code)
    assert error["details"]["field"] == field


def test_the_readmes_example_event_is_accepted_whatever_the_date(admin: httpx.Client) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = re.search(r"An event body[^\n]*\n\n```json\n(.*?)```", readme, re.DOTALL)
    assert found is not None, "the README's example event body moved"
    body = json.loads(found.group(1))
    # Nothing in it that a date can make stale: a fixed opens_at would lie in the past one day.
    assert "opens_at" not in body["room"] and "starts_at" not in body
    body["id"] = f"readme-{uuid.uuid4().hex[:8]}"  # the example's id may exist already
    created = admin.post("/v1/admin/events", json=body)
    assert created.status_code == 201, created.text


def test_the_show_must_start_after_the_sale_opens() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    spec = EventCreate(
        name="x",
        ticket_types=[TicketTypeSpec("ga", 1, 1, "EUR")],
        starts_at=now + timedelta(hours=1),
        room=RoomSpec(opens_at=now + timedelta(hours=2)),
    )
    with pytest.raises(ValidationFailed) as caught:
        validate_event(spec, now)
    assert caught.value.field == "starts_at"
    validate_event(
        EventCreate(
            name="x",
            ticket_types=[TicketTypeSpec("ga", 1, 1, "EUR")],
            starts_at=now + timedelta(hours=3),
            room=RoomSpec(opens_at=now),
        ),
        now,
    )


def test_the_console_script_creates_lists_and_shows_events(settings: Settings) -> None:
    event_id = f"cli-{uuid.uuid4().hex[:8]}"
    created = run_cli(
        settings,
        "event",
        "create",
        "--id",
        event_id,
        "--name",
        "CLI Sale",
        "--ticket",
        "ga:200:3000:EUR",
        "--ticket",
        "vip:10:9000:EUR:2",
        "--rate",
        "25",
        "--mode",
        "fifo",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["id"] == event_id

    shown = run_cli(settings, "event", "show", event_id, "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["room"]["rate_per_second"] == 25
    assert [(t["name"], t["quantity"], t["per_fan_limit"]) for t in detail["ticket_types"]] == [
        ("ga", 200, 4),
        ("vip", 10, 2),
    ]
    human = run_cli(settings, "event", "show", event_id)
    assert "CLI Sale" in human.stdout and "vip" in human.stdout

    listed = run_cli(settings, "event", "list", "--json")
    assert event_id in [e["id"] for e in json.loads(listed.stdout)]
    assert event_id in run_cli(settings, "event", "list").stdout


def test_the_console_script_creates_an_event_from_a_toml_file(
    settings: Settings, tmp_path: Path
) -> None:
    event_id = f"toml-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "event.toml"
    spec.write_text(
        f'id = "{event_id}"\nname = "From TOML"\n[room]\nqueue_mode = "lottery"\n'
        '[[ticket_types]]\nname = "ga"\nquantity = 3\nprice_minor = 100\ncurrency = "GBP"\n'
    )
    created = run_cli(settings, "event", "create", "--file", str(spec))
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == f"created event {event_id}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("event", "show", "no-such-event"), "no event 'no-such-event'"),
        (("event", "create", "--name", "x", "--ticket", "ga:-1:5:EUR"), "quantity"),
        (("event", "create", "--name", "x", "--ticket", "ga:1:5"), "NAME:QUANTITY"),
        (("event", "create", "--file", "/no/such/file.json"), "cannot read"),
        (
            (
                "event",
                "create",
                "--name",
                "x",
                "--ticket",
                "ga:1:5:EUR",
                "--opens-at",
                "2001-01-01T00:00:00Z",
            ),
            "room.opens_at",
        ),
        (("event", "create", "--name", "x", "--ticket", "ga:1:5:EUR", "--rate", "-3"), "-3"),
    ],
)
def test_the_console_script_fails_with_one_line(
    settings: Settings, args: tuple[str, ...], message: str
) -> None:
    done = run_cli(settings, *args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("waitroom") and message in lines[0]
    assert "Traceback" not in done.stderr
