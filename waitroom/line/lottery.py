"""The verifiable lottery of a room's pre-queue, as pure functions.

Fans who join a ``lottery`` room before the sale opens wait in a pre-queue without a place.
When the sale opens they are shuffled into the first places of the line; everyone who joins
later lines up FIFO behind them. The shuffle can be checked by anyone:

- When the room is created it gets a secret **seed** (32 random bytes, 64 hex digits), and
  publishes its **commitment** ``sha256(seed)`` at ``GET /v1/events/{event_id}/lottery``
  before the sale opens. The commitment pins the seed: it cannot be changed after fans joined.
- Each pre-queue fan has a public **entry** ``sha256(fan_id)`` in hex (the join response
  tells a fan its ``fan_id``; the entry hides it from everyone else).
- The draw sorts the entries by ``sha256(seed || entry)``, where ``seed`` is the 32 raw
  bytes and ``entry`` the 64 ASCII hex characters, comparing the digests as bytes (ties,
  which sha256 never produces in practice, fall back to the entry itself). The first entry
  gets the first place. Sorting by a keyed hash is a uniformly random permutation as long as
  the seed was unknown to whoever chose the entries.
- After the draw, the same endpoint reveals the seed and lists the entries in draw order.

To verify a draw, save the endpoint's JSON as ``lottery.json`` and run::

    python3 - <<'PY'
    import hashlib, json
    d = json.load(open("lottery.json"))
    seed = bytes.fromhex(d["seed"])
    assert hashlib.sha256(seed).hexdigest() == d["commitment"], "seed does not match"
    key = lambda e: (hashlib.sha256(seed + e.encode("ascii")).digest(), e)
    assert sorted(d["entries"], key=key) == d["entries"], "order does not match"
    mine = hashlib.sha256("v_0123...".encode()).hexdigest()   # your fan_id
    print("my place:", d["entries"].index(mine) + 1, "of", len(d["entries"]))
    PY

The order is fixed by the seed and the set of entries alone; a fan who leaves before being
admitted simply gives up the place, and the others keep their relative order.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

SEED_BYTES = 32


def new_seed() -> str:
    """A fresh secret seed: 32 random bytes as 64 hex digits."""
    return secrets.token_hex(SEED_BYTES)


def commitment(seed: str) -> str:
    """``sha256(seed)`` in hex: published before the draw, it pins the seed."""
    return hashlib.sha256(bytes.fromhex(seed)).hexdigest()


def entry(fan_id: str) -> str:
    """A fan's public lottery entry: ``sha256(fan_id)`` in hex."""
    return hashlib.sha256(fan_id.encode()).hexdigest()


def draw_order(seed: str, entries: Iterable[str]) -> list[str]:
    """``entries`` in draw order: the first one gets the first place."""
    raw = bytes.fromhex(seed)
    return sorted(entries, key=lambda e: (hashlib.sha256(raw + e.encode("ascii")).digest(), e))


def places(count: int) -> list[int]:
    """The queue scores of ``count`` drawn fans: -count..-1, ahead of every FIFO place (>= 1)."""
    return list(range(-count, 0))


def verify(seed: str, commitment_hex: str, entries_in_order: list[str]) -> bool:
    """True when ``seed`` matches the commitment and the entries are in its draw order."""
    if len(seed) != 2 * SEED_BYTES:
        return False
    try:
        committed = hmac.compare_digest(commitment(seed), commitment_hex)
    except ValueError:
        return False
    return committed and draw_order(seed, entries_in_order) == entries_in_order
