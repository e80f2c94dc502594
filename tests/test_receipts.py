"""Place receipts: a fan's proof of its place, bound to the fan, the event and the place."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from waitroom.line import receipts

KEY = receipts.receipt_key(b"s" * 32)
_ids = st.text(min_size=1, max_size=40)
_places = st.integers(min_value=-(2**52), max_value=2**52)


@given(event=_ids, fan=_ids, place=_places)
def test_a_receipt_proves_its_place_for_its_fan_and_event_only(
    event: str, fan: str, place: int
) -> None:
    receipt = receipts.sign(KEY, event, fan, place)
    assert receipts.verify(KEY, receipt, event, fan) == place
    assert receipts.verify(KEY, receipt, event, fan + "x") is None
    assert receipts.verify(KEY, receipt, event + "x", fan) is None
    assert receipts.verify(receipts.receipt_key(b"t" * 32), receipt, event, fan) is None
    mac = receipt.partition(".")[2]
    for better in (place - 1, place - 2**40, 0):
        if better != place:
            assert receipts.verify(KEY, f"{better}.{mac}", event, fan) is None


@given(junk=st.text(max_size=100))
def test_anything_else_proves_nothing_and_never_raises(junk: str) -> None:
    assert receipts.verify(KEY, junk, "evt", "fan") is None


def test_generations_leave_room_for_every_join() -> None:
    assert receipts.generation_base(0) == 0
    assert receipts.generation_base(1) == 2**40
    assert receipts.generation_base(8000) < 2**53  # exact as a sorted-set score
    assert receipts.receipt_key(b"s" * 32) != b"s" * 32
