"""The verifiable lottery of a room's pre-queue, as pure functions.

Fans who join a ``lottery`` room before the sale opens wait in a pre-queue without a place.
When the sale opens they are shuffled into the first places of the line; everyone who joins
later lines up FIFO behind them. The shuffle can be checked by anyone, and the published
list does not tell who entered:

- When the room is created it gets a secret **seed** (32 random bytes, 64 hex digits), and
  publishes its **commitment** ``sha256(seed)`` at ``GET /v1/events/{event_id}/lottery``
  before the sale opens. The commitment pins the seed: it cannot be changed after fans joined.
- Each pre-queue fan has a public **entry** ``HMAC-SHA256(salt, fan_id)`` in hex, where
  ``salt`` is a second per-room secret that is never revealed. Without the salt nobody can
  tell from the list whether a given person (a known user id) entered; each fan learns their
  own entry from the same endpoint (``my_entry``, when they send their identity).
- The draw mixes the seed with every entry, so that knowing the seed is not enough to place
  an identity at the top: ``mixed = sha256(seed || sha256(sorted entries, concatenated))``.
  It then sorts the entries by ``sha256(mixed || entry)``, where ``seed`` and the inner
  digest are raw bytes and each entry its 64 ASCII hex characters, comparing digests as bytes
  (ties, which sha256 never produces in practice, fall back to the entry itself). The first
  entry gets the first place. An insider who knew the seed could only aim an identity at a
  place by knowing every other entry, and the pre-queue is frozen at opening.
- After the draw, the same endpoint reveals the seed and lists the entries in draw order.

To verify a draw, save the endpoint's JSON (fetched with your identity, so ``my_entry`` is
there) as ``lottery.json`` and run::

    python3 - <<'PY'
    import hashlib, json
    d = json.load(open("lottery.json"))
    seed = bytes.fromhex(d["seed"])
    assert hashlib.sha256(seed).hexdigest() == d["commitment"], "seed does not match"
    pool = hashlib.sha256("".join(sorted(d["entries"])).encode("ascii")).digest()
    mixed = hashlib.sha256(seed + pool).digest()
    key = lambda e: (hashlib.sha256(mixed + e.encode("ascii")).digest(), e)
    assert sorted(d["entries"], key=key) == d["entries"], "order does not match"
    print("my place:", d["entries"].index(d["my_entry"]) + 1, "of", len(d["entries"]))
    PY

The order is fixed by the seed and the set of entries alone; a fan who leaves after the draw
simply gives up the place, and the others keep theirs. Rooms drawn before this scheme
(``scheme`` 1 in the answer) published ``sha256(fan_id)`` entries sorted by
``sha256(seed || entry)``; their ``method`` field says so.
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


def new_salt() -> str:
    """A fresh secret entry salt: 32 random bytes as 64 hex digits (never revealed)."""
    return secrets.token_hex(SEED_BYTES)


def entry(salt: str, fan_id: str) -> str:
    """A fan's public lottery entry: ``HMAC-SHA256(salt bytes, fan_id)`` in hex."""
    return hmac.new(bytes.fromhex(salt), fan_id.encode(), hashlib.sha256).hexdigest()


def legacy_entry(fan_id: str) -> str:
    """The entry of scheme 1 (rooms drawn before salted entries): ``sha256(fan_id)``."""
    return hashlib.sha256(fan_id.encode()).hexdigest()


def mixed_seed(seed: str, entries: Iterable[str]) -> bytes:
    """``sha256(seed || sha256(sorted entries))``: the randomness the draw sorts by."""
    pool = hashlib.sha256("".join(sorted(entries)).encode("ascii")).digest()
    return hashlib.sha256(bytes.fromhex(seed) + pool).digest()


def draw_order(seed: str, entries: Iterable[str]) -> list[str]:
    """``entries`` in draw order: the first one gets the first place."""
    listed = list(entries)
    mixed = mixed_seed(seed, listed)
    return sorted(listed, key=lambda e: (hashlib.sha256(mixed + e.encode("ascii")).digest(), e))


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
