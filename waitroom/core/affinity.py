"""Owner affinity: telling the load balancer which node hosts an event's inventory actor.

Each event's inventory actor lives in one process (:mod:`inventory.hosting`); a reservation
that reaches another node is forwarded to it through Redis and pays for the trip twice (the
asking node parses, checks and waits; the owner reads, applies and answers). When the nodes
are named (``WAITROOM_NODE_NAME``: the value of ``cookie`` on the node's ``server`` line in
HAProxy), the answers that concern an event's inventory (the fan's status once admitted, a
reservation, a cancellation) carry ``Set-Cookie: waitroom_node=<the owner's name>``, and
HAProxy (``cookie waitroom_node`` in deploy/haproxy.cfg: passive, it routes by the cookie and
never writes it) sends the fan's reservations straight to the owner: no forwarding. The
cookie's ``Path`` is the event's reservations route, so a browser sends it with those only:
the fan's other requests (paying, polling) stay spread over every node, and a fan shopping
two events has one cookie for each.

The cookie is a hint, never trusted for anything: a stale or forged one reaches another node,
which forwards as before and answers with the right cookie; a node that is down is skipped
by the balancer (``option redispatch``). Within one node, ``--workers N`` processes share one
listening socket, and the balancer cannot choose among them: the node's other workers still
forward to the owner (ADR 0017).
"""

from __future__ import annotations

from typing import Protocol

from starlette.requests import HTTPConnection

from waitroom.core.http import dependency_error

#: The cookie HAProxy routes by (``cookie waitroom_node`` in deploy/haproxy.cfg).
NODE_COOKIE = "waitroom_node"
#: A routing hint outlives a sale's checkout, not a day: owners change with deployments.
MAX_AGE_S = 3600


class OwnerDirectory(Protocol):
    """Where an event's actor runs, by the balancer's name for the node (inventory host)."""

    async def owner_node(self, event_id: str) -> str | None:
        """The owner's node name, or None when it is unknown or the nodes have no names."""
        ...


def cookie_path(event_id: str) -> str:
    """Where the cookie goes back: the event's reservations (event ids are URL-safe)."""
    return f"/v1/events/{event_id}/reservations"


def cookie_header(node: str, event_id: str, *, secure: bool) -> str:
    """``Set-Cookie`` value naming ``node`` for the balancer, sent back by the client with
    ``event_id``'s reservations only, to this host only."""
    attributes = (
        f"{NODE_COOKIE}={node}; Max-Age={MAX_AGE_S}; Path={cookie_path(event_id)};"
        " HttpOnly; SameSite=Lax"
    )
    return attributes + "; Secure" if secure else attributes


def owner_cookie(sent: str | None, owner: str | None, event_id: str, *, secure: bool) -> str | None:
    """The ``Set-Cookie`` to answer with when the client sent ``sent`` and the owner is
    ``owner``; None when there is nothing to say (unknown owner, or the client knows)."""
    if owner is None or sent == owner:
        return None
    return cookie_header(owner, event_id, secure=secure)


async def add_owner_cookie(
    connection: HTTPConnection,
    owners: OwnerDirectory,
    event_id: str,
    headers: dict[str, str],
    *,
    secure: bool,
) -> None:
    """Add the ``Set-Cookie`` routing the client's next requests for ``event_id`` to the
    node hosting its actor to ``headers``, when the client does not send it already."""
    try:
        owner = await owners.owner_node(event_id)
    except Exception as exc:
        if dependency_error(exc) is None:
            raise
        # Redis could not say: the answer goes out without the hint (it is only one).
        return
    value = owner_cookie(connection.cookies.get(NODE_COOKIE), owner, event_id, secure=secure)
    if value is not None:
        headers["Set-Cookie"] = value
