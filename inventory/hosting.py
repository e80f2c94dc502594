"""Where an event's inventory actor runs: one owner across all processes, the rest forward.

Every process that serves checkout has one :class:`InventoryHost`. To apply a command to an
event's inventory it calls :meth:`InventoryHost.ask`, which

- uses the local actor when this process owns the event;
- otherwise tries to become the owner: a lease in Redis (``SET NX PX``, renewed every third
  of its lifetime) decides who hosts the actor, and a new owner takes a fresh fencing epoch in
  PostgreSQL (:func:`inventory.store.take_ownership`) that every commit checks, so even an
  owner that lost its lease without noticing can never write again;
- and when another process owns it, forwards the command through the event's Redis stream
  (the cross-process mailbox). The owner applies it and pushes the result onto the asking
  process's reply list; the asker waits at most its timeout, then answers 503.

A forwarded command that was in flight when its owner died gets no answer: the asker's
timeout turns it into a 503 and the client retries with the same Idempotency-Key, which the
new owner (who loaded the keys from PostgreSQL) answers with the first result.

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
import msgspec
from prometheus_client import Counter
from redis.asyncio import Redis

from inventory import store
from inventory.actor import ActorStopped, InventoryActor
from inventory.ledger import Command, Result, decode_result, encode_result
from waitroom.errors import Unavailable, WaitroomError
from waitroom.keys import Keys

log = logging.getLogger("waitroom.inventory")

OWNER_CHANGES = Counter(
    "waitroom_inventory_owner_changes_total", "Times this process became an event's owner."
)
FORWARDED = Counter(
    "waitroom_inventory_forwarded_total",
    "Commands forwarded to the owning process, by outcome.",
    ["outcome"],
)

LEASE_TTL_S = 3.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 30.0
#: Entries kept in an event's forwarding stream (it is a mailbox, not a log).
STREAM_MAXLEN = 100_000

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_command_codec = msgspec.msgpack.Encoder()
_command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)


class _Reply(msgspec.Struct, frozen=True):
    """What an owner sends back to an asking process."""

    id: str
    result: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None


_reply_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(_Reply)


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
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        self._reply_key = keys.global_key(f"inventory-replies:{self.node_id}")
        self._listener: asyncio.Task[None] | None = None
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening for replies to forwarded commands."""
        self._listener = asyncio.create_task(self._listen(), name="inventory-replies")

    async def stop(self) -> None:
        """Stop every local actor and listener; pending asks fail with 503, leases are freed."""
        self._closed = True
        for event_id in list(self._hosted):
            await self._unhost(event_id, release=True)
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ActorStopped("the server is shutting down"))
        self._waiting.clear()

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
        return await self._forward(event_id, command, timeout)

    async def _forward(self, event_id: str, command: Command, timeout: float) -> Result:
        request_id = uuid.uuid4().hex
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        deadline_ms = int((time.time() + timeout) * 1000)
        try:
            await self._redis.xadd(
                self._keys.event(event_id).key("inbox"),
                {
                    "c": _command_codec.encode(command),
                    "r": self._reply_key,
                    "i": request_id,
                    "d": str(deadline_ms),
                },
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
            result = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            FORWARDED.labels("timeout").inc()
            raise Unavailable(
                "the inventory owner did not answer in time; retry with the same Idempotency-Key",
                retry_after=1,
                code="inventory_timeout",
            ) from None
        finally:
            self._waiting.pop(request_id, None)
        FORWARDED.labels("ok").inc()
        return result

    async def _listen(self) -> None:
        """Resolve forwarded asks from this process's reply list."""
        while True:
            try:
                item: Any = await self._redis.blpop([self._reply_key], timeout=1)
                if item is None:
                    continue
                batch = [item[1]]
                more: Any = await self._redis.lpop(self._reply_key, 1000)
                if more:
                    batch.extend(more)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis hiccup: askers time out; keep listening
                log.warning("reply listener failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            for raw in batch:
                reply = _reply_decoder.decode(raw)
                future = self._waiting.get(reply.id)
                if future is None or future.done():
                    continue  # its asker gave up already
                if reply.result is not None:
                    future.set_result(decode_result(reply.result))
                else:
                    future.set_exception(
                        Unavailable(
                            reply.error_message or "the inventory is unavailable",
                            retry_after=1,
                            code=reply.error_code or "inventory_unavailable",
                        )
                    )

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
        got = await self._redis.set(keys.owner, self.node_id, nx=True, px=self._lease_ttl_ms)
        if not got:
            owner: Any = await self._redis.get(keys.owner)
            if owner is None or _text(owner) != self.node_id:
                return False
        try:
            epoch = await store.take_ownership(self._pool, event_id, self.node_id)
            # Only mail that arrives from now on is ours: older entries belonged to the
            # previous owner, and their askers retry after a timeout.
            last: Any = await self._redis.xrevrange(keys.key("inbox"), count=1)
            start_id = _text(last[0][0]) if last else "0-0"
            actor = await self._new_actor(event_id, epoch)
        except BaseException:
            await self._release(keys=[keys.owner], args=[self.node_id])
            raise
        hosted = _Hosted(actor)
        self._hosted[event_id] = hosted
        hosted.tasks = [
            asyncio.create_task(self._supervise(event_id, hosted, epoch), name=f"actor:{event_id}"),
            asyncio.create_task(self._keep_lease(event_id), name=f"lease:{event_id}"),
            asyncio.create_task(self._consume(event_id, start_id), name=f"inbox:{event_id}"),
        ]
        OWNER_CHANGES.inc()
        log.info("hosting inventory", extra={"event": event_id, "epoch": epoch})
        return True

    async def _new_actor(self, event_id: str, epoch: int) -> InventoryActor:
        publish = self._publisher(event_id) if self._publish else None
        return await InventoryActor.load(event_id, self._pool, epoch, publish=publish)

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
                renewed = await self._renew(keys=[key], args=[self.node_id, self._lease_ttl_ms])
            except Exception as exc:
                log.warning("lease renewal failed", extra={"event": event_id, "error": repr(exc)})
                renewed = None if time.monotonic() - last_ok < self._lease_ttl_ms / 1000 else 0
            if renewed == 0:
                log.warning("inventory lease lost", extra={"event": event_id})
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(self._unhost(event_id, release=False))
                )
                return
            if renewed:
                last_ok = time.monotonic()

    async def _consume(self, event_id: str, start_id: str) -> None:
        stream = self._keys.event(event_id).key("inbox")
        last_id = start_id
        replying: set[asyncio.Task[None]] = set()
        while True:
            try:
                entries: Any = await self._redis.xread({stream: last_id}, count=1000, block=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("inbox read failed", extra={"event": event_id, "error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            if not entries:
                continue
            actor = self.actor(event_id)
            pending: list[tuple[str, str, Any]] = []
            now_ms = time.time() * 1000
            for entry_id, fields in entries[0][1]:
                last_id = _text(entry_id)
                if int(fields[b"d"]) < now_ms:
                    continue  # its asker has given up
                reply_to, request_id = _text(fields[b"r"]), _text(fields[b"i"])
                try:
                    if actor is None:
                        raise ActorStopped()
                    pending.append(
                        (reply_to, request_id, actor.submit(_command_decoder.decode(fields[b"c"])))
                    )
                except WaitroomError as exc:
                    pending.append((reply_to, request_id, exc))
                except msgspec.DecodeError:
                    log.warning("undecodable forwarded command", extra={"event": event_id})
            if pending:
                task = asyncio.create_task(self._answer(pending))
                replying.add(task)
                task.add_done_callback(replying.discard)

    async def _answer(self, pending: list[tuple[str, str, Any]]) -> None:
        replies: list[tuple[str, bytes]] = []
        for reply_to, request_id, outcome in pending:
            if isinstance(outcome, WaitroomError):
                error: WaitroomError | None = outcome
            else:
                try:
                    result = await outcome
                    error = None
                except WaitroomError as exc:
                    error = exc
            if error is None:
                reply = _Reply(request_id, result=encode_result(result))
            else:
                reply = _Reply(request_id, error_code=error.code, error_message=error.message)
            replies.append((reply_to, _reply_encoder.encode(reply)))
        async with self._redis.pipeline(transaction=False) as pipe:
            for reply_to, data in replies:
                pipe.rpush(reply_to, data)
                pipe.pexpire(reply_to, 60_000)
            await pipe.execute()

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
                await self._release(keys=[self._keys.event(event_id).owner], args=[self.node_id])
        log.info("stopped hosting inventory", extra={"event": event_id})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
