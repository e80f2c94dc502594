"""Place-in-line receipts: a fan's proof of where they stood, for when Redis loses the line.

The line is kept in Redis only (a sorted set per event), so a Redis that restarts empty
forgets every place. Each place comes with a receipt, ``<place>.<mac>``: the place is the
fan's score in the line (its join number), and the MAC is HMAC-SHA256 over the event, the
fan and the place with a key derived from the challenge secret (every node shares it). A fan
cannot forge an earlier place, move a receipt to another fan or another event, or restore a
place of the current line (see ``join.lua``: only a place of an earlier generation of the
room, i.e. one Redis has lost, is restored). Pure functions.

Join numbers of generation ``g`` of a room start at :func:`generation_base` ``(g)``
(``g * 2**40``): sorted-set scores are doubles, exact to 2**53, which leaves 2**40 joins per
generation and 8,000 generations.
"""

from __future__ import annotations

import base64
import binascii
import hmac

#: The request header a fan sends a receipt in, to be put back in line after Redis lost it.
HEADER = "X-Place-Receipt"
#: Bits of a generation's join numbers.
GENERATION_BITS = 40
#: Longest receipt looked at: a place of 16 digits, a dot and 43 characters of MAC.
MAX_CHARS = 80
_DOMAIN = b"waitroom place receipt v1"


def generation_base(generation: int) -> int:
    """The first join number of ``generation``."""
    return generation << GENERATION_BITS


def receipt_key(secret: bytes) -> bytes:
    """The receipts' own key, derived from a shared secret (never the secret itself)."""
    return hmac.digest(secret, _DOMAIN, "sha256")


def _mac(key: bytes, event_id: str, fan_id: str, place: int) -> str:
    message = f"{event_id}\n{fan_id}\n{place}".encode()
    digest = hmac.digest(key, message, "sha256")
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(key: bytes, event_id: str, fan_id: str, place: int) -> str:
    """The receipt of ``fan_id``'s place ``place`` in ``event_id``'s line."""
    return f"{place}.{_mac(key, event_id, fan_id, place)}"


def verify(key: bytes, receipt: str, event_id: str, fan_id: str) -> int | None:
    """The place a receipt of this fan in this event proves, or None (forged, other fan,
    other event, malformed)."""
    if not receipt or len(receipt) > MAX_CHARS:
        return None
    place_text, dot, mac = receipt.strip().partition(".")
    if not dot or not (place_text + mac).isascii() or not place_text.lstrip("-").isdigit():
        return None
    try:
        place = int(place_text)
        expected = _mac(key, event_id, fan_id, place)
    except (ValueError, binascii.Error):
        return None
    if abs(place) >= 2**53 or not hmac.compare_digest(expected, mac):
        return None
    return place
