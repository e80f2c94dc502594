"""Where an event's inventory actor runs: one owner across all processes, the rest forward.

Every process that serves checkout has one :class:`InventoryHost`: the registry of the actors
it hosts, their supervisor, and their ownership leases. To apply a command to an event's
inventory it calls :meth:`InventoryHost.ask`, which

- uses the local actor when this process owns the event;
- otherwise tries to become the owner: a lease in Redis (:mod:`waitroom.core.lease`, renewed
  every third of its lifetime) decides who hosts the actor, and a new owner takes a fresh
  fencing epoch in PostgreSQL (:func:`inventory.store.take_ownership`) that every commit
  checks, so even an owner that lost its lease without noticing can never write again;
- and when another process owns it, forwards the command to the owner
  (:mod:`inventory.forwarding`), which answers within the asker's timeout or not at all (503).

Supervision: a crashed actor is restarted from PostgreSQL, at most ``MAX_RESTARTS`` times per
``RESTART_WINDOW_S``; after that the process gives the event up so another may host it.
At shutdown every pending ask gets a clear 503 instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import Counter
from redis.asyncio import Redis

from admission.operators import complete_pass
from inventory import store
from inventory.actor import ActorStopped, InventoryActor
from inventory.forwarding import Forwarder
from inventory.ledger import Command, Result
from waitroom.core import lease
from waitroom.core.keys import Keys

log = logging.getLogger("waitroom.inventory")

OWNER_CHANGES = Counter(
    "waitroom_inventory_owner_changes_total", "Times this process became an event's owner."
)
LEASE_TTL_S = 3.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 30.0


@dataclass
class _Hosted:
    actor: InventoryActor
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    restarts: deque[float] = field(default_factory=deque)


class InventoryHost:
    """This process's view of every event's inventory: local actors and forwarding."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis: Redis,
        keys: Keys,
        *,
        node_id: str | None = None,
        lease_ttl_s: float = LEASE_TTL_S,
        ask_timeout_s: float = 5.0,
        publish_availability: bool = True,
    ) -> None:
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._ask_timeout = ask_timeout_s
        self._publish = publish_availability
        self._hosted: dict[str, _Hosted] = {}
        self._starting: dict[str, asyncio.Future[bool]] = {}
        self._transport = Forwarder(redis, keys, self.node_id)
        self._closed = False
        #: Short fire-and-forget work (freeing admission slots), kept so it is not collected.
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening for replies to forwarded commands."""
        self._transport.start()

    async def stop(self) -> None:
        """Stop every local actor and listener; pending asks fail with 503, leases are freed."""
        self._closed = True
        for event_id in list(self._hosted):
            await self._unhost(event_id, release=True)
        await self._transport.stop(ActorStopped("the server is shutting down"))

    def owns(self, event_id: str) -> bool:
        """Whether this process hosts ``event_id``'s actor right now."""
        hosted = self._hosted.get(event_id)
        return hosted is not None and hosted.actor.running

    def actor(self, event_id: str) -> InventoryActor | None:
        """The local actor of ``event_id``, if this process hosts it."""
        hosted = self._hosted.get(event_id)
        return hosted.actor if hosted is not None and hosted.actor.running else None

    # --- asking ------------------------------------------------------------------------------

    async def ask(self, event_id: str, command: Command, timeout: float | None = None) -> Result:
        """Apply ``command`` to ``event_id``'s inventory wherever its actor runs."""
        if self._closed:
            raise ActorStopped("the server is shutting down")
        timeout = self._ask_timeout if timeout is None else timeout
        actor = self.actor(event_id)
        if actor is not None:
            return await actor.ask(command, timeout)
        owner: Any = await self._redis.get(self._keys.event(event_id).owner)
        if (owner is None or _text(owner) == self.node_id) and await self._try_host(event_id):
            actor = self.actor(event_id)
            if actor is not None:
                return await actor.ask(command, timeout)
        return await self._transport.ask(event_id, command, timeout)

    # --- hosting -----------------------------------------------------------------------------

    async def _try_host(self, event_id: str) -> bool:
        """Become the owner of ``event_id`` if nobody is; True when this process hosts it."""
        starting = self._starting.get(event_id)
        if starting is not None:
            return await asyncio.shield(starting)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._starting[event_id] = future
        try:
            hosted = await self._acquire(event_id)
            future.set_result(hosted)
            return hosted
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the other waiters re-raise it themselves
            raise
        finally:
            del self._starting[event_id]

    async def _acquire(self, event_id: str) -> bool:
        keys = self._keys.event(event_id)
        got = await lease.acquire(
            self._redis, keys.owner, self.node_id, lease_ms=self._lease_ttl_ms
        )
        if not got:
            owner: Any = await self._redis.get(keys.owner)
            if owner is None or _text(owner) != self.node_id:
                return False
        try:
            epoch = await store.take_ownership(self._pool, event_id, self.node_id)
            start_id = await self._transport.tail(event_id)
            actor = await self._new_actor(event_id, epoch)
        except BaseException:
            await lease.release(self._redis, keys.owner, self.node_id)
            raise
        hosted = _Hosted(actor)
        self._hosted[event_id] = hosted
        hosted.tasks = [
            asyncio.create_task(self._supervise(event_id, hosted, epoch), name=f"actor:{event_id}"),
            asyncio.create_task(self._keep_lease(event_id), name=f"lease:{event_id}"),
            asyncio.create_task(
                self._transport.serve(event_id, start_id, lambda: self.actor(event_id)),
                name=f"inbox:{event_id}",
            ),
        ]
        OWNER_CHANGES.inc()
        log.info("hosting inventory", extra={"event": event_id, "epoch": epoch})
        return True

    async def _new_actor(self, event_id: str, epoch: int) -> InventoryActor:
        publish = self._publisher(event_id) if self._publish else None
        return await InventoryActor.load(
            event_id,
            self._pool,
            epoch,
            publish=publish,
            on_turn_over=lambda jtis: self._free_slots(event_id, jtis),
        )

    def _free_slots(self, event_id: str, jtis: list[str]) -> None:
        """Passes whose holds all expired cannot shop again: their admission slots go free.

        Without this they would count against ``max_active`` until the passes expire,
        holding back fans who could buy the tickets that just came back.
        """

        async def free() -> None:
            try:
                await asyncio.gather(
                    *(complete_pass(self._redis, self._keys, event_id, jti) for jti in jtis)
                )
            except Exception as exc:  # the pass's own expiry frees the slot in the end
                log.warning(
                    "could not free the slots of expired holds' passes",
                    extra={"event": event_id, "error": repr(exc)},
                )

        task = asyncio.create_task(free(), name=f"free-slots:{event_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _publisher(self, event_id: str) -> Any:
        keys = self._keys.event(event_id)

        async def publish(availability: dict[str, int], sold_out: bool) -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                if availability:
                    pipe.hset(keys.availability, mapping=dict(availability.items()))
                pipe.hset(keys.meta, "sold_out", "1" if sold_out else "0")
                await pipe.execute()

        return publish

    async def _supervise(self, event_id: str, hosted: _Hosted, epoch: int) -> None:
        while True:
            try:
                await hosted.actor.run()
                return  # closed on purpose
            except store.Fenced:
                log.warning(
                    "inventory fenced off; another process owns it", extra={"event": event_id}
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("inventory actor crashed", extra={"event": event_id})
            now = time.monotonic()
            hosted.restarts.append(now)
            while hosted.restarts and hosted.restarts[0] < now - RESTART_WINDOW_S:
                hosted.restarts.popleft()
            if len(hosted.restarts) > MAX_RESTARTS or self._closed:
                log.error(
                    "giving the inventory up after repeated crashes", extra={"event": event_id}
                )
                break
            await asyncio.sleep(0.1 * len(hosted.restarts))
            try:
                hosted.actor = await self._new_actor(event_id, epoch)
            except Exception:
                log.exception("inventory actor could not restart", extra={"event": event_id})
        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(self._unhost(event_id, release=True))
        )

    async def _keep_lease(self, event_id: str) -> None:
        key = self._keys.event(event_id).owner
        interval = self._lease_ttl_ms / 3000
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                renewed: bool | None = await lease.renew(
                    self._redis, key, self.node_id, lease_ms=self._lease_ttl_ms
                )
            except Exception as exc:
                log.warning("lease renewal failed", extra={"event": event_id, "error": repr(exc)})
                # Keep hosting while the lease may still be ours; give up once it surely lapsed.
                renewed = None if time.monotonic() - last_ok < self._lease_ttl_ms / 1000 else False
            if renewed is False:
                log.warning("inventory lease lost", extra={"event": event_id})
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(self._unhost(event_id, release=False))
                )
                return
            if renewed:
                last_ok = time.monotonic()

    async def _unhost(self, event_id: str, *, release: bool) -> None:
        hosted = self._hosted.pop(event_id, None)
        if hosted is None:
            return
        hosted.actor.close()
        for task in hosted.tasks:
            if task is not asyncio.current_task() and task.get_name().startswith("actor:"):
                # Let the actor finish its mail (each ask gets an answer), then stop.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(task), 10)
        for task in hosted.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(
            *(t for t in hosted.tasks if t is not asyncio.current_task()), return_exceptions=True
        )
        if release:
            with contextlib.suppress(Exception):
                await lease.release(self._redis, self._keys.event(event_id).owner, self.node_id)
        log.info("stopped hosting inventory", extra={"event": event_id})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
