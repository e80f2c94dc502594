"""The WebSocket messages encode and decode exactly as documented; states map to them."""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from admission.passes import PassClaims, PassKeys
from waitroom.line import messages
from waitroom.line.messages import Admitted, Paused, Position, Prequeue, SoldOut
from waitroom.line.scripts import ADMITTED, ADMITTING, GONE, PREQUEUE, RoomView


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


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (
            Position(3, 2, 12.0),
            {"type": "position", "position": 3, "fans_ahead": 2, "eta_seconds": 12.0},
        ),
        (
            Position(1, 0, None),
            {"type": "position", "position": 1, "fans_ahead": 0, "eta_seconds": None},
        ),
        (
            Admitted("a.b.c", 1800000000),
            {"type": "admitted", "pass": "a.b.c", "expires_at": 1800000000},
        ),
        (SoldOut(), {"type": "sold_out"}),
        (Paused(), {"type": "paused"}),
        (Prequeue("ab" * 32), {"type": "prequeue", "commitment": "ab" * 32}),
    ],
)
def test_each_message_has_its_documented_shape_and_round_trips(
    message: messages.Message, wire: dict[str, object]
) -> None:
    text = messages.encode(message)
    assert json.loads(text) == wire
    assert messages.decode(text) == message
    assert messages.decode(json.dumps(wire)) == message


def test_an_unknown_message_type_does_not_decode() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        messages.decode('{"type": "teleport"}')


def test_the_pass_expiry_is_read_for_display_without_a_key() -> None:
    claims = PassClaims("waitroom", "fan", "evt", "jti", 1, 1, 1800000123, 7)
    token = PassKeys(Ed25519PrivateKey.generate()).sign(claims)
    assert messages.pass_expiry(token) == 1800000123
    assert messages.pass_expiry("not a jwt") is None
    # Not one of our passes (other claims): nothing to show.
    assert messages.pass_expiry(jwt.encode({"sub": "x"}, "k" * 32, "HS256")) is None


def test_states_map_to_messages() -> None:
    assert messages.message_for(0, room(), 2.0) == Position(1, 0, 0.0)
    assert messages.message_for(9, room(), 2.0) == Position(10, 9, 4.0)
    assert messages.message_for(9, room(), None) == Position(10, 9, None)
    assert messages.message_for(PREQUEUE, room(commitment="cc"), None) == Prequeue("cc")
    assert messages.message_for(3, room(paused=True), 2.0) == Paused()
    assert messages.message_for(3, room(sold_out=True), 2.0) == SoldOut()
    assert messages.message_for(PREQUEUE, room(sold_out=True), 2.0) == SoldOut()
    assert messages.message_for(ADMITTED, room(sold_out=True), None, "p.q.r") == Admitted("p.q.r")
    assert messages.message_for(GONE, room(), None) is None
    assert messages.message_for(ADMITTING, room(), None) is None


def test_states_map_to_the_http_status() -> None:
    status = messages.status_of
    assert status(4, paused=False, sold_out=False) == "waiting"
    assert status(4, paused=True, sold_out=False) == "paused"
    assert status(PREQUEUE, paused=True, sold_out=False) == "prequeue"
    assert status(4, paused=True, sold_out=True) == "sold_out"
    assert status(ADMITTED, paused=True, sold_out=True) == "admitted"
