"""A forwarded ask ends at its deadline, or as soon as its owner is seen gone, and leaves
nothing behind, with no timer of its own (the forwarder's watch looks at every ask in flight).

Nobody serves the inbox here: the asks go into a real Redis stream and wait.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid

import pytest
from redis.asyncio import Redis

from inventory.forwarding import WATCH_TICK_S, Forwarder, OwnerGone
from inventory.ledger import Reserve
from stress.private_services import PrivateRedis
from tests.harness import async_redis
from waitroom.core.errors import Unavailable
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio


def _forwarder(redis: Redis, settings: Settings) -> Forwarder:
    return Forwarder(redis, Keys(settings.redis_prefix), f"asker-{uuid.uuid4().hex[:6]}")


def _reserve(key: str) -> Reserve:
    return Reserve(f"fan-{key}", "ga", 1, key, None)


async def test_an_unanswered_ask_is_a_503_at_its_deadline_and_not_before(
    redis: Redis, settings: Settings
) -> None:
    forwarder = _forwarder(redis, settings)
    forwarder.start()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await forwarder.ask(f"evt-{uuid.uuid4().hex[:8]}", _reserve("k1"), timeout=0.3)
        took = time.monotonic() - started
        assert caught.value.code == "inventory_timeout"
        assert 0.3 <= took < 0.3 + WATCH_TICK_S + 1.0, took
        assert not forwarder._waiting
    finally:
        await forwarder.stop(Unavailable("stopped", retry_after=1))


async def test_an_ask_whose_owner_is_gone_ends_at_the_next_check(
    redis: Redis, settings: Settings
) -> None:
    forwarder = _forwarder(redis, settings)
    forwarder.start()
    checks = 0

    async def gone() -> bool:
        nonlocal checks
        checks += 1
        return checks >= 2  # alive at the first look, gone at the second

    try:
        started = time.monotonic()
        with pytest.raises(OwnerGone):
            await forwarder.ask(
                f"evt-{uuid.uuid4().hex[:8]}",
                _reserve("k2"),
                timeout=10,
                owner_gone=gone,
                check_every=0.2,
            )
        took = time.monotonic() - started
        assert checks == 2
        assert 0.4 <= took < 0.4 + 2 * WATCH_TICK_S + 1.0, took
    finally:
        await forwarder.stop(Unavailable("stopped", retry_after=1))


async def test_asks_cancelled_or_stopped_leave_nothing_and_log_no_lost_error(
    redis: Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    forwarder = _forwarder(redis, settings)
    forwarder.start()
    event_id = f"evt-{uuid.uuid4().hex[:8]}"

    async def gone() -> bool:
        return True

    cancelled = asyncio.create_task(forwarder.ask(event_id, _reserve("k3"), timeout=10))
    watched = asyncio.create_task(
        forwarder.ask(event_id, _reserve("k4"), timeout=10, owner_gone=gone, check_every=0.05)
    )
    stopped = asyncio.create_task(forwarder.ask(event_id, _reserve("k5"), timeout=10))
    await asyncio.sleep(0.05)
    cancelled.cancel()  # a request cut off by its deadline, say
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(OwnerGone):
        await watched
    await forwarder.stop(
        Unavailable("the server is shutting down", retry_after=1, code="shutting_down")
    )
    with pytest.raises(Unavailable) as caught:
        await stopped
    assert caught.value.code == "shutting_down"
    assert not forwarder._waiting
    # Every future the asks made was settled or retrieved: none is reported lost.
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_an_ask_stuck_sending_to_a_frozen_redis_ends_at_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with PrivateRedis() as server:
        client = async_redis(server.url)
        forwarder = Forwarder(client, Keys("wr-frozen"), "asker")
        forwarder.start()
        try:
            await client.ping()
            server.pause()  # the XADD is written and never answered
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await forwarder.ask("evt-frozen", _reserve("k6"), timeout=0.3)
            assert caught.value.code == "inventory_timeout"
            assert time.monotonic() - started < 0.3 + WATCH_TICK_S + 1.0
            assert not forwarder._waiting
        finally:
            server.resume()
            await forwarder.stop(Unavailable("stopped", retry_after=1))
            await client.aclose()
    # The reply future failed with the send; it was settled, not left unretrieved. (Looked
    # at once the XADD is over: until then its batch, the error and the ask's frame, which
    # holds the future, are all alive.)
    del caught
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
        await asyncio.sleep(0.05)
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_answers_that_cannot_reach_a_lost_redis_are_logged_not_lost_in_a_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The owner's answers go out in a task of their own: when Redis is gone (a restart
    mid-sale), the failure is a warning, not an 'exception never retrieved' of that task
    (the askers end at their deadline with a 503)."""
    with PrivateRedis() as server:
        client = async_redis(server.url)
        forwarder = Forwarder(client, Keys("wr-lost"), "owner")
        await client.ping()
        server.stop()
        with caplog.at_level(logging.WARNING, logger="waitroom.inventory"):
            await forwarder._answer(
                [("replies:asker", "r1", Unavailable("gone", retry_after=1, code="x"))]
            )
        await client.aclose()
    assert any("answering forwarded commands failed" in r.getMessage() for r in caplog.records)
