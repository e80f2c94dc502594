"""A small keep-alive HTTP/1.1 client for simulated fans: cheap enough for thousands of them.

The simulated crowd (:mod:`stress.simulation`) used httpx, and a profile of a fan-generator
process during a sale found 80% of its CPU in httpx and httpcore, almost half of it in the
connection pool's scan of every pooled connection on every request (a readability check, a
system call, per connection). A benchmark whose generator spends its core on bookkeeping
reports the generator's delays as the fans'. This client keeps idle connections in a LIFO
stack (no scan: the most recently used connection is taken, and one idle for longer than
the keep-alive expiry is closed, not reused), writes each request in one call and frames
the answer by ``Content-Length`` (which every answer of waitroom and HAProxy carries).

It speaks to one origin (``http://host:port``), sends JSON, and never follows redirects or
keeps cookies: what a fan's script needs, nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import msgspec

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class TransportError(Exception):
    """The connection failed before a whole answer arrived (the request may have run)."""


class Headers(dict[str, str]):
    """An answer's headers, by lower-case name."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


class Answer:
    """One answer: status, headers, body."""

    __slots__ = ("body", "headers", "status_code")

    def __init__(self, status_code: int, headers: Headers, body: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        """The body decoded as JSON."""
        return _decode(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class _Connection:
    __slots__ = ("reader", "used_at", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used_at = time.monotonic()

    def close(self) -> None:
        self.writer.close()


class FanClient:
    """Keep-alive requests to one origin, at most ``max_connections`` at once."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 256,
        keepalive_expiry: float = 3.0,
        timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"an http://host:port origin is needed, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._host_header = parts.netloc.encode()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._expiry = keepalive_expiry
        self._timeout = timeout

    async def __aenter__(self) -> FanClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """Send one request on a kept-alive connection (or a new one); its answer."""
        body = b"" if json is None else _encode(json)
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self._host_header]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}".encode())
        if json is not None:
            head.append(b"Content-Type: application/json")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d" % len(body))
        message = b"\r\n".join(head) + b"\r\n\r\n" + body
        async with self._slots:
            conn = await self._connection()
            try:
                async with asyncio.timeout(self._timeout):
                    conn.writer.write(message)
                    answer, keep = await _read_answer(conn.reader)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                conn.close()
                raise TransportError(f"{method} {path}: {exc!r}") from None
            except BaseException:  # cancelled mid-answer: the connection is out of step
                conn.close()
                raise
            if keep:
                conn.used_at = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
            return answer

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.used_at < self._expiry and not conn.reader.at_eof():
                return conn
            conn.close()  # idle too long: the server may be closing it right now
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(self._host, self._port)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"connect to {self._host}:{self._port}: {exc!r}") from None
        return _Connection(reader, writer)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """One answer from ``reader``, and whether its connection may be used again."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = Headers()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding"):
        raise ValueError("chunked answers are not expected here")
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    keep = headers.get("connection", "").lower() != "close"
    return Answer(status, headers, body), keep
