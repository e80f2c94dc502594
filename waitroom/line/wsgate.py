"""The queue WebSocket's defences, before a socket may cost the server memory for long.

A flash sale holds tens of thousands of sockets open for minutes, each some 15-18 KB of
server memory and one file descriptor, so a socket is something to ration. What stands
between a handshake and a live subscription (the route is ``waitroom.queue_api.queue_ws``):

- **Origin** (:func:`origin_allowed`): a browser page may open the socket only from the
  server's own origin or one of ``WAITROOM_ALLOWED_ORIGINS``; otherwise any site a fan
  visits could open sockets with the fan's cookie (cross-site WebSocket hijacking). A
  handshake without ``Origin`` is allowed: browsers always send it, so its absence means a
  non-browser client, which could forge any Origin anyway and has no fan's cookie to abuse.
- **Sockets per client address in this process** (:class:`AddressSlots`): counted from the
  first byte of the handshake to the close, so a flood of slow handshakes counts too.
- **Handshakes per client address**, across every process: each socket costs one token of
  the address's request bucket of the event (:meth:`waitroom.line.room.Rooms.charge_address`,
  :data:`~waitroom.line.ratelimit.ADDRESS_REQUESTS`, shared with polls and challenges),
  paid when its ticket is issued, or at the handshake when it brings its identity in a
  header or the cookie. The route charges it; this module only issues and takes tickets.
- **Identity out of the URL**: a one-time ticket (:meth:`WsGate.issue_ticket`), 192 random
  bits that stand for one fan of one event for :data:`TICKET_TTL_S` seconds and are taken
  with ``GETDEL``, so a ticket seen in a log or a proxy's history opens nothing.

The per-fan cap (oldest socket replaced) lives with the subscriptions, in
:mod:`waitroom.line.broadcast`; closing on any data frame in the route.
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import parse_qsl

from starlette.requests import HTTPConnection

from waitroom.core.keys import Keys
from waitroom.core.redis import Multiplexer
from waitroom.core.settings import normalize_origin

#: How long a ticket may wait to be used: a page asks for one right before it connects.
TICKET_TTL_S = 30
_TTL_MS = TICKET_TTL_S * 1000
#: Shape of a ticket (``secrets.token_urlsafe(24)``); anything else never reaches Redis.
_TICKET = re.compile(r"^[A-Za-z0-9_-]{32}$")

#: Close codes (and reasons) of refused or ended sockets; browsers can read both.
FORBIDDEN_ORIGIN = (4403, "origin not allowed")
TOO_MANY_FROM_ADDRESS = (4429, "too many connections from your address")
TICKET_REFUSED = (4401, "ticket invalid, expired or already used")
TOKEN_IN_URL = (
    4401,
    "a token in the URL is not accepted: use a ticket (POST .../queue/ws-ticket),"
    " the cookie, or Authorization",
)
DATA_FRAME = (1008, "fans only listen: data frames are not accepted")


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a handshake with these ``Origin`` and ``Host`` headers may proceed.

    No ``Origin``: a non-browser client, allowed. Otherwise the origin must be one of
    ``allowed`` (normalised, see :func:`~waitroom.core.settings.normalize_origin`; ``"*"``
    allows any), or name the very host and port the request was sent to. The scheme is not
    compared with the connection's, since a TLS-terminating proxy turns ``https`` into
    plain ``ws`` before it reaches us; a page's scheme is still checked against the list.
    ``Origin: null`` (sandboxed frames, files) is refused unless the list holds ``*``.
    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    canonical = normalize_origin(origin)
    if canonical is None:
        return False
    if canonical in allowed:
        return True
    if not host:
        return False
    scheme, _, authority = canonical.partition("://")
    default = "443" if scheme == "https" else "80"
    return _authority(authority, default) == _authority(host.strip().lower(), default)


def _authority(value: str, default_port: str) -> tuple[str, str]:
    """``host[:port]`` as (host, port), the port defaulting to the origin's scheme's."""
    if value.startswith("["):  # an IPv6 literal
        host, _, rest = value.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else default_port
    host, colon, port = value.rpartition(":")
    if not colon:
        return value, default_port
    return host, port or default_port


def query_param(conn: HTTPConnection, name: str) -> str:
    """The last value of query parameter ``name`` ('' when absent), as starlette reads it.

    Not through ``conn.query_params``: that caches every parsed parameter on the connection
    for as long as it lives, about 0.7 KB on each WebSocket held open through a sale, for a
    value read once at the handshake.
    """
    raw: bytes = conn.scope.get("query_string", b"")
    value = ""
    for key, item in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key == name:
            value = item
    return value


class AddressSlots:
    """Sockets open (or opening) per client address in this process, up to ``cap`` each.

    One integer per address with a socket, not per socket: the count is all it takes.
    """

    __slots__ = ("_open", "cap")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        """Count one more socket of ``address``; False (nothing counted) when at the cap."""
        count = self._open.get(address, 0)
        if count >= self.cap:
            return False
        self._open[address] = count + 1
        return True

    def leave(self, address: str) -> None:
        """Count one socket of ``address`` fewer (one that :meth:`enter` let in)."""
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def count(self, address: str) -> int:
        """Sockets of ``address`` open now in this process."""
        return self._open.get(address, 0)


class WsGate:
    """This process's WebSocket defences: the origin rule, address slots and tickets."""

    def __init__(
        self,
        redis: Multiplexer,
        keys: Keys,
        *,
        allowed_origins: tuple[str, ...] = (),
        max_per_address: int = 200,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.allowed_origins = allowed_origins
        self.slots = AddressSlots(max_per_address)

    def origin_ok(self, origin: str | None, host: str | None) -> bool:
        """:func:`origin_allowed` with this deployment's allowlist."""
        return origin_allowed(origin, host, self.allowed_origins)

    async def issue_ticket(self, event_id: str, fan_id: str) -> str:
        """A new one-time ticket for ``fan_id`` on ``event_id``, valid :data:`TICKET_TTL_S` s.

        The caller has charged the client address for it (it opens a socket).
        """
        key_of = self.keys.event(event_id).ws_ticket
        while True:
            ticket = secrets.token_urlsafe(24)
            # NX: 192 random bits do not clash, but if two ever did, the first fan's ticket
            # must not be rewritten to name another fan.
            if await self.redis.execute("SET", key_of(ticket), fan_id, "NX", "PX", _TTL_MS):
                return ticket

    async def redeem(self, event_id: str, ticket: str) -> str | None:
        """The fan ``ticket`` stands for on ``event_id``, once: None if unknown, used or expired."""
        if not _TICKET.match(ticket):
            return None
        fan_id = await self.redis.execute("GETDEL", self.keys.event(event_id).ws_ticket(ticket))
        if fan_id is None:
            return None
        return fan_id.decode() if isinstance(fan_id, bytes) else str(fan_id)
