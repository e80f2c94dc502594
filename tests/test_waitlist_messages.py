"""What a waitlisted fan is told: the ``waitlist`` message and status, never an ETA."""

from __future__ import annotations

import json

from waitroom.line import messages
from waitroom.line.messages import Paused, Position, Waitlist
from waitroom.line.scripts import ADMITTED, PREQUEUE, RoomView
from waitroom.queue_api import status_body


def room(**changes: object) -> RoomView:
    values: dict[str, object] = {
        "mode": "fifo",
        "opens_at": 0.0,
        "opened": True,
        "drawn": False,
        "paused": False,
        "sold_out": False,
        "admitted_total": 0,
        "waiting": 10,
        "commitment": None,
    }
    values.update(changes)
    return RoomView(**values)  # type: ignore[arg-type]


def test_the_waitlist_message_is_documented_json_without_an_eta() -> None:
    wire = json.loads(messages.encode(Waitlist(3, 2, 5)))
    assert wire == {
        "type": "waitlist",
        "position": 3,
        "fans_ahead": 2,
        "returned": 5,
        "eta_seconds": None,
    }
    assert messages.decode(json.dumps(wire)) == Waitlist(3, 2, 5)


def test_a_placed_fan_of_a_waitlisting_room_is_on_the_waitlist_even_with_a_known_rate() -> None:
    listing = room(waitlisted=True, returned=4)
    assert messages.message_for(2, listing, rate=10.0) == Waitlist(3, 2, 4)
    assert messages.message_for(2, room(), rate=10.0) == Position(3, 2, 0.0)
    # Paused wins (nobody moves), a pass is a pass.
    assert messages.message_for(2, room(waitlisted=True, paused=True), 10.0) == Paused()
    assert isinstance(
        messages.message_for(ADMITTED, listing, 10.0, queue_pass="a.b.c"), messages.Admitted
    )
    assert messages.status_of(0, paused=False, sold_out=False, waitlisted=True) == "waitlist"
    assert messages.status_of(PREQUEUE, paused=False, sold_out=False, waitlisted=True) == (
        "prequeue"
    )


def test_the_http_status_of_a_waitlisted_fan_has_no_eta_and_counts_what_came_back() -> None:
    body = status_body(
        "e1", "f1", 4, paused=False, sold_out=False, rate=20.0, waitlisted=True, returned=7
    )
    assert (body.status, body.position, body.fans_ahead, body.eta_seconds, body.returned) == (
        "waitlist",
        5,
        4,
        None,
        7,
    )
    normal = status_body("e1", "f1", 4, paused=False, sold_out=False, rate=20.0)
    assert (normal.status, normal.returned) == ("waiting", None)
    assert normal.eta_seconds is not None
