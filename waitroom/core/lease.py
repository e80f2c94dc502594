"""Leases in Redis: which one process does a job (an event's admission, an event's inventory).

A lease is a key set with ``SET NX PX`` to the holder's token. The holder renews it before it
lapses with ``lease.lua`` (compare the token, then ``PEXPIRE``) and may publish figures with
each renewal; a holder that dies stops renewing and the lease lapses. A lease alone cannot stop
a holder paused past its lease from acting: each user also fences its writes (admission inside
``admit.lua``, the inventory by an epoch checked in PostgreSQL).

Two ways to take one. :func:`acquire` (plain ``SET NX``) suits a holder with a fresh token per
attempt, like admission's. :func:`claim` suits a holder whose token is its process's identity,
like the inventory owner's: claiming a lease one holds already succeeds and only extends it
(a holder asking twice must never look like two holders, ADR 0009), and it can read where a
stream ends in the same atomic step, so the new holder knows which entries came after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from waitroom.core.lua_scripts import Script

LEASE = Script("waitroom.core.lua", "lease.lua")
SCRIPTS = (LEASE,)


async def acquire(client: Any, key: str, token: str, *, lease_ms: int) -> bool:
    """Take the lease ``key`` if nobody holds it."""
    return bool(await client.set(key, token, nx=True, px=lease_ms))


@dataclass(frozen=True, slots=True)
class Claim:
    """A lease the caller holds after :func:`claim`."""

    #: True when the caller held it already (it was only extended), False when taken now.
    kept: bool
    #: The last entry id of the ``mark`` stream when the lease was claimed (``"0-0"`` if none).
    mark: str


async def claim(
    client: Any, key: str, token: str, *, lease_ms: int, mark: str | None = None
) -> Claim | None:
    """Take the lease ``key`` if it is free, or keep it if ``token`` holds it already; None
    when someone else holds it.

    With ``mark``, the key of a stream in the lease's hash slot, the reply also says where
    that stream ended at the claim: every entry after it was added by someone who could
    already see the new holder.
    """
    keys = [key] if mark is None else [key, mark]
    reply: Any = await LEASE(client, keys, [token, "claim", lease_ms])
    state = int(reply[0])
    if state == 0:
        return None
    last = reply[1]
    return Claim(kept=state == 2, mark=last.decode() if isinstance(last, bytes) else str(last))


async def renew(
    client: Any,
    key: str,
    token: str,
    *,
    lease_ms: int,
    publish_to: str | None = None,
    figures: Mapping[str, str] | None = None,
) -> bool:
    """Extend our lease (writing ``figures`` into the hash ``publish_to`` if it exists);
    False when the lease is not ours any more."""
    keys = [key] if publish_to is None else [key, publish_to]
    args: list[str | int] = [token, "renew", lease_ms]
    for field, value in (figures or {}).items():
        args += [field, value]
    return int(await LEASE(client, keys, args)) == 1


async def release(client: Any, key: str, token: str) -> bool:
    """Give the lease up at once (a clean shutdown), if it is still ours."""
    return int(await LEASE(client, [key], [token, "release", 0])) == 1
