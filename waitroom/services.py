"""The HTTP process's composition root: every long-lived service, built once, in order.

:func:`open_services` builds the typed :class:`Services` of one ``waitroom serve`` process on
an :class:`~contextlib.AsyncExitStack`, each service after the ones it uses; closing the stack
stops them in reverse order (the admission loops hand their leases over while the clients
still work, the inventory answers its pending asks before the pool closes). Route handlers
reach the services through :func:`services`, typed, instead of looking anything up by name.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from admission.loop import AdmissionService
from admission.passes import PassGate, PassKeys
from inventory.catalogue import PriceBook
from inventory.hosting import InventoryHost
from waitroom.core.clients import open_clients
from waitroom.core.errors import Unauthorized
from waitroom.core.keys import Keys
from waitroom.core.redis import Multiplexer
from waitroom.core.settings import Settings
from waitroom.line import scripts
from waitroom.line.broadcast import Hub
from waitroom.line.identity import Identities
from waitroom.line.room import Rooms

log = logging.getLogger("waitroom.app")


@dataclass(frozen=True, slots=True)
class Services:
    """What the routes of one server process use; built by :func:`open_services`."""

    settings: Settings
    keys: Keys
    #: redis-py with a blocking pool: operators' calls, leases, streams, pub/sub.
    redis: Redis
    #: The pipelined connection the hot path (join, positions) runs its scripts on.
    mux: Multiplexer
    db: asyncpg.Pool[Any]
    identities: Identities
    rooms: Rooms
    hub: Hub
    passes: PassGate
    prices: PriceBook
    inventory: InventoryHost
    #: This process's admission loops; None when ``WAITROOM_ADMISSION_LOOP`` is off.
    admission: AdmissionService | None


async def open_services(settings: Settings, stack: AsyncExitStack) -> Services:
    """Build every service of a server process; ``stack`` stops them in reverse order."""
    clients = await open_clients(settings, stack)
    keys, redis, db = clients.keys, clients.redis, clients.db
    try:
        await asyncio.wait_for(scripts.load_all(redis), settings.dependency_timeout_s)
    except Exception as exc:  # Redis may come up later; scripts then load on first use
        log.warning("could not load the Lua scripts at start-up", extra={"error": repr(exc)})
    mux = Multiplexer(settings.redis_url, timeout=settings.dependency_timeout_s)
    stack.push_async_callback(mux.aclose)
    rooms = Rooms(mux, db, keys)
    stack.push_async_callback(rooms.close)
    hub = Hub(rooms)
    stack.push_async_callback(hub.close)
    pass_keys = PassKeys.from_settings(settings)
    inventory = InventoryHost(db, redis, keys)
    await inventory.start()
    stack.push_async_callback(inventory.stop)
    admission: AdmissionService | None = None
    if settings.admission_loop:
        admission = AdmissionService(
            redis=redis,
            db=db,
            keys=keys,
            pass_keys=pass_keys,
            issuer=settings.pass_issuer,
            rooms=rooms,
        )
        await admission.start()
        stack.push_async_callback(admission.stop)
    return Services(
        settings=settings,
        keys=keys,
        redis=redis,
        mux=mux,
        db=db,
        identities=Identities.from_settings(settings),
        rooms=rooms,
        hub=hub,
        passes=PassGate(pass_keys, redis, keys, settings.pass_issuer),
        prices=PriceBook(db),
        inventory=inventory,
        admission=admission,
    )


def services(conn: HTTPConnection) -> Services:
    """The :class:`Services` of the app serving ``conn``."""
    built = conn.app.state.services
    assert isinstance(built, Services), "the app's lifespan has not built its services"
    return built


def require_admin(conn: HTTPConnection) -> str:
    """Check the operators' bearer token; return the actor name written to the audit log."""
    token = services(conn).settings.admin_token
    if token is None:
        raise Unauthorized(
            "the admin API is disabled: set WAITROOM_ADMIN_TOKEN", code="admin_disabled"
        )
    header = conn.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest keeps the time taken independent of how much of the token matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized(
            "send the admin token as 'Authorization: Bearer <token>'",
            code="admin_token_invalid",
            headers={"WWW-Authenticate": 'Bearer realm="waitroom-admin"'},
        )
    return "admin-api"
