"""The HTTP process's composition root: every long-lived service, built once, in order.

:func:`open_services` builds the typed :class:`Services` of one ``waitroom serve`` process on
an :class:`~contextlib.AsyncExitStack`, each service after the ones it uses; closing the stack
stops them in reverse order (the admission loops hand their leases over while the clients
still work, the inventory answers its pending asks before the pool closes). Route handlers
reach the services through :func:`services`, typed, instead of looking anything up by name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from admission import recovery
from admission.loop import AdmissionService
from admission.passes import PassGate, PassKeys
from inventory.catalogue import EventDirectory, EventInfo, PriceBook
from inventory.hosting import InventoryHost
from waitroom import admin_auth
from waitroom.balancer_agent import SELLING_WITHIN_S, BalancerAgent, line_weight
from waitroom.core.audit import Actor
from waitroom.core.cache import ViewCache
from waitroom.core.clients import open_clients
from waitroom.core.db import MIN_STATEMENT_TIMEOUT_S, create_pool
from waitroom.core.keys import Keys
from waitroom.core.metrics import monitoring
from waitroom.core.redis import Multiplexer
from waitroom.core.settings import Settings
from waitroom.line import scripts
from waitroom.line.broadcast import Hub
from waitroom.line.challenge import Challenges
from waitroom.line.identity import Identities
from waitroom.line.room import Rooms
from waitroom.line.seatnews import SeatNews
from waitroom.line.wsgate import WsGate
from waitroom.reservation_changes import ReservationChanges

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
    #: Proof-of-work challenges of joins (issue, verify, difficulty policy).
    challenges: Challenges
    rooms: Rooms
    hub: Hub
    #: The queue WebSocket's defences: origins, sockets per address, tickets.
    ws_gate: WsGate
    passes: PassGate
    prices: PriceBook
    #: Which event ids exist: an unknown id is refused without a query (see EventDirectory).
    events: EventDirectory
    #: Public views, each served for at most ``view_cache_ttl_s``: the event view
    #: (``GET /v1/events/{id}``) and the encoded public lottery record (``GET .../lottery``).
    event_views: ViewCache[EventInfo]
    lottery_views: ViewCache[bytes]
    inventory: InventoryHost
    #: This process's admission loops; None when ``WAITROOM_ADMISSION_LOOP`` is off.
    admission: AdmissionService | None
    #: Viewers of seat maps and their live seat changes (one subscription per viewed event).
    seat_news: SeatNews
    #: Encoded seat snapshots (``GET /v1/events/{id}/seats``): body, ETag, version, read at.
    seat_snapshots: ViewCache[tuple[bytes, str, int, float]]
    #: Settled payments, for the reservation long polls (``?wait=``).
    reservation_changes: ReservationChanges


async def open_services(settings: Settings, stack: AsyncExitStack) -> Services:
    """Build every service of a server process; ``stack`` stops them in reverse order."""
    clients = await open_clients(settings, stack)
    keys, redis, db = clients.keys, clients.redis, clients.db
    await stack.enter_async_context(
        monitoring(redis, db, timeout_s=settings.dependency_timeout_s, stall_ms=settings.stall_ms)
    )
    try:
        await asyncio.wait_for(scripts.load_all(redis), settings.dependency_timeout_s)
    except Exception as exc:  # Redis may come up later; scripts then load on first use
        log.warning("could not load the Lua scripts at start-up", extra={"error": repr(exc)})
    mux = Multiplexer(settings.redis_url, timeout=settings.dependency_timeout_s)
    stack.push_async_callback(mux.aclose)
    events = EventDirectory(db, refresh_s=settings.view_cache_ttl_s)
    lottery_views: ViewCache[bytes] = ViewCache(negative_ttl_s=settings.view_cache_ttl_s)
    rooms = Rooms(
        mux,
        db,
        keys,
        known=events.exists,
        on_drawn=lottery_views.invalidate,
        restore=functools.partial(recovery.restore, db, redis, keys),
    )
    stack.push_async_callback(rooms.close)
    hub = Hub(rooms, max_per_fan=settings.ws_max_per_fan)
    stack.push_async_callback(hub.close)
    seat_news = SeatNews(redis, keys)
    stack.push_async_callback(seat_news.close)
    reservation_changes = ReservationChanges(
        settings.database_url, connect_timeout_s=settings.dependency_timeout_s
    )
    await reservation_changes.start()
    stack.push_async_callback(reservation_changes.close)
    pass_keys = PassKeys.from_settings(settings)
    # An ask is bounded like a statement (the dependency timeout, at least
    # MIN_STATEMENT_TIMEOUT_S): the actor's commit is one.
    # The actors commit through a pool of their own (a bulkhead): a crowd polling its
    # payments can fill the shared pool, and every reservation would then queue for a
    # connection behind the polls.
    actor_db = await create_pool(
        msgspec.structs.replace(settings, db_pool_min=0, db_pool_max=settings.db_actor_pool_max)
    )
    stack.push_async_callback(actor_db.close)
    inventory = InventoryHost(
        actor_db,
        redis,
        keys,
        node_name=settings.node_name,
        ask_timeout_s=max(settings.dependency_timeout_s, MIN_STATEMENT_TIMEOUT_S),
        local_forwarding=settings.local_forwarding,
    )
    await inventory.start()
    stack.push_async_callback(inventory.stop)
    if settings.agent_port is not None:
        agent = BalancerAgent(
            settings.host,
            settings.agent_port,
            lambda: line_weight(inventory.selling(SELLING_WITHIN_S), settings.owner_line_weight),
        )
        await agent.start()
        stack.push_async_callback(agent.stop)
    admission: AdmissionService | None = None
    if settings.admission_loop:
        admission = AdmissionService(
            redis=redis,
            db=db,
            keys=keys,
            pass_keys=pass_keys,
            issuer=settings.pass_issuer,
            rooms=rooms,
            # The leader of an event's admissions hosts its actor before the first pass is
            # out: the sale's first reservations find an owner (and name it to the balancer).
            on_lead=inventory.warm if settings.warm_inventory else None,
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
        challenges=Challenges.from_settings(settings),
        rooms=rooms,
        hub=hub,
        ws_gate=WsGate(
            mux,
            keys,
            allowed_origins=settings.allowed_origins,
            max_per_address=settings.ws_max_per_address,
        ),
        passes=PassGate(pass_keys, redis, keys, settings.pass_issuer, db=db, mux=mux),
        prices=PriceBook(db),
        events=events,
        event_views=ViewCache(negative_ttl_s=settings.view_cache_ttl_s),
        lottery_views=lottery_views,
        inventory=inventory,
        admission=admission,
        seat_news=seat_news,
        seat_snapshots=ViewCache(negative_ttl_s=settings.view_cache_ttl_s),
        reservation_changes=reservation_changes,
    )


def services(conn: HTTPConnection) -> Services:
    """The :class:`Services` of the app serving ``conn``."""
    built = conn.app.state.services
    assert isinstance(built, Services), "the app's lifespan has not built its services"
    return built


async def require_admin(conn: HTTPConnection) -> Actor:
    """Check the operators' bearer token; return who it is, as the audit log records them.

    401 ``admin_disabled`` / ``admin_token_invalid``, 429 ``admin_auth_throttled`` after
    too many failures from one address (:mod:`waitroom.admin_auth`).
    """
    svc = services(conn)
    return await admin_auth.authenticate(conn, svc.settings, svc.redis, svc.keys)


async def require_staff(conn: HTTPConnection) -> Actor:
    """Check a door staff's or an operator's bearer token (check-in): ``staff:NAME`` or
    ``admin:NAME``; the refusals of :func:`require_admin`."""
    svc = services(conn)
    return await admin_auth.authenticate(conn, svc.settings, svc.redis, svc.keys, door=True)
