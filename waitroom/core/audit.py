"""The audit log of operators' changes: who, from where, in which request, old and new.

Every change an operator makes (an event created, admission changed, a pass revoked) writes
one ``audit_log`` row in the same transaction as the change itself, through :func:`record`.
The row names the :class:`Actor`: ``admin:NAME`` for a named operator's token over HTTP
(with the client address and the request id, so a change can be traced to its request's
log lines), ``cli:USER`` from a terminal, or a bare name from tests and benchmarks.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Actor(msgspec.Struct, frozen=True, kw_only=True):
    """Who made a change, and where it came from when it came over HTTP."""

    name: str
    #: The client's address (not folded to a /64: this is a record, not a limit).
    client_address: str | None = None
    request_id: str | None = None


def actor_of(actor: Actor | str) -> Actor:
    """``actor`` as an :class:`Actor`; a bare name has no address and no request."""
    return actor if isinstance(actor, Actor) else Actor(name=actor)


async def record(
    conn: Any,
    actor: Actor | str,
    action: str,
    event_id: str | None,
    *,
    old: str | None = None,
    new: str | None = None,
) -> None:
    """Insert one audit row on ``conn`` (an asyncpg connection, inside the change's
    transaction); ``old`` and ``new`` are JSON text."""
    who = actor_of(actor)
    await conn.execute(
        "INSERT INTO audit_log (actor, action, event_id, old, new, client_address, request_id)"
        " VALUES ($1, $2, $3, $4, $5, $6::inet, $7)",
        who.name,
        action,
        event_id,
        old,
        new,
        who.client_address,
        who.request_id,
    )
