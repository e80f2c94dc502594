"""A real SMTP server for the e-mail tests: aiosmtpd on 127.0.0.1, port 0, in its own thread.

Every message whose DATA it accepted is kept, in order, duplicates included (nothing is
deduplicated, by Message-ID or otherwise). Faults, set by the test:

- :meth:`SmtpServer.refuse` the next N messages with a reply (``451`` to be retried, ``550``
  to be refused for good);
- :meth:`SmtpServer.hold_next` the next message's DATA without answering, either before it is
  taken (``keep=False``: a server that has not accepted the message; if the client goes away
  meanwhile, aiosmtpd cancels the handler and the message is lost, as it should be) or after
  it is taken (``keep=True``: the server has the message but its ``250`` never reaches the
  client, the window of RFC 1047, "Duplicate messages and SMTP").
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Received:
    """A message the server accepted: when, for whom, and the parsed message."""

    at: float
    recipients: tuple[str, ...]
    message: EmailMessage

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self._server = server

    async def handle_DATA(  # noqa: N802 (aiosmtpd calls it by this name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        owner = self._server
        with owner.lock:
            refusal = owner.refusals.pop(0) if owner.refusals else None
            hold = owner.hold
            owner.hold = None
        if refusal is not None:
            return refusal
        if hold is not None and not hold:
            owner.held.set()
            await asyncio.Event().wait()  # until the client goes away: cancelled then
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with owner.lock:
            owner.received.append(Received(time.monotonic(), tuple(envelope.rcpt_tos), message))
        if hold:
            owner.held.set()
            await asyncio.Event().wait()
        return "250 2.0.0 OK"


class SmtpServer:
    """aiosmtpd serving on a free port of 127.0.0.1 until :meth:`stop`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.refusals: list[str] = []
        self.hold: bool | None = None
        #: Set when a held DATA is being held.
        self.held = threading.Event()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> SmtpServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(10)
        return self

    async def _listen(self) -> None:
        handler = _Handler(self)
        self._server = await self._loop.create_server(
            lambda: SMTP(handler, hostname="smtp.test", loop=self._loop), "127.0.0.1", 0
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def refuse(self, *replies: str) -> None:
        """Answer the next messages' DATA with ``replies``, one each."""
        with self.lock:
            self.refusals.extend(replies)

    def hold_next(self, *, keep: bool) -> None:
        """Hold the next message's DATA unanswered (after taking it when ``keep``)."""
        with self.lock:
            self.hold = keep
            self.held.clear()

    def messages(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """At least ``count`` messages, waiting for them up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages()
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"expected {count} messages, got {len(self.messages())}")

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            # The sessions still open (a held DATA): their handlers end, then their sockets.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), 2)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def parts(message: EmailMessage) -> dict[str, list[Any]]:
    """The message's leaf parts by content type."""
    found: dict[str, list[Any]] = {}
    for part in message.walk():
        if not part.is_multipart():
            found.setdefault(part.get_content_type(), []).append(part)
    return found
