"""Cross-process transport of inventory commands: to the owner of an event and back.

A process that does not own an event's actor forwards a command through the event's inbox
stream (``XADD``, in the event's Redis slot) with a deadline, its reply list and a request id,
then waits at most its timeout. The owner reads the inbox in batches (:meth:`Forwarder.serve`),
submits each live command to its local actor, and pushes the results onto the askers' reply
lists in one pipeline; each process's listener resolves its waiting asks from its own list.

A command in flight when its owner died gets no answer: the asker's timeout turns it into
503 ``inventory_timeout`` and the client retries with the same Idempotency-Key, which the new
owner (who loaded the keys from PostgreSQL) answers with the first result. A new owner serves
only mail that arrives after it took the lease: where the inbox ended is read in the same
atomic step as the lease claim (:func:`waitroom.core.lease.claim`), so nothing forwarded to
it by a process that saw it as the owner is skipped, and nothing sent to a previous owner is
applied twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from prometheus_client import Counter
from redis.asyncio import Redis

from inventory.actor import InventoryActor
from inventory.ledger import Command, Result, decode_result, encode_result
from inventory.mail import (
    Forwarded,
    Outcome,
    Reply,
    command_encoder,
    error_reply,
    reply_decoder,
    reply_encoder,
    submit,
)
from inventory.siblings import Siblings
from waitroom.core import tracing
from waitroom.core.errors import Unavailable, WaitroomError
from waitroom.core.keys import Keys
from waitroom.core.runtime import cancel_and_wait, stop_if_cancelled

log = logging.getLogger("waitroom.inventory")

FORWARDED = Counter(
    "waitroom_inventory_forwarded_total",
    "Commands forwarded to the owning process, by outcome.",
    ["outcome"],
)
#: The outcome of nearly every ask, labelled once (``labels()`` costs more than ``inc()``).
_FORWARDED_OK = FORWARDED.labels("ok")

FORWARD_BATCHES = Counter(
    "waitroom_inventory_forward_batches_total",
    "Inbox entries written; each carries every command asked in one turn of the event loop.",
)
#: The most entries an event's inbox stream holds: a hard bound on its memory (~2 MB). The
#: owner trims what it has read after every batch, so the inbox holds only what is still
#: unread; a backlog past this means the owner is so far behind that those askers have
#: given up (their deadline is seconds), and the oldest go first. (It used to keep the last
#: 100,000 commands forever: 347 MB in Redis after one large sale.)
STREAM_MAXLEN = 10_000
#: How long a reply list outlives its last reply (an asker that went away leaves it behind).
REPLY_TTL_MS = 60_000
#: The most replies the listener takes from its list in one read.
REPLIES_PER_READ = 1000

_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[Forwarded])


#: How often the asks in flight are looked at for their deadline and their owner's lease.
WATCH_TICK_S = 0.1


class _Ask:
    """One forwarded command in flight, as the watch sees it."""

    __slots__ = ("check_every", "deadline", "next_check", "owner_gone", "reply", "sent")

    def __init__(
        self,
        reply: asyncio.Future[Result],
        deadline: float,
        owner_gone: Callable[[], Awaitable[bool]] | None,
        check_every: float,
    ) -> None:
        self.reply = reply
        #: Done once the command is in the inbox (set by _send).
        self.sent: asyncio.Future[None] | None = None
        self.deadline = deadline
        self.owner_gone = owner_gone
        self.check_every = check_every
        self.next_check = time.monotonic() + check_every

    def fail(self, error: BaseException) -> None:
        for future in (self.sent, self.reply):
            if future is not None and not future.done():
                future.set_exception(error)


class OwnerGone(Exception):
    """The owner a command was forwarded to no longer holds the event: it will not answer."""


class Forwarder:
    """One process's end of the transport: asking owners elsewhere, and serving as owner."""

    def __init__(self, redis: Redis, keys: Keys, node_id: str) -> None:
        self._redis = redis
        self._keys = keys
        self._reply_key = keys.inventory_replies(node_id)
        self._waiting: dict[str, _Ask] = {}
        # Request ids need only be unique among this process's asks (replies come back to
        # its own list): a counter, with a random prefix against a restarted namesake.
        self._prefix = uuid.uuid4().hex[:8]
        self._numbers = itertools.count()
        self._watching: asyncio.TimerHandle | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        #: Commands asked during this turn of the event loop, by event, with the future of
        #: their XADD: all of them go out in ONE inbox entry (see _send).
        self._outgoing: dict[str, list[tuple[Forwarded, asyncio.Future[None]]]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        #: The local socket to owners on this machine, once listen_locally() opened it.
        self._siblings: Siblings | None = None
        self._node_id = node_id

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening for replies to forwarded commands."""
        self._listener = asyncio.create_task(self._listen(), name="inventory-replies")

    async def listen_locally(
        self,
        actor_of: Callable[[str], InventoryActor | None],
        starting: Callable[[str], Awaitable[object] | None] = lambda _event: None,
    ) -> None:
        """Serve the commands of processes on this machine to ``actor_of(event)`` over a
        local socket (waiting for ``starting(event)`` when it is not None: the actor is
        being started), and forward over theirs to owners on this machine (see
        :mod:`inventory.siblings`); without it, everything goes through Redis."""
        siblings = Siblings(self._node_id, actor_of, self._resolve, self._lost, starting)
        if await siblings.listen():
            self._siblings = siblings

    async def stop(self, reason: WaitroomError) -> None:
        """Stop listening; every ask still waiting fails with ``reason``."""
        if self._siblings is not None:
            await self._siblings.close()
        if self._listener is not None:
            # Again each second if its read swallowed the first cancellation and the check
            # after it did not see it (it holds no PostgreSQL connection whose return a
            # second cancellation could cut short).
            await cancel_and_wait(self._listener)
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        for check in list(self._checks):
            await cancel_and_wait(check)
        for ask in self._waiting.values():
            ask.fail(reason)
        self._waiting.clear()

    # --- asking ------------------------------------------------------------------------------

    async def ask(
        self,
        event_id: str,
        command: Command,
        timeout: float,
        *,
        owner_gone: Callable[[], Awaitable[bool]] | None = None,
        check_every: float = 0.5,
        owner: str = "",
    ) -> Result:
        """Send ``command`` to ``event_id``'s owner and wait at most ``timeout`` for it.

        With ``owner_gone``: each ``check_every`` without an answer, it is asked whether the
        owner this was sent to still holds the event; when not (it died and its lease lapsed,
        or another took over), :class:`OwnerGone` is raised at once: the new owner serves
        only mail sent after its claim, so this command will never be answered.

        ``owner``, the owner's node id when known: an owner on this machine is sent the
        command over its local socket (:mod:`inventory.siblings`), not through Redis; if
        that connection is lost before the answer, :class:`OwnerGone` at once too.
        """
        channel = None
        if owner and self._siblings is not None:
            channel = await self._siblings.channel(owner)
        loop = asyncio.get_running_loop()
        request_id = f"{self._prefix}{next(self._numbers):x}"
        ask = _Ask(loop.create_future(), time.monotonic() + timeout, owner_gone, check_every)
        self._waiting[request_id] = ask
        self._watch()
        deadline_ms = int((time.time() + timeout) * 1000)
        try:
            # No timer of its own: the watch fails the ask at its deadline, or when its
            # owner is gone (a timer and a wait per ask cost more than the rest of it).
            forwarded = Forwarded(
                command_encoder.encode(command), request_id, deadline_ms, tracing.traceparent()
            )
            if channel is None or not channel.send(event_id, forwarded):
                ask.sent = self._send(event_id, forwarded)
                await ask.sent
            result = await ask.reply
        finally:
            self._waiting.pop(request_id, None)
            # Settle what was not awaited (the reply of an ask that failed while sending, or
            # one cancelled by its request): no "exception never retrieved" for either.
            for future in (ask.sent, ask.reply):
                if future is None:
                    continue
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()
        _FORWARDED_OK.inc()
        return result

    def _watch(self) -> None:
        """Look at the asks in flight every :data:`WATCH_TICK_S` while there are any."""
        if self._watching is None:
            loop = asyncio.get_running_loop()
            self._watching = loop.call_later(WATCH_TICK_S, self._look)

    def _look(self) -> None:
        self._watching = None
        now = time.monotonic()
        for ask in list(self._waiting.values()):
            if ask.reply.done():
                continue
            if now >= ask.deadline:
                FORWARDED.labels("timeout").inc()
                ask.fail(_ask_timed_out())
            elif ask.owner_gone is not None and now >= ask.next_check:
                # Rare (an ask takes milliseconds): only one waiting for seconds is checked.
                ask.next_check = now + ask.check_every
                check = asyncio.create_task(self._check_owner(ask, ask.owner_gone))
                self._checks.add(check)
                check.add_done_callback(self._checks.discard)
        if self._waiting:
            self._watch()

    @staticmethod
    async def _check_owner(ask: _Ask, owner_gone: Callable[[], Awaitable[bool]]) -> None:
        try:
            gone = await owner_gone()
        except Exception:  # Redis unreachable: the deadline still ends the ask
            return
        if gone and not ask.reply.done():
            FORWARDED.labels("owner_gone").inc()
            ask.fail(OwnerGone())

    def _send(self, event_id: str, forwarded: Forwarded) -> asyncio.Future[None]:
        """Queue ``forwarded`` for the event's inbox; done once it is in Redis.

        Every command asked in the same turn of the event loop goes out in one ``XADD``:
        under load, dozens of reservations per entry instead of one round trip (and one
        redis-py call, the costly part) each.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = self._outgoing.get(event_id)
        if batch is None:
            batch = self._outgoing[event_id] = []
            asyncio.get_running_loop().call_soon(self._flush, event_id)
        batch.append((forwarded, future))
        return future

    def _flush(self, event_id: str) -> None:
        batch = self._outgoing.pop(event_id, [])
        if batch:
            task = asyncio.create_task(self._write(event_id, batch), name=f"forward:{event_id}")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _write(
        self, event_id: str, batch: list[tuple[Forwarded, asyncio.Future[None]]]
    ) -> None:
        try:
            await self._redis.xadd(
                self._keys.event(event_id).inbox,
                {"b": _batch_encoder.encode([f for f, _ in batch]), "r": self._reply_key},
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
        except Exception as exc:  # every asker of the batch gets it (a 503 upstream)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        FORWARD_BATCHES.inc()
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _listen(self) -> None:
        """Resolve forwarded asks from this process's reply list."""
        while True:
            try:
                # BLMPOP: whatever is waiting, up to a thousand replies, in the one round
                # trip that waited for the first (BLPOP and then LPOP took two, and every
                # forwarded ask waited for both).
                item: Any = await self._redis.blmpop(
                    1, 1, self._reply_key, direction="LEFT", count=REPLIES_PER_READ
                )
                stop_if_cancelled()
                if item is None:
                    continue
                batch = item[1]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis hiccup: askers time out; keep listening
                stop_if_cancelled()
                log.warning("reply listener failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            for raw in batch:
                self._resolve(reply_decoder.decode(raw))

    def _lost(self, request_ids: Iterable[str]) -> None:
        """The local connection these asks went out on is gone: their owner with it."""
        for request_id in request_ids:
            ask = self._waiting.get(request_id)
            if ask is not None:
                ask.fail(OwnerGone())

    def _resolve(self, reply: Reply) -> None:
        ask = self._waiting.get(reply.id)
        if ask is None or ask.reply.done():
            return  # its asker gave up already
        future = ask.reply
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

    # --- serving as the owner ----------------------------------------------------------------

    async def serve(
        self, event_id: str, start_id: str, actor: Callable[[], InventoryActor | None]
    ) -> None:
        """Apply ``event_id``'s forwarded commands after ``start_id`` to ``actor()`` and answer
        them; runs until cancelled."""
        stream = self._keys.event(event_id).inbox
        last_id = start_id
        replying: set[asyncio.Task[None]] = set()
        trimmer = _Trimmer(self._redis, event_id, stream)
        try:
            while True:
                try:
                    entries: Any = await self._redis.xread(
                        {stream: last_id}, count=1000, block=1000
                    )
                    stop_if_cancelled()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    stop_if_cancelled()
                    log.warning("inbox read failed", extra={"event": event_id, "error": repr(exc)})
                    await asyncio.sleep(0.5)
                    continue
                if not entries:
                    continue
                last_id, pending = self._submit(event_id, entries[0][1], actor(), last_id)
                # Everything up to last_id has been read and is answered by this loop (or
                # was past its deadline): nobody needs it again, since a later owner serves
                # only what comes after its own claim.
                trimmer.up_to(last_id)
                if pending:
                    # Answered off the read loop: the next batch is read while this commits.
                    task = asyncio.create_task(self._answer(pending))
                    replying.add(task)
                    task.add_done_callback(replying.discard)
        finally:
            await trimmer.close()

    @staticmethod
    def _submit(
        event_id: str, entries: list[Any], local: InventoryActor | None, last_id: str
    ) -> tuple[str, list[tuple[str, str, Outcome]]]:
        """Submit the live commands of inbox ``entries`` (read after ``last_id``) to
        ``local``: the last entry's id, and per command its reply list, its request id and
        the actor's pending answer."""
        pending: list[tuple[str, str, Outcome]] = []
        now_ms = time.time() * 1000
        for entry_id, fields in entries:
            last_id = _text(entry_id)
            reply_to = _text(fields[b"r"])
            for forwarded in _entry_commands(fields, event_id):
                if forwarded.deadline_ms < now_ms:
                    continue  # its asker has given up
                try:
                    pending.append((reply_to, forwarded.request_id, submit(forwarded, local)))
                except msgspec.DecodeError:
                    log.warning("undecodable forwarded command", extra={"event": event_id})
        return last_id, pending

    async def _answer(self, pending: list[tuple[str, str, Outcome]]) -> None:
        replies: list[tuple[str, bytes]] = []
        for reply_to, request_id, outcome in pending:
            error: WaitroomError | None = None
            result: Result | None = None
            if isinstance(outcome, WaitroomError):
                error = outcome
            else:
                try:
                    result = await outcome
                except WaitroomError as exc:
                    error = exc
            if error is None:
                assert result is not None
                reply = Reply(request_id, result=encode_result(result))
            else:
                reply = error_reply(request_id, error)
            replies.append((reply_to, reply_encoder.encode(reply)))
        by_list: dict[str, list[bytes]] = {}
        for reply_to, data in replies:
            by_list.setdefault(reply_to, []).append(data)
        # One RPUSH per asking process, with all of its replies.
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for reply_to, datas in by_list.items():
                    pipe.rpush(reply_to, *datas)
                    pipe.pexpire(reply_to, REPLY_TTL_MS)
                await pipe.execute()
        except Exception as exc:
            # Redis lost meanwhile: the askers get 503 inventory_timeout at their deadline
            # and retry with their Idempotency-Key (the commands themselves are committed).
            log.warning(
                "answering forwarded commands failed",
                extra={"replies": len(replies), "error": repr(exc)},
            )


class _Trimmer:
    """Trims an event's inbox up to what its owner has read, beside the reads.

    Not before the next read: the read loop waited a round trip per batch for it. One
    ``XTRIM`` at a time; ids read meanwhile are trimmed by the next one, up to the last.
    """

    def __init__(self, redis: Redis, event_id: str, stream: str) -> None:
        self._redis = redis
        self._event_id = event_id
        self._stream = stream
        self._wanted = ""
        self._done = ""
        self._task: asyncio.Task[None] | None = None

    def up_to(self, last_id: str) -> None:
        """Trim every entry up to ``last_id`` (soon, without waiting)."""
        self._wanted = last_id
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"trim:{self._event_id}")

    async def _run(self) -> None:
        while self._done != self._wanted:
            target = self._wanted
            try:
                await self._redis.xtrim(self._stream, minid=target, approximate=False)
            except Exception as exc:  # the next batch's trim takes this one's entries too
                log.warning(
                    "inbox trim failed", extra={"event": self._event_id, "error": repr(exc)}
                )
                return
            self._done = target

    async def close(self) -> None:
        """Stop trimming (the next owner trims what it reads)."""
        if self._task is not None:
            await cancel_and_wait(self._task)


def _ask_timed_out() -> Unavailable:
    return Unavailable(
        "the inventory owner did not answer in time; retry with the same Idempotency-Key",
        retry_after=1,
        code="inventory_timeout",
    )


def _entry_commands(fields: dict[bytes, bytes], event_id: str) -> list[Forwarded]:
    """The commands of one inbox entry: a batch (``b``), or one command of an older release
    (``c``, ``i``, ``d``: a rolling upgrade's mail is served too)."""
    try:
        if b"b" in fields:
            return _batch_decoder.decode(fields[b"b"])
        return [Forwarded(fields[b"c"], _text(fields[b"i"]), int(fields[b"d"]))]
    except (KeyError, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        log.warning("undecodable inbox entry", extra={"event": event_id})
        return []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
