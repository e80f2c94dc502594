"""Leases in Redis: which one process does a job (an event's admission, an event's inventory).

A lease is a key set with ``SET NX PX`` to a token unique to one tenure of one process. The
holder renews it before it lapses with ``lease.lua`` (compare the token, then ``PEXPIRE``) and
may publish figures with each renewal; a holder that dies stops renewing and the lease lapses.
A lease alone cannot stop a holder paused past its lease from acting: each user also fences
its writes (admission inside ``admit.lua``, the inventory by an epoch checked in PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from waitroom.core.lua_scripts import Script

LEASE = Script("waitroom.core.lua", "lease.lua")
SCRIPTS = (LEASE,)


async def acquire(client: Any, key: str, token: str, *, lease_ms: int) -> bool:
    """Take the lease ``key`` if nobody holds it."""
    return bool(await client.set(key, token, nx=True, px=lease_ms))


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
