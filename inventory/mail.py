"""What forwarding carries between processes: a forwarded command, its reply, and the owner's
side of answering it.

The same messages go through an event's Redis inbox (:mod:`inventory.forwarding`) and over a
local socket between processes of one machine (:mod:`inventory.siblings`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import msgspec

from inventory.actor import ActorStopped, InventoryActor
from inventory.ledger import Command, Result, encode_result
from waitroom.core import tracing
from waitroom.core.errors import WaitroomError

command_encoder = msgspec.msgpack.Encoder()
command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)


class Reply(msgspec.Struct, frozen=True):
    """What an owner sends back to an asking process: a result, or an error's code and
    message (the asker raises it as 503)."""

    id: str
    result: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None


reply_encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(Reply)


class Forwarded(msgspec.Struct, array_like=True, frozen=True):
    """One forwarded command: its reply goes back under ``request_id``; past ``deadline_ms``
    (Unix milliseconds) nobody waits for it. With tracing on, ``traceparent`` names the
    asker's span, which the owner's commit links."""

    command: bytes
    request_id: str
    deadline_ms: int
    traceparent: str = ""


#: What an owner has for one forwarded command: the actor's pending answer, or an error.
Outcome = Awaitable[Result] | WaitroomError


def submit(forwarded: Forwarded, local: InventoryActor | None) -> Outcome:
    """Hand ``forwarded`` to the owner's actor ``local`` (None: it has none here any more).

    Raises :class:`msgspec.DecodeError` for a command that does not decode.
    """
    try:
        if local is None:
            raise ActorStopped()
        command = command_decoder.decode(forwarded.command)
        return local.submit(command, tracing.link_from(forwarded.traceparent))
    except WaitroomError as exc:
        return exc


def reply_of(request_id: str, outcome: asyncio.Future[Result] | WaitroomError) -> Reply:
    """The reply to a command whose ``outcome`` is settled."""
    if isinstance(outcome, WaitroomError):
        return error_reply(request_id, outcome)
    if outcome.cancelled():
        return error_reply(request_id, ActorStopped())
    error = outcome.exception()
    if error is None:
        return Reply(request_id, result=encode_result(outcome.result()))
    if isinstance(error, WaitroomError):
        return error_reply(request_id, error)
    return error_reply(request_id, ActorStopped("the inventory could not answer; retry"))


def error_reply(request_id: str, error: WaitroomError) -> Reply:
    """The reply carrying ``error``."""
    return Reply(request_id, error_code=error.code, error_message=error.message)
