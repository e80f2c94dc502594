"""Where an event's inventory actor runs: one owner across all processes, the rest forward.

Every process that serves checkout has one :class:`InventoryHost`: the registry of the actors
it hosts, their supervisor, and their ownership leases. To apply a command to an event's
inventory it calls :meth:`InventoryHost.ask`, which

- uses the local actor when this process owns the event;
- otherwise tries to become the owner: a lease in Redis (:mod:`waitroom.core.lease`, claimed
  with this process's id as the token, renewed every third of its lifetime) decides who
  hosts the actor, and a new owner takes a fresh fencing epoch in PostgreSQL
  (:func:`inventory.store.take_ownership`) that every commit checks, so even an owner that
  lost its lease without noticing can never write again;
- and when another process owns it, forwards the command to the owner
  (:mod:`inventory.forwarding`), which answers within the asker's timeout or not at all (503).

A process never fences itself off (ADR 0009): within one process an event has at most one
acquisition in flight and one tenure (:class:`_Tenure`) at a time, and a new epoch is taken
only by a new tenure, once its lease is held; see :meth:`InventoryHost._try_host`.

Supervision: a crashed actor is restarted from PostgreSQL under the same epoch, at most
``MAX_RESTARTS`` times per ``RESTART_WINDOW_S``; after that the process gives the event up so
another may host it. At shutdown every pending ask gets a clear 503 instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import Counter
from redis.asyncio import Redis

from admission.operators import complete_pass
from inventory import store
from inventory.actor import ActorStopped, InventoryActor
from inventory.forwarding import Forwarder, OwnerGone
from inventory.ledger import Command, Expire, Result
from waitroom.core import lease, tracing
from waitroom.core.errors import Unavailable
from waitroom.core.keys import Keys
from waitroom.core.runtime import cancel_and_wait
from waitroom.line.seatnews import publish_seat_changes

log = logging.getLogger("waitroom.inventory")

OWNER_CHANGES = Counter(
    "waitroom_inventory_owner_changes_total",
    "Times a process of this server became an event's inventory owner.",
    ["event"],
)
#: Short, because it is how long an event's reservations wait when its owner dies (the
#: others take over once it lapses, issue 12: within 2 s); renewed every third of it. A
#: lease lost to a stalled event loop costs a handover, never a double sale (the epoch).
LEASE_TTL_S = 1.5
MAX_RESTARTS = 5
RESTART_WINDOW_S = 30.0


@dataclass(eq=False)
class _Tenure:
    """One stretch of this process as an event's owner: from claiming the lease to letting go.

    Tenures of one event in one process never overlap: a tenure is in ``_hosted`` from the
    moment its actor is ready until it is wholly torn down (actor stopped, tasks done, lease
    released), and a new one can only start once the old one has ``ended``.
    """

    epoch: int = 0
    actor: InventoryActor | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    restarts: deque[float] = field(default_factory=deque)
    #: The lease was found lost (possibly before the tenure went live).
    lost: bool = False
    #: Being torn down: no new commands, and no new tenure until ``ended``.
    ending: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class InventoryHost:
    """This process's view of every event's inventory: local actors and forwarding."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis: Redis,
        keys: Keys,
        *,
        node_id: str | None = None,
        node_name: str = "",
        lease_ttl_s: float = LEASE_TTL_S,
        ask_timeout_s: float = 5.0,
        publish_availability: bool = True,
        local_forwarding: bool = True,
        standby_s: float = 0.0,
    ) -> None:
        #: The load balancer's name for this node ("" when unnamed): the owner lease names
        #: it in front of the process (``node1/host:pid:id``), so every process can tell
        #: the balancer where an event's actor runs (:meth:`owner_node`).
        self.node_name = node_name
        process = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.node_id = node_id or (f"{node_name}/{process}" if node_name else process)
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._ask_timeout = ask_timeout_s
        self._publish = publish_availability
        self._local_forwarding = local_forwarding
        #: How long this process leaves an event nobody owns to the others before taking it
        #: itself (see _standby): the payment workers' host waits, so that an actor whose
        #: node lost its lease moves to another node, where the fans' reservations arrive
        #: (and the owner-affinity cookie can name it), not into the workers.
        self._standby_s = standby_s
        #: The live tenure of each event this process owns (see _Tenure).
        self._hosted: dict[str, _Tenure] = {}
        #: The owner another process is, as last seen, and when (see _host).
        self._owners: dict[str, tuple[str, float]] = {}
        #: The one acquisition in flight per event (single flight, see _try_host).
        self._starting: dict[str, asyncio.Task[bool]] = {}
        #: When each event was last warmed here (event-loop time): its sale is starting.
        self._warmed: dict[str, float] = {}
        self._transport = Forwarder(redis, keys, self.node_id)
        self._closed = False
        #: Short fire-and-forget work (freeing admission slots, stepping down), kept so it is
        #: not collected.
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening for replies to forwarded commands, and for commands forwarded by
        processes of this machine over the local socket (:mod:`inventory.siblings`)."""
        self._transport.start()
        if self._local_forwarding:
            await self._transport.listen_locally(self.actor, self._actor_starting)

    async def stop(self) -> None:
        """Stop every local actor and listener; pending asks fail with 503, leases are freed."""
        self._closed = True
        # An acquisition in flight sees _closed when it is done and lets its lease go itself.
        await asyncio.gather(*list(self._starting.values()), return_exceptions=True)
        for event_id, tenure in list(self._hosted.items()):
            await self._unhost(event_id, tenure, release=True)
        await self._transport.stop(ActorStopped("the server is shutting down"))

    async def let_go(self, event_id: str) -> None:
        """Stop hosting ``event_id`` here, if this process does, and give its lease back: the
        next ask, wherever it lands, hosts it again. Its actor answers its mail first."""
        tenure = self._hosted.get(event_id)
        if tenure is not None:
            await self._unhost(event_id, tenure, release=True)

    def owns(self, event_id: str) -> bool:
        """Whether this process hosts ``event_id``'s actor right now."""
        return self.actor(event_id) is not None

    def actor(self, event_id: str) -> InventoryActor | None:
        """The local actor of ``event_id``, if this process hosts it."""
        tenure = self._hosted.get(event_id)
        if tenure is None:
            return None
        actor = tenure.actor
        return actor if actor is not None and actor.running else None

    def warm(self, event_id: str) -> None:
        """Host ``event_id``'s actor here unless a process already does, in the background:
        what the admission loop's leader asks as it starts leading an event (its sale opens
        or is about to), so that the first reservations find an actor loaded and an owner
        to name, instead of all racing to become it at the sale's busiest second."""
        # The checkout starts here, or is about to: the balancer may take the line elsewhere
        # before the first reservation (see selling).
        if self._closed:
            return
        self._warmed[event_id] = asyncio.get_running_loop().time()
        if event_id in self._hosted or event_id in self._starting:
            return

        async def host() -> None:
            try:
                if await self._host(event_id, self._ask_timeout) is not None:
                    # Another process hosts it: nothing to tell the balancer, and nothing
                    # to keep (an event warmed elsewhere must not stay in the map).
                    self._warmed.pop(event_id, None)
            except Exception as exc:  # the first reservation hosts it then
                self._warmed.pop(event_id, None)
                log.warning(
                    "could not warm the inventory", extra={"event": event_id, "error": repr(exc)}
                )

        self._later(host(), f"warm:{event_id}")

    def selling(self, within_s: float) -> bool:
        """Whether an actor hosted here was asked for a reservation, or warmed (its sale
        is starting), in the last ``within_s`` seconds: this process is a sale's checkout,
        and tells the load balancer so (:mod:`waitroom.balancer_agent`)."""
        now = asyncio.get_running_loop().time()
        return any(
            tenure.actor is not None
            and tenure.actor.running
            and now
            - max(tenure.actor.reserved_at or -math.inf, self._warmed.get(event_id, -math.inf))
            < within_s
            for event_id, tenure in self._hosted.items()
        )

    def _actor_starting(self, event_id: str) -> Awaitable[object] | None:
        """While this process is becoming ``event_id``'s owner (its lease taken, its actor
        not up yet): what ends when it is done (shielded: a waiter going away must not
        cancel it for the others). None otherwise."""
        starting = self._starting.get(event_id)
        return None if starting is None else asyncio.shield(starting)

    async def owner_node(self, event_id: str) -> str | None:
        """The load balancer's name for the node hosting ``event_id``'s actor (see
        :mod:`waitroom.core.affinity`); None when nobody hosts it, its node has no name, or
        this node has none (routing by owner is off: nothing is read)."""
        if not self.node_name:
            return None
        if self.owns(event_id):
            return self.node_name
        known = self._owners.get(event_id)
        if known is not None and time.monotonic() - known[1] < self._lease_ttl_ms / 3000:
            owner: str | None = known[0]
        else:
            owner = await self._look_up_owner(event_id)
        return node_name_of(owner) if owner else None

    # --- asking ------------------------------------------------------------------------------

    async def ask(self, event_id: str, command: Command, timeout: float | None = None) -> Result:
        """Apply ``command`` to ``event_id``'s inventory wherever its actor runs (see _ask)."""
        with tracing.span("inventory.ask", event=event_id, command=type(command).__name__):
            return await self._ask(event_id, command, timeout)

    async def _ask(self, event_id: str, command: Command, timeout: float | None) -> Result:
        """Apply ``command`` to ``event_id``'s inventory wherever its actor runs.

        A command forwarded to an owner that dies is not left to time out: once the owner's
        lease lapses (at most ``lease_ttl_s`` after its last renewal) the ask notices, hosts
        the event here (or forwards to whoever took it) and asks again, within the same
        ``timeout``. Only commands that are safe to apply twice are asked again (an
        idempotency key, or expiry); another gets 503 ``inventory_timeout`` at once.
        """
        if self._closed:
            raise ActorStopped("the server is shutting down")
        deadline = time.monotonic() + (self._ask_timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out()
            actor = self.actor(event_id)
            if actor is not None:
                return await actor.ask(command, remaining)
            owner = await self._host(event_id, remaining)
            if owner is None:
                actor = self.actor(event_id)
                if actor is None:  # ours, but its actor is restarting after a crash
                    raise ActorStopped()
                return await actor.ask(command, deadline - time.monotonic())
            try:
                return await self._transport.ask(
                    event_id,
                    command,
                    deadline - time.monotonic(),
                    owner_gone=functools.partial(self._owner_gone, event_id, owner),
                    check_every=self._lease_ttl_ms / 3000,
                    owner=owner,
                )
            except OwnerGone:
                self._owners.pop(event_id, None)
                if not _repeatable(command):
                    raise _timed_out() from None
                log.info("inventory owner gone; asking again", extra={"event": event_id})

    async def _owner_gone(self, event_id: str, owner: str) -> bool:
        """Whether ``owner`` (a node id, or "" for whoever held it) no longer holds the event."""
        now: Any = await self._redis.get(self._keys.event(event_id).owner)
        if now is None:
            return True
        return bool(owner) and _text(now) != owner

    async def _look_up_owner(self, event_id: str) -> str | None:
        """The owner's node id from Redis (None: nobody), remembered for the next asks."""
        raw: Any = await self._redis.get(self._keys.event(event_id).owner)
        owner = None if raw is None else _text(raw)
        if owner is not None and owner != self.node_id:
            self._owners[event_id] = (owner, time.monotonic())
        else:
            self._owners.pop(event_id, None)
        return owner

    # --- hosting -----------------------------------------------------------------------------

    async def _host(self, event_id: str, timeout: float) -> str | None:
        """None when this process hosts ``event_id`` (becoming its owner if nobody is);
        otherwise the node id of the owner to forward to ("" when it is not known)."""
        if event_id not in self._hosted and event_id not in self._starting:
            # A cheap look first: when another process owns the event, just forward to it.
            # The owner seen is remembered for a third of the lease (the renewal interval):
            # under load most asks skip this round trip, and an owner that died is noticed
            # by the ask itself (OwnerGone), which forgets it.
            known = self._owners.get(event_id)
            if known is not None and time.monotonic() - known[1] < self._lease_ttl_ms / 3000:
                return known[0]
            owner = await self._look_up_owner(event_id)
            if owner is None and self._standby_s > 0:
                owner = await self._standby(event_id, min(self._standby_s, timeout))
            if owner is not None and owner != self.node_id:
                return owner
        try:
            async with asyncio.timeout(timeout):
                return None if await self._try_host(event_id) else ""
        except TimeoutError:
            raise Unavailable(
                "the inventory is changing hands; retry with the same Idempotency-Key",
                retry_after=1,
                code="inventory_timeout",
            ) from None

    async def _standby(self, event_id: str, seconds: float) -> str | None:
        """The owner another process became within ``seconds`` (looked up every tenth of
        the lease), or None: nobody took the event, and this process may."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self._lease_ttl_ms / 10_000))
            owner = await self._look_up_owner(event_id)
            if owner is not None:
                return owner
        return None

    async def _try_host(self, event_id: str) -> bool:
        """Become the owner of ``event_id`` if nobody is; True when this process hosts it.

        No self-fencing (ADR 0009). This used to re-enter the acquisition whenever the caller
        had seen no local actor before its lease check: an ask that checked while the first
        acquisition was still under way, and came back after it had finished, found the lease
        holding this process's own id, took a second epoch and a second actor, which fenced
        the first actor's next commit (503s), whose supervisor then unhosted the second. Now:

        - everything below, up to starting the acquisition, runs without an await, and the
          registry is read afresh each time, so a caller that slept on Redis meanwhile sees
          the tenure that started while it slept, and joins it instead of starting another;
        - one acquisition per event per process at a time, run as its own task (a caller that
          goes away does not cancel it for the others), and a tenure goes into ``_hosted``
          in the same step as the acquisition leaves ``_starting``: there is no gap;
        - a tenure that is being torn down is waited for, never replaced while its actor may
          still commit: a new epoch is only taken when ownership really changes hands.
        """
        while True:
            tenure = self._hosted.get(event_id)
            if tenure is not None:
                if not tenure.ending:
                    return True
                await tenure.ended.wait()
                continue
            if self._closed:
                raise ActorStopped("the server is shutting down")
            starting = self._starting.get(event_id)
            if starting is None:
                # Outside the asker's span: the actor's tasks started from here outlive it.
                starting = asyncio.create_task(
                    self._acquire(event_id), name=f"host:{event_id}", context=tracing.detached()
                )
                self._starting[event_id] = starting
                starting.add_done_callback(lambda task: self._started(event_id, task))
            return await asyncio.shield(starting)

    def _started(self, event_id: str, task: asyncio.Task[bool]) -> None:
        if self._starting.get(event_id) is task:
            del self._starting[event_id]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters re-raise it themselves

    async def _acquire(self, event_id: str) -> bool:
        keys = self._keys.event(event_id)
        # The lease, and where the inbox ends, in one atomic step: every command forwarded
        # after it was sent by a process that could already see this one as the owner, and
        # is served; the ones before were sent to a previous owner. (Reading it after taking
        # the epoch, as before, lost what other processes forwarded in between.) A lease
        # that holds this process's id already is a leftover of an earlier tenure of ours
        # that is over (nothing of ours hosts the event: _try_host made sure), so it is
        # taken like a free one.
        claim = await lease.claim(
            self._redis, keys.owner, self.node_id, lease_ms=self._lease_ttl_ms, mark=keys.inbox
        )
        if claim is None:
            return False
        tenure = _Tenure()
        # Renewed from now on, not only once the actor is up: loading a large ledger must not
        # let the lease lapse under a tenure that is about to take the epoch.
        keeper = asyncio.create_task(self._keep_lease(event_id, tenure), name=f"lease:{event_id}")
        tenure.tasks.append(keeper)
        try:
            # The epoch only once the lease is ours, and once per tenure: restarts reuse it.
            epoch = await store.take_ownership(self._pool, event_id, self.node_id)
            actor = await self._new_actor(event_id, epoch)
        except BaseException:
            await self._let_go(event_id, keeper)
            raise
        if tenure.lost or self._closed:
            actor.close()
            await self._let_go(event_id, keeper)
            return False
        tenure.epoch, tenure.actor = epoch, actor
        tenure.tasks += [
            asyncio.create_task(self._supervise(event_id, tenure), name=f"actor:{event_id}"),
            asyncio.create_task(
                self._transport.serve(event_id, claim.mark, lambda: self.actor(event_id)),
                name=f"inbox:{event_id}",
            ),
        ]
        self._hosted[event_id] = tenure
        if self._starting.get(event_id) is asyncio.current_task():
            del self._starting[event_id]  # in the same step: no gap between the two
        OWNER_CHANGES.labels(event_id).inc()
        log.info("hosting inventory", extra={"event": event_id, "epoch": epoch})
        return True

    async def _let_go(self, event_id: str, keeper: asyncio.Task[None]) -> None:
        """Undo a claim whose tenure never went live."""
        await cancel_and_wait(keeper)
        with contextlib.suppress(Exception):
            await lease.release(self._redis, self._keys.event(event_id).owner, self.node_id)

    async def _new_actor(self, event_id: str, epoch: int) -> InventoryActor:
        publish = self._publisher(event_id) if self._publish else None
        publish_seats = self._seat_publisher(event_id) if self._publish else None
        return await InventoryActor.load(
            event_id,
            self._pool,
            epoch,
            publish=publish,
            publish_seats=publish_seats,
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

    def _seat_publisher(self, event_id: str) -> Any:
        """Seats moved by the actor's commits, to the viewers of the event's seat map."""

        async def publish(changes: dict[str, str]) -> None:
            await publish_seat_changes(self._redis, self._keys, event_id, changes)

        return publish

    async def _supervise(self, event_id: str, tenure: _Tenure) -> None:
        actor = tenure.actor
        assert actor is not None
        while True:
            try:
                await actor.run()
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
            restarted = await self._restart(event_id, tenure)
            if restarted is None:
                if tenure.ending:
                    return  # let go meanwhile (lease lost, shutdown): its own _unhost runs
                break
            actor = restarted
        self._later(self._unhost(event_id, tenure, release=True), f"unhost:{event_id}")

    async def _restart(self, event_id: str, tenure: _Tenure) -> InventoryActor | None:
        """A new actor for a crashed one, under the same epoch; None to give the event up.

        A load that fails (PostgreSQL restarting, say) is tried again, each try counted
        against the restart budget. It used to leave the crashed actor in place, whose
        ``run()`` then returned at once as if closed on purpose: the supervisor ended, the
        lease was still renewed, and every reservation got 503 until the server restarted.
        Giving up releases the lease, so the next reservation (here or elsewhere) hosts the
        event afresh once PostgreSQL answers.
        """
        tenure.actor = None  # asks meanwhile get a clear 503, not a closed actor
        while True:
            now = time.monotonic()
            tenure.restarts.append(now)
            while tenure.restarts and tenure.restarts[0] < now - RESTART_WINDOW_S:
                tenure.restarts.popleft()
            if len(tenure.restarts) > MAX_RESTARTS or self._closed:
                log.error(
                    "giving the inventory up after repeated crashes", extra={"event": event_id}
                )
                return None
            await asyncio.sleep(0.1 * len(tenure.restarts))
            if tenure.ending:
                return None
            try:
                # Same tenure, same epoch: a restart is not a change of hands.
                actor = await self._new_actor(event_id, tenure.epoch)
            except store.Fenced:
                return None
            except Exception:
                log.exception("inventory actor could not restart", extra={"event": event_id})
                continue
            if tenure.ending:
                actor.close()
                return None
            tenure.actor = actor
            return actor

    async def _keep_lease(self, event_id: str, tenure: _Tenure) -> None:
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
                tenure.lost = True  # a tenure still starting sees it and never goes live
                self._later(self._unhost(event_id, tenure, release=False), f"unhost:{event_id}")
                return
            if renewed:
                last_ok = time.monotonic()

    def _later(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unhost(self, event_id: str, tenure: _Tenure, *, release: bool) -> None:
        """Tear ``tenure`` down, and only it: a stale supervisor or lease keeper can never
        touch a later tenure. It leaves ``_hosted`` only once wholly done, so that no new
        tenure (and epoch) of this process starts while its actor may still commit."""
        if self._hosted.get(event_id) is not tenure:
            return  # never went live, or already gone
        if tenure.ending:
            await tenure.ended.wait()
            return
        tenure.ending = True
        self._warmed.pop(event_id, None)
        try:
            if tenure.actor is not None:
                tenure.actor.close()
            me = asyncio.current_task()
            supervisor = next((t for t in tenure.tasks if t.get_name().startswith("actor:")), None)
            if supervisor is not None and supervisor is not me:
                # Let the actor finish its mail (each ask gets an answer), then stop.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(supervisor), 10)
            others = [t for t in tenure.tasks if t is not me]
            # Cancelled again after a while if one swallowed the first cancellation (their
            # clean-up, a connection given back, has that long).
            await asyncio.gather(*(cancel_and_wait(t, every_s=5.0) for t in others))
            if release:
                with contextlib.suppress(Exception):
                    await lease.release(self._redis, self._keys.event(event_id).owner, self.node_id)
        finally:
            if self._hosted.get(event_id) is tenure:
                del self._hosted[event_id]
            tenure.ended.set()
        log.info("stopped hosting inventory", extra={"event": event_id, "epoch": tenure.epoch})


def _repeatable(command: Command) -> bool:
    """Whether applying ``command`` twice is the same as once (so it may be asked again)."""
    return isinstance(command, Expire) or command.idempotency_key is not None


def _timed_out() -> Unavailable:
    return Unavailable(
        "the inventory owner did not answer in time; retry with the same Idempotency-Key",
        retry_after=1,
        code="inventory_timeout",
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def node_name_of(node_id: str) -> str | None:
    """The load balancer's name in a node id (``node1/host:pid:id``), None if it has none."""
    name, sep, _ = node_id.partition("/")
    return name if sep and name else None
