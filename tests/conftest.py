"""Shared fixtures: one private database and Redis prefix per run, one server per module."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from tests.harness import (
    ADMIN_TOKEN,
    ServerThread,
    async_redis,
    cleanup,
    fresh_settings,
    running,
)
from waitroom.core.settings import Settings

# --- where a leaked socket transport came from -----------------------------------------------
# An asyncio transport never closed warns "unclosed transport" when it is collected, which
# may be several tests after the one that leaked it, and without tracemalloc (far too slow
# for the suite) the warning says nothing of its origin. Each socket transport notes the
# test that was running and a few frames of who opened it; the warning of a leaked one is
# preceded on stderr by that note, so the failure names the culprit.

_current_test = ["(no test)"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    _current_test[0] = item.nodeid


def _origin() -> str:
    frames: list[str] = []
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and len(frames) < 14:
        code = frame.f_code
        if "/asyncio/" not in code.co_filename:
            frames.append(f"{code.co_filename}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return f"opened during {_current_test[0]} at\n    " + "\n    ".join(frames)


# Private classes of asyncio (not in typeshed): looked up by name.
_Transport: Any = getattr(asyncio.selector_events, "_SelectorSocketTransport")  # noqa: B009
_transport_init = _Transport.__init__
_transport_del = getattr(asyncio.selector_events, "_SelectorTransport").__del__  # noqa: B009


def _noting_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _transport_init(self, *args, **kwargs)
    self._waitroom_origin = _origin()


def _telling_del(self: Any, *args: Any) -> None:
    if getattr(self, "_sock", None) is not None:
        origin = getattr(self, "_waitroom_origin", "of unknown origin")
        print(f"leaked transport {self!r}, {origin}", file=sys.stderr)
    _transport_del(self, *args)


_Transport.__init__ = _noting_init
_Transport.__del__ = _telling_del


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of this test run: a fresh migrated database and Redis prefix."""
    run_dir: Path = tmp_path_factory.mktemp("run")
    value = fresh_settings(run_dir)
    try:
        yield value
    finally:
        cleanup(value)


#: How long the pool fixture waits for its connections to come back at the end.
POOL_CLOSE_S = 30.0


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool[Any]]:
    """A PostgreSQL pool on the run's (or the module's) database."""
    p: asyncpg.Pool[Any] = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=8)
    try:
        yield p
    finally:
        # close() waits for every connection to come back: one a test leaked checked out
        # (an actor left running) fails here, loudly, instead of hanging the whole run.
        try:
            await asyncio.wait_for(p.close(), POOL_CLOSE_S)
        except TimeoutError:
            p.terminate()
            raise AssertionError(
                f"a pooled connection was still checked out {POOL_CLOSE_S:g} s after the test"
            ) from None


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A Redis client on the run's Redis."""
    client = async_redis(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[ServerThread]:
    """A real server on port 0 sharing the run's database and Redis prefix."""
    with running(settings) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    """An HTTP client for the module's server."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture
def admin(server: ServerThread) -> Iterator[httpx.Client]:
    """An HTTP client that sends the admin token."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as c:
        yield c


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for sock in accepted:
            sock.close()
        listener.close()
