"""The admission lease and the admit script, on real Redis: fencing, order, abandoned fans."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from admission import leader
from admission.leader import Candidate
from tests.queue_support import fresh_room_keys, make_room
from waitroom.core.keys import EventKeys
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0


@pytest.fixture
def ek(settings: Settings) -> EventKeys:
    return fresh_room_keys(settings)


async def line_up(r: Redis, ek: EventKeys, fans: list[str], *, seen: float = NOW) -> None:
    """Fans waiting in this order, last seen at ``seen``."""
    await make_room(r, ek)
    await r.zadd(ek.queue, {fan: i + 1 for i, fan in enumerate(fans)})
    await r.hset(ek.fans, mapping={fan: i + 1 for i, fan in enumerate(fans)})
    await r.zadd(ek.seen, dict.fromkeys(fans, seen))


def signed(fans: list[str], first_seq: int = 1) -> list[Candidate]:
    return [
        Candidate(fan, f"pass-of-{fan}", f"jti-{fan}", int(NOW) + 900, first_seq + i)
        for i, fan in enumerate(fans)
    ]


async def test_only_one_caller_gets_the_lease_and_only_it_can_renew_or_release(
    r: Redis, ek: EventKeys
) -> None:
    assert await leader.acquire(r, ek, "a")
    assert not await leader.acquire(r, ek, "b")
    assert not await leader.renew(r, ek, "b")
    assert await leader.renew(r, ek, "a", lease_ms=5000)
    assert 4000 < await r.pttl(ek.leader) <= 5000
    assert not await leader.release(r, ek, "b")
    assert await leader.release(r, ek, "a")
    assert await leader.acquire(r, ek, "b")


async def test_a_lease_that_is_not_renewed_lapses(r: Redis, ek: EventKeys) -> None:
    assert await leader.acquire(r, ek, "a", lease_ms=100)
    await asyncio.sleep(0.2)
    assert not await leader.renew(r, ek, "a")
    assert await leader.acquire(r, ek, "b")


async def test_the_renewal_publishes_the_observed_rate(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    await leader.acquire(r, ek, "a")
    assert await leader.renew(r, ek, "a", observed_rate=12.5, now=NOW)
    assert await r.hmget(ek.meta, ["observed_rate", "observed_at"]) == [
        b"12.500",
        b"1800000000.000",
    ]


async def test_admit_takes_fans_from_the_head_in_order_and_records_everything(
    r: Redis, ek: EventKeys
) -> None:
    fans = [f"f{i}" for i in range(5)]
    await line_up(r, ek, fans)
    await leader.acquire(r, ek, "tok")
    reply = await leader.admit(r, ek, "tok", signed(fans[:3]), limit=3, cutoff=NOW - 60)
    assert (reply.outcome, reply.admitted, reply.admitted_total, reply.picked) == (
        "done",
        3,
        3,
        [0, 1, 2],
    )
    assert await r.zrange(ek.queue, 0, -1) == [b"f3", b"f4"]
    assert await r.lrange(ek.order, 0, -1) == [b"f0", b"f1", b"f2"]
    assert await r.hget(ek.admitted, "f1") == b"pass-of-f1"
    assert await r.zscore(ek.active, "jti-f2") == int(NOW) + 900
    assert await r.hget(ek.meta, "admitted_total") == b"3"
    # Admitted fans keep their place in `fans` (joining again answers with the pass) but
    # leave `seen` (they are not waiting any more).
    assert await r.hexists(ek.fans, "f0")
    assert await r.zscore(ek.seen, "f0") is None


async def test_admit_is_fenced_by_the_lease_token(r: Redis, ek: EventKeys) -> None:
    fans = ["f0", "f1"]
    await line_up(r, ek, fans)
    await leader.acquire(r, ek, "new-leader")
    reply = await leader.admit(r, ek, "old-leader", signed(fans), limit=2, cutoff=None)
    assert reply.outcome == "fenced" and reply.admitted == 0
    assert await r.zcard(ek.queue) == 2
    assert await r.llen(ek.order) == 0


async def test_a_fan_is_never_admitted_twice(r: Redis, ek: EventKeys) -> None:
    await line_up(r, ek, ["f0", "f1"])
    await leader.acquire(r, ek, "tok")
    first = await leader.admit(r, ek, "tok", signed(["f0"]), limit=1, cutoff=None)
    again = await leader.admit(r, ek, "tok", signed(["f0", "f1"], 1), limit=2, cutoff=None)
    assert first.admitted == 1
    # A stale batch still naming f0: f0 is not in line any more and is skipped; f1's pass
    # (seq 2, the next admission) goes in.
    assert (again.outcome, again.picked) == ("done", [1])
    assert (await r.lrange(ek.order, 0, -1)).count(b"f0") == 1


async def test_abandoned_fans_are_dropped_without_using_a_place(r: Redis, ek: EventKeys) -> None:
    fans = ["f0", "gone1", "gone2", "f3", "f4"]
    await line_up(r, ek, fans)
    await r.zadd(ek.seen, {"gone1": NOW - 120, "gone2": NOW - 61})
    await leader.acquire(r, ek, "tok")
    candidates = [
        signed(["f0"])[0],
        Candidate("gone1"),
        Candidate("gone2"),
        *signed(["f3", "f4"], 2),
    ]
    reply = await leader.admit(r, ek, "tok", candidates, limit=2, cutoff=NOW - 60)
    assert (reply.admitted, reply.abandoned, reply.picked) == (2, 2, [0, 3])
    assert await r.lrange(ek.order, 0, -1) == [b"f0", b"f3"]
    assert await r.zrange(ek.queue, 0, -1) == [b"f4"]
    assert not await r.hexists(ek.fans, "gone1")
    assert await r.hget(ek.meta, "abandoned_total") == b"2"


async def test_a_fan_predicted_abandoned_who_came_back_stops_the_batch(
    r: Redis, ek: EventKeys
) -> None:
    await line_up(r, ek, ["f0", "back", "f2"])
    await leader.acquire(r, ek, "tok")
    # The caller thought "back" was abandoned and gave it no pass, but it was seen since.
    candidates = [signed(["f0"])[0], Candidate("back"), *signed(["f2"], 2)]
    reply = await leader.admit(r, ek, "tok", candidates, limit=3, cutoff=NOW - 60)
    assert (reply.outcome, reply.admitted) == ("stale", 1)
    assert await r.zrange(ek.queue, 0, -1) == [b"back", b"f2"]


async def test_fans_who_left_are_skipped_and_a_fan_ahead_stops_the_batch(
    r: Redis, ek: EventKeys
) -> None:
    await line_up(r, ek, ["f0", "f1", "f2"])
    await leader.acquire(r, ek, "tok")
    await r.zrem(ek.queue, "f0")  # left after the caller read the head
    reply = await leader.admit(r, ek, "tok", signed(["f0", "f1"]), limit=2, cutoff=None)
    # f0 skipped; f1's pass carries seq 2 but it would be admission number 1: stale.
    assert (reply.outcome, reply.admitted) == ("stale", 0)
    reply = await leader.admit(r, ek, "tok", signed(["f1", "f2"]), limit=2, cutoff=None)
    assert reply.admitted == 2
    await r.zadd(ek.queue, {"f9": 10, "jumped": -1})  # someone placed ahead (a draw)
    reply = await leader.admit(r, ek, "tok", signed(["f9"], 3), limit=1, cutoff=None)
    assert (reply.outcome, reply.admitted) == ("moved", 0)


async def test_settings_are_mirrored_only_forward_in_version(r: Redis, ek: EventKeys) -> None:
    assert not await leader.mirror_settings(r, ek, version=5, rate=1, max_active=1, paused=False)
    await make_room(r, ek)
    async with r.pubsub() as pubsub:
        await pubsub.subscribe(ek.news)
        assert await leader.mirror_settings(r, ek, version=5, rate=50, max_active=7, paused=True)
        assert not await leader.mirror_settings(
            r, ek, version=4, rate=1, max_active=1, paused=False
        )
        message = None
        for _ in range(20):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message:
                break
        assert message is not None and b'"settings"' in message["data"]
    assert await r.hmget(ek.meta, ["rate", "max_active", "paused"]) == [b"50.0", b"7", b"1"]


async def test_nobody_is_admitted_under_a_redis_that_restarted_until_the_room_is_marked(
    r: Redis, ek: EventKeys
) -> None:
    """The room's incarnation is another Redis process's (this one restarted since the room
    was written from PostgreSQL): admit answers 'unreconciled' and admits nobody; marking
    the room (after the rebuild) carries the pass numbers on from PostgreSQL's highest."""
    fans = ["f0", "f1"]
    await line_up(r, ek, fans)
    await leader.acquire(r, ek, "tok")
    await r.set(ek.incarnation, "a-redis-that-is-gone")
    reply = await leader.admit(r, ek, "tok", signed(fans), limit=2, cutoff=None)
    assert (reply.outcome, reply.admitted) == ("unreconciled", 0)
    assert await r.zcard(ek.queue) == 2 and await r.zcard(ek.active) == 0

    # PostgreSQL had issued passes up to number 7: the next is number 8.
    run = await leader.mark_incarnation(r, ek, 7)
    assert len(run) == 40 and int(run, 16) >= 0  # the Redis process's run id
    assert await r.get(ek.incarnation) == run.encode()
    assert await r.hget(ek.meta, "admitted_total") == b"7"
    stale = await leader.admit(r, ek, "tok", signed(fans), limit=2, cutoff=None)
    assert stale.outcome == "stale"  # numbered from 1: signed before the room was marked
    reply = await leader.admit(r, ek, "tok", signed(fans, 8), limit=2, cutoff=None)
    assert (reply.outcome, reply.admitted, reply.admitted_total) == ("done", 2, 9)
    # A lower number never takes the total back.
    await leader.mark_incarnation(r, ek, 3)
    assert await r.hget(ek.meta, "admitted_total") == b"9"
