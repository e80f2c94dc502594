"""Every Lua script of the waiting room, on real Redis, edge cases included; and the private
Redis Cluster that ``scripts/services --cluster`` starts for them (at the end)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.queue_support import fresh_room_keys, make_room, redis_client
from waitroom.core.keys import EventKeys
from waitroom.core.settings import Settings
from waitroom.line import lottery, scripts
from waitroom.line.ratelimit import Limit
from waitroom.line.scripts import ADMITTED, ADMITTING, GONE, PREQUEUE

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
#: Limits no test of the line itself reaches.
WIDE = Limit(rate=1e6, burst=1_000_000)


@pytest.fixture
async def r(settings: Settings) -> AsyncIterator[Redis]:
    async with redis_client(settings) as client:
        yield client


@pytest.fixture
def ek(settings: Settings) -> EventKeys:
    return fresh_room_keys(settings)


async def join(
    r: Redis,
    ek: EventKeys,
    fan: str,
    now: float = NOW,
    *,
    ip: str = "10.0.0.1",
    ip_limit: Limit = WIDE,
    fan_limit: Limit | None = WIDE,
) -> scripts.JoinReply:
    reply = await scripts.join(r, ek, fan, now=now, ip=ip, ip_limit=ip_limit, fan_limit=fan_limit)
    assert reply is not None
    return reply


async def codes(r: Redis, ek: EventKeys, *fans: str, now: float = NOW) -> list[int]:
    result = await scripts.positions(r, ek, fans, now=now)
    assert result is not None
    return result.codes


# --- init_room ----------------------------------------------------------------------------


async def test_loading_a_room_twice_keeps_what_changed_since(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, seed="aa" * 32)
    await r.hset(ek.meta, mapping={"paused": "1", "admitted_total": "7"})
    await make_room(r, ek, seed="bb" * 32)
    assert await r.hget(ek.meta, "paused") == b"1"
    assert await r.hget(ek.meta, "admitted_total") == b"7"
    assert await r.get(ek.seed) == b"aa" * 32


# --- join ---------------------------------------------------------------------------------


async def test_joining_a_room_that_is_not_loaded_asks_for_it(r: Redis, ek: EventKeys) -> None:
    reply = await scripts.join(r, ek, "f1", now=NOW, ip="1.2.3.4", ip_limit=WIDE, fan_limit=WIDE)
    assert reply is None
    assert await r.exists(ek.queue, ek.fans, ek.seq, ek.bucket("ip", "1.2.3.4")) == 0


async def test_the_first_fan_of_an_empty_room_is_next(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    reply = await join(r, ek, "f1")
    assert (reply.outcome, reply.state, reply.rank, reply.created) == ("joined", "waiting", 0, True)
    assert await r.zscore(ek.seen, "f1") == NOW


async def test_fans_line_up_in_join_order(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    ranks = [(await join(r, ek, f"f{i}")).rank for i in range(5)]
    assert ranks == [0, 1, 2, 3, 4]
    assert await r.zrange(ek.queue, 0, -1) == [f"f{i}".encode() for i in range(5)]


async def test_the_same_fan_twice_keeps_the_same_place(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    await join(r, ek, "f1")
    await join(r, ek, "f2")
    again = await join(r, ek, "f1", now=NOW + 5)
    assert (again.state, again.rank, again.created) == ("waiting", 0, False)
    assert await r.zcard(ek.queue) == 2
    assert await r.get(ek.seq) == b"2"
    assert await r.zscore(ek.seen, "f1") == NOW + 5  # joining again is a sign of life


async def test_a_sold_out_room_takes_no_newcomer_but_keeps_those_in_line(
    r: Redis, ek: EventKeys
) -> None:
    await make_room(r, ek)
    await join(r, ek, "early")
    await r.hset(ek.meta, "sold_out", "1")
    late = await join(r, ek, "late")
    assert (late.state, late.rank, late.created, late.sold_out) == ("none", None, False, True)
    assert await r.hexists(ek.fans, "late") == 0
    early = await join(r, ek, "early")
    assert (early.state, early.rank, early.sold_out) == ("waiting", 0, True)


async def test_a_paused_room_still_lines_fans_up(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, paused="1")
    reply = await join(r, ek, "f1")
    assert (reply.state, reply.rank, reply.paused) == ("waiting", 0, True)


async def test_an_admitted_fan_who_joins_again_gets_the_pass(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    await join(r, ek, "f1")
    # The admission loop's write, as documented in waitroom/room.py.
    await r.zrem(ek.queue, "f1")
    await r.hset(ek.admitted, "f1", "the-pass")
    await r.hincrby(ek.meta, "admitted_total", 1)
    reply = await join(r, ek, "f1")
    assert (reply.state, reply.queue_pass, reply.created, reply.admitted_total) == (
        "admitted",
        "the-pass",
        False,
        1,
    )


async def test_a_fan_being_admitted_is_shown_as_next(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    await join(r, ek, "f1")
    await r.zrem(ek.queue, "f1")  # popped, pass not written yet
    reply = await join(r, ek, "f1")
    assert (reply.state, reply.rank, reply.created) == ("waiting", 0, False)


async def test_lottery_fans_wait_in_the_prequeue_before_opening(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, mode="lottery", opens_at=NOW + 60)
    first = await join(r, ek, "f1")
    again = await join(r, ek, "f1")
    assert (first.state, first.rank, first.created, first.draw_due) == (
        "prequeue",
        None,
        True,
        False,
    )
    assert (again.state, again.created) == ("prequeue", False)
    assert await r.zcard(ek.prequeue) == 1 and await r.zcard(ek.queue) == 0


async def test_the_first_join_after_opening_freezes_the_prequeue(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, mode="lottery", opens_at=NOW + 60)
    for fan in ("p1", "p2", "p3"):
        await join(r, ek, fan)
    late = await join(r, ek, "late", now=NOW + 61)
    # Behind the three pre-queue fans the draw has not placed yet.
    assert (late.state, late.rank, late.draw_due) == ("waiting", 3, True)
    assert await r.hget(ek.meta, "opened") == b"1"
    # A process whose clock lags still sees the room open: no more pre-queue entries.
    lagging = await join(r, ek, "lagging", now=NOW)
    assert (lagging.state, lagging.rank) == ("waiting", 4)
    assert await r.zcard(ek.prequeue) == 3


async def test_join_is_limited_per_ip_without_spending_the_fans_tokens(
    r: Redis, ek: EventKeys
) -> None:
    await make_room(r, ek)
    ip_limit, fan_limit = Limit(rate=1, burst=3), Limit(rate=1, burst=10)
    for i in range(3):
        reply = await join(r, ek, "f1", ip_limit=ip_limit, fan_limit=fan_limit)
        assert reply.outcome == "joined"
        assert (reply.limit.limit, reply.limit.remaining) == (10, 9 - i)
    refused = await join(r, ek, "f1", ip_limit=ip_limit, fan_limit=fan_limit)
    assert refused.outcome == "limited" and not refused.limit.allowed
    assert (refused.limit.limit, refused.limit.remaining) == (3, 0)
    assert refused.limit.retry_after_ms == 1000
    assert refused.limit.reset_ms == 3000
    # The refusal spent nothing: the fan's bucket still holds 7 tokens.
    assert float(await r.hget(ek.bucket("fan", "f1"), "t") or 0) == 7.0
    # A second later the IP has one token again.
    later = await join(r, ek, "f1", now=NOW + 1, ip_limit=ip_limit, fan_limit=fan_limit)
    assert later.outcome == "joined"


async def test_join_is_limited_per_fan(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    fan_limit = Limit(rate=2, burst=2)
    assert (await join(r, ek, "f1", fan_limit=fan_limit)).outcome == "joined"
    assert (await join(r, ek, "f1", fan_limit=fan_limit)).outcome == "joined"
    refused = await join(r, ek, "f1", fan_limit=fan_limit)
    assert (refused.outcome, refused.limit.limit, refused.limit.retry_after_ms) == (
        "limited",
        2,
        500,
    )
    # Another fan behind the same IP is not affected, and a new visitor is not fan-limited.
    assert (await join(r, ek, "f2", fan_limit=fan_limit)).outcome == "joined"
    assert (await join(r, ek, "f3", fan_limit=None)).outcome == "joined"
    assert await r.exists(ek.bucket("fan", "f3")) == 0


# --- leave --------------------------------------------------------------------------------


async def test_leaving_gives_the_place_to_those_behind(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    for fan in ("f1", "f2", "f3"):
        await join(r, ek, fan)
    assert await scripts.leave(r, ek, "f1") == "left"
    assert await codes(r, ek, "f1", "f2", "f3") == [GONE, 0, 1]
    assert await r.hexists(ek.fans, "f1") == 0 and await r.zscore(ek.seen, "f1") is None


async def test_leaving_twice_says_not_in_line(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    await join(r, ek, "f1")
    assert await scripts.leave(r, ek, "f1") == "left"
    assert await scripts.leave(r, ek, "f1") == "not_in_line"
    assert await scripts.leave(r, ek, "never-joined") == "not_in_line"


async def test_leaving_then_joining_again_goes_to_the_back(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    for fan in ("f1", "f2"):
        await join(r, ek, fan)
    await scripts.leave(r, ek, "f1")
    back = await join(r, ek, "f1")
    assert (back.rank, back.created) == (1, True)


async def test_leaving_the_prequeue_and_edge_cases(r: Redis, ek: EventKeys) -> None:
    assert await scripts.leave(r, ek, "f1") == "no_room"
    await make_room(r, ek, mode="lottery", opens_at=NOW + 60)
    await join(r, ek, "f1")
    assert await scripts.leave(r, ek, "f1") == "left"
    assert await r.zcard(ek.prequeue) == 0
    await join(r, ek, "f2")
    await r.zrem(ek.prequeue, "f2")
    await r.hset(ek.admitted, "f2", "pass")
    assert await scripts.leave(r, ek, "f2") == "admitted"
    assert await r.hexists(ek.fans, "f2") == 1


# --- positions ----------------------------------------------------------------------------


async def test_positions_of_an_unloaded_room_ask_for_it(r: Redis, ek: EventKeys) -> None:
    assert await scripts.positions(r, ek, ["f1"], now=NOW) is None


async def test_positions_of_an_empty_room(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, commitment="c0ffee")
    result = await scripts.positions(r, ek, [], now=NOW)
    assert result is not None
    assert result.codes == [] and result.passes == []
    room = result.room
    assert (room.mode, room.waiting, room.admitted_total, room.paused, room.sold_out) == (
        "fifo",
        0,
        0,
        False,
        False,
    )
    assert room.commitment == "c0ffee"


async def test_positions_tell_every_state_apart(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    for fan in ("a", "b", "c", "d"):
        await join(r, ek, fan)
    await r.zrem(ek.queue, "a", "b")
    await r.hset(ek.admitted, "a", "pass-a")  # b is being admitted: no pass yet
    await r.hset(ek.meta, mapping={"admitted_total": "1", "paused": "1"})
    result = await scripts.positions(r, ek, ["d", "a", "b", "c", "zz"], now=NOW)
    assert result is not None
    assert result.codes == [1, ADMITTED, ADMITTING, 0, GONE]
    assert result.passes == ["pass-a"]
    assert (result.room.waiting, result.room.admitted_total, result.room.paused) == (2, 1, True)


async def test_positions_refresh_only_the_waiting(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, mode="lottery", opens_at=NOW + 60)
    await join(r, ek, "pre")
    await r.hset(ek.admitted, "done", "pass")
    assert await codes(r, ek, "pre", "done", now=NOW + 30) == [PREQUEUE, ADMITTED]
    assert await r.zscore(ek.seen, "pre") == NOW + 30
    assert await r.zscore(ek.seen, "done") is None


async def test_positions_of_thousands_of_fans_in_one_call(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek)
    fans = [f"fan-{i:05d}" for i in range(3000)]
    for fan in fans:
        await join(r, ek, fan, fan_limit=None)
    assert await codes(r, ek, *reversed(fans), now=NOW + 9) == list(range(2999, -1, -1))
    assert await r.zcount(ek.seen, NOW + 9, NOW + 9) == 3000


# --- sweep --------------------------------------------------------------------------------


async def test_the_sweep_drops_fans_silent_for_longer_than_the_grace(
    r: Redis, ek: EventKeys
) -> None:
    await make_room(r, ek, grace_s=60)
    for fan in ("gone1", "alive", "gone2", "edge"):
        await join(r, ek, fan)
    await codes(r, ek, "alive", now=NOW + 30)
    await codes(r, ek, "edge", now=NOW + 10)
    dropped, more = await scripts.sweep(r, ek, now=NOW + 70, limit=100)
    assert (dropped, more) == (2, False)
    # Seen exactly `grace` seconds ago is still within the grace.
    assert await codes(r, ek, "gone1", "alive", "gone2", "edge", now=NOW + 70) == [GONE, 0, GONE, 1]
    assert await r.hget(ek.meta, "abandoned_total") == b"2"
    assert await r.hexists(ek.fans, "gone1") == 0


async def test_the_sweep_is_bounded_and_says_when_more_is_due(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, grace_s=10)
    for i in range(5):
        await join(r, ek, f"f{i}")
    assert await scripts.sweep(r, ek, now=NOW + 11, limit=2) == (2, True)
    assert await scripts.sweep(r, ek, now=NOW + 11, limit=2) == (2, True)
    assert await scripts.sweep(r, ek, now=NOW + 11, limit=2) == (1, False)
    assert await r.zcard(ek.queue) == 0


async def test_the_sweep_drops_prequeue_fans_but_never_the_admitted(
    r: Redis, ek: EventKeys
) -> None:
    await make_room(r, ek, mode="lottery", opens_at=NOW + 600, grace_s=10)
    await join(r, ek, "pre")
    await join(r, ek, "admitted")
    await r.zrem(ek.prequeue, "admitted")
    await r.hset(ek.admitted, "admitted", "pass")
    assert await scripts.sweep(r, ek, now=NOW + 11, limit=10) == (1, False)
    assert await r.zcard(ek.prequeue) == 0
    assert await r.hexists(ek.fans, "admitted") == 1
    assert await r.zscore(ek.seen, "admitted") is None


async def test_sweeping_a_room_that_is_not_loaded_does_nothing(r: Redis, ek: EventKeys) -> None:
    assert await scripts.sweep(r, ek, now=NOW, limit=10) == (0, False)


# --- open_room and draw -------------------------------------------------------------------


async def test_opening_a_fifo_room_only_records_it(r: Redis, ek: EventKeys) -> None:
    assert (await scripts.open_room(r, ek, now=NOW, token="t", lease_ms=1000)).outcome == "no_room"
    await make_room(r, ek)
    assert (await scripts.open_room(r, ek, now=NOW, token="t", lease_ms=1000)).outcome == "fifo"
    assert await r.hget(ek.meta, "opened") == b"1"


async def test_a_lottery_is_handed_to_one_drawer_and_drawn_once(r: Redis, ek: EventKeys) -> None:
    seed = lottery.new_seed()
    await make_room(r, ek, seed=seed, mode="lottery", opens_at=NOW + 60)
    for fan in ("p1", "p2", "p3"):
        await join(r, ek, fan)
    first = await scripts.open_room(r, ek, now=NOW + 60, token="one", lease_ms=10_000)
    assert (first.outcome, first.seed, first.prequeue) == ("draw", seed, ("p1", "p2", "p3"))
    second = await scripts.open_room(r, ek, now=NOW + 60, token="two", lease_ms=10_000)
    assert second.outcome == "busy"
    # Frozen: a newcomer lines up FIFO, behind the three not yet placed.
    assert (await join(r, ek, "late", now=NOW + 61)).rank == 3

    await scripts.leave(r, ek, "p2")  # leaves before being placed: skipped by the draw
    placements = [(-3, "p3"), (-2, "p1"), (-1, "p2")]
    assert await scripts.draw(r, ek, placements[:1], now=NOW + 62, token="one", final=False) == 1
    # Half-way through, positions already add up: p3 placed, p1 still unplaced.
    assert await codes(r, ek, "p3", "p1", "late") == [0, PREQUEUE, 2]
    assert (await join(r, ek, "p3", now=NOW + 62)).rank == 0
    assert (await join(r, ek, "late", now=NOW + 62)).rank == 2
    assert await scripts.draw(r, ek, placements[1:], now=NOW + 62, token="one", final=False) == 1
    assert await scripts.draw(r, ek, placements, now=NOW + 62, token="two", final=False) == 0
    assert await scripts.draw(r, ek, [], now=NOW + 62, token="one", final=True) == 0
    assert await codes(r, ek, "p3", "p1", "late", "p2") == [0, 1, 2, GONE]
    assert await r.hget(ek.meta, "drawn") == b"1"
    assert await r.exists(ek.draw_lease) == 0
    third = await scripts.open_room(r, ek, now=NOW + 63, token="three", lease_ms=10_000)
    assert third.outcome == "drawn"


async def test_the_last_draw_batch_never_loses_a_fan(r: Redis, ek: EventKeys) -> None:
    await make_room(r, ek, seed=lottery.new_seed(), mode="lottery", opens_at=NOW + 60)
    for fan in ("p1", "p2"):
        await join(r, ek, fan)
    await scripts.open_room(r, ek, now=NOW + 60, token="t", lease_ms=10_000)
    # Only p1 is in the list applied: p2 still gets a place behind it, ahead of FIFO fans.
    await scripts.draw(r, ek, [(-1, "p1")], now=NOW + 60, token="t", final=True)
    await join(r, ek, "late", now=NOW + 61)
    assert await codes(r, ek, "p1", "p2", "late") == [0, 1, 2]
    assert await r.zcard(ek.prequeue) == 0


# --- the line as a whole (hypothesis) ------------------------------------------------------

fan_ids = st.integers(min_value=0, max_value=11).map(lambda i: f"fan{i}")
operations = st.lists(
    st.one_of(
        st.tuples(st.just("join"), fan_ids),
        st.tuples(st.just("leave"), fan_ids),
        st.tuples(st.just("admit"), st.just("")),
    ),
    max_size=40,
)


async def _replay(settings: Settings, ops: list[tuple[str, str]]) -> None:
    async with redis_client(settings) as r:
        ek = fresh_room_keys(settings)
        await make_room(r, ek)
        line: list[str] = []  # the model: fans in line, in join order
        admitted: set[str] = set()
        try:
            for step, (op, fan) in enumerate(ops):
                now = NOW + step
                if op == "join":
                    reply = await join(r, ek, fan, now)
                    if fan in admitted:
                        assert reply.state == "admitted"
                    else:
                        assert reply.created == (fan not in line)
                        if fan not in line:
                            line.append(fan)
                        assert reply.rank == line.index(fan)
                elif op == "leave":
                    outcome = await scripts.leave(r, ek, fan)
                    if fan in admitted:
                        assert outcome == "admitted"
                    else:
                        assert outcome == ("left" if fan in line else "not_in_line")
                        if fan in line:
                            line.remove(fan)
                else:
                    # Admission stand-in: pop the head and record the pass, as documented.
                    head: Any = await r.zpopmin(ek.queue)
                    if line:
                        assert head[0][0].decode() == line.pop(0)
                        await r.hset(ek.admitted, head[0][0], "pass")
                        admitted.add(head[0][0].decode())
                    else:
                        assert head == []
                everyone = [f"fan{i}" for i in range(12)]
                found = await codes(r, ek, *everyone, now=now)
                for fan_id, code in zip(everyone, found, strict=True):
                    if fan_id in line:
                        assert code == line.index(fan_id)
                    elif fan_id in admitted:
                        assert code == ADMITTED
                    else:
                        assert code == GONE
                # Ranks of the fans in line are exactly 0..n-1, in join order.
                assert sorted(c for c in found if c >= 0) == list(range(len(line)))
        finally:
            await r.delete(
                *(getattr(ek, k) for k in ("queue", "fans", "seen", "seq", "meta", "admitted"))
            )


@hyp_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations)
def test_any_interleaving_of_joins_leaves_and_admissions_keeps_fifo_ranks(
    settings: Settings, ops: list[tuple[str, str]]
) -> None:
    asyncio.run(_replay(settings, ops))


# --- scripts/services --cluster (the local Redis Cluster the scripts also run on) ---------

SERVICES = Path(__file__).resolve().parent.parent / "scripts" / "services"


def _services(run_dir: Path, *args: str) -> str:
    # SERVICES_RUN_DIR keeps the test's servers and .run/env away from the checkout's own.
    env = {k: v for k, v in os.environ.items() if k != "WAITROOM_REDIS_URL"}
    env["SERVICES_RUN_DIR"] = str(run_dir)
    done = subprocess.run(
        [str(SERVICES), *args], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _machine_redis_answers() -> bool:
    client = SyncRedis(host="127.0.0.1", port=6379, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _node_pids(cluster: Path) -> list[int]:
    return [int(f.read_text().split()[0]) for f in sorted(cluster.glob("node-*/redis.pid"))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.not_on_cluster  # it starts a cluster of its own
def test_services_cluster_starts_three_primaries_and_three_replicas_then_stops_them(
    tmp_path: Path,
) -> None:
    machine_redis = _machine_redis_answers()
    run_dir = tmp_path / "run"
    cluster = run_dir / "redis-cluster"
    try:
        _services(run_dir, "--cluster")
        env = (run_dir / "env").read_text()
        found = re.search(r"^export WAITROOM_REDIS_URL=redis\+cluster://(\S+)$", env, re.M)
        assert found, env
        seeds = found.group(1).split(",")
        assert len(seeds) == 3 and all(seed.startswith("127.0.0.1:") for seed in seeds)
        ports = {int(seed.rsplit(":", 1)[1]) for seed in seeds}
        assert 6379 not in ports

        roles: dict[str, int] = {"master": 0, "slave": 0}
        for conf in sorted(cluster.glob("node-*/redis.conf")):
            text = conf.read_text()
            assert "cluster-enabled yes" in text and "appendonly yes" in text
            assert "appendfsync everysec" in text
            port_line = re.search(r"^port (\d+)$", text, re.M)
            assert port_line is not None
            port = int(port_line.group(1))
            with SyncRedis(host="127.0.0.1", port=port, socket_timeout=5) as node:
                info: Any = node.execute_command("CLUSTER INFO")
                assert info["cluster_state"] == "ok"
                assert int(info["cluster_known_nodes"]) == 6
                role = node.info("replication")["role"]
                roles[role] += 1
                if role == "master":
                    assert port in ports  # the URL names the primaries
                    assert node.info("replication")["connected_slaves"] == 1
        assert roles == {"master": 3, "slave": 3}

        # A second start reuses the running cluster.
        pids = _node_pids(cluster)
        assert len(pids) == 6
        assert "reusing the private Redis Cluster" in _services(run_dir, "--cluster")
        assert _node_pids(cluster) == pids

        _services(run_dir, "stop", "--cluster")
        assert not [pid for pid in pids if _alive(pid)]
        env_file = run_dir / "env"
        assert "WAITROOM_REDIS_URL" not in (env_file.read_text() if env_file.exists() else "")
    finally:
        # Whatever this run dir still runs (nodes of a failed start, a private PostgreSQL
        # if none answered): plain `stop` stops every private server, cluster included.
        _services(run_dir, "stop")
    assert _machine_redis_answers() == machine_redis
