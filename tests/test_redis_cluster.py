"""The Multiplexer and redis-py's client on a real Redis Cluster (issue 13).

A private 6-node cluster (3 primaries, 3 replicas) is started for the module by
``scripts/services --cluster`` in a temporary directory (never the machine's Redis). The
Multiplexer must route every command to its slot's primary, load scripts on every primary,
follow a slot that moved (``MOVED``) or is moving (``ASK``), and, when a primary dies and its
replica is promoted, fail the commands in flight with a 503-class error and then serve again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.exceptions as rx
from redis.crc import key_slot

from tests.harness import ROOT, async_redis
from waitroom.core.http import dependency_error
from waitroom.core.redis import Multiplexer

#: It starts a cluster of its own: once is enough.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180), pytest.mark.not_on_cluster]


@dataclass
class Cluster:
    """The module's private cluster: its URL and run directory."""

    url: str
    run_dir: Path

    def ports(self) -> list[int]:
        return [int(seed.rsplit(":", 1)[1]) for seed in self.url.split("://", 1)[1].split(",")]

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def nodes(self) -> list[tuple[str, int, str, bool]]:
        """(id, port, flags, is_primary) of every node, from CLUSTER NODES."""
        with self.node(self.ports()[0]) as c:
            table: dict[str, dict[str, str]] = c.execute_command("CLUSTER NODES")
        return [
            (
                node["node_id"],
                int(address.split("@")[0].rsplit(":", 1)[1]),
                node["flags"],
                "master" in node["flags"],
            )
            for address, node in table.items()
        ]

    def primary_of(self, slot: int) -> tuple[str, int]:
        with self.node(self.ports()[0]) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    node_id = next(n[0] for n in self.nodes() if n[1] == port)
                    return node_id, port
        raise AssertionError(f"no primary for slot {slot}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run_dir = tmp_path_factory.mktemp("cluster-run")
    env = {**os.environ, "SERVICES_RUN_DIR": str(run_dir)}
    env.pop("WAITROOM_REDIS_URL", None)
    # Quick failover for the test: a primary that stops answering is given up after 1 s.
    env["CLUSTER_NODE_TIMEOUT_MS"] = "1000"
    started = subprocess.run(
        [str(ROOT / "scripts/services"), "--cluster"],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr + started.stdout
    url = next(
        line.split("=", 1)[1]
        for line in (run_dir / "env").read_text().splitlines()
        if line.startswith("export WAITROOM_REDIS_URL=")
    )
    try:
        yield Cluster(url, run_dir)
    finally:
        subprocess.run(
            [str(ROOT / "scripts/services"), "stop", "--cluster"],
            env=env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip


@pytest.fixture
async def mux(cluster: Cluster) -> AsyncIterator[Multiplexer]:
    client = Multiplexer(cluster.url, timeout=2.0)
    yield client
    await client.aclose()


def tag() -> str:
    return f"t{secrets.token_hex(4)}"


async def test_every_command_reaches_its_slots_primary_and_scripts_load_everywhere(
    cluster: Cluster, mux: Multiplexer
) -> None:
    keys = [f"{tag()}:{{ev{i}}}:k" for i in range(60)]
    await asyncio.gather(*(mux.execute("SET", k, k, "PX", 60_000) for k in keys))
    assert await asyncio.gather(*(mux.execute("GETDEL", k) for k in keys)) == [
        k.encode() for k in keys
    ]
    primaries = {cluster.primary_of(key_slot(k.encode()))[1] for k in keys}
    assert len(primaries) == 3  # the keys were spread over every primary
    sha = await mux.script_load("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    for port in primaries:
        with cluster.node(port) as c:
            assert c.script_exists(sha) == [True]
    counters = [f"{tag()}:{{ev{i}}}:n" for i in range(30)]
    assert await asyncio.gather(*(mux.evalsha(sha, 1, k, 2) for k in counters)) == [2] * 30
    # redis-py's cluster client (the other paths) reads what the Multiplexer wrote.
    client = async_redis(cluster.url)
    try:
        assert await client.get(counters[0]) == b"2"
        await client.delete(*counters)
    finally:
        await client.aclose()


def _move_slot(cluster: Cluster, slot: int, *, finish: bool) -> tuple[int, int]:
    """Migrate ``slot`` to another primary (its keys first); with ``finish`` the move is
    completed, else left half-way (``MIGRATING``/``IMPORTING``). (source, target) ports."""
    source_id, source = cluster.primary_of(slot)
    target_id, target = next(
        (n[0], n[1]) for n in cluster.nodes() if n[3] and n[1] != source and "fail" not in n[2]
    )
    with cluster.node(target) as t, cluster.node(source) as s:
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            s.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        if finish:
            for port in [*cluster.ports(), target, source]:
                with cluster.node(port) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return source, target


async def test_a_slot_that_moved_or_is_moving_is_followed(
    cluster: Cluster, mux: Multiplexer
) -> None:
    moved = f"{tag()}:{{moved}}:k"
    await mux.execute("SET", moved, "before", "PX", 60_000)  # the slot table is now known
    _move_slot(cluster, key_slot(moved.encode()), finish=True)
    # The Multiplexer still thinks the old primary has it: MOVED, and it follows.
    assert await mux.execute("GET", moved) == b"before"
    assert await mux.execute("SET", moved, "after") == b"OK"
    assert await mux.execute("GETDEL", moved) == b"after"

    asking = f"{tag()}:{{asking}}:k"
    await mux.execute("SET", asking, "x", "PX", 60_000)
    slot = key_slot(asking.encode())
    source, target = _move_slot(cluster, slot, finish=False)
    # Half-way: the key lives on the target already, the slot still on the source: ASK.
    assert await mux.execute("GET", asking) == b"x"
    # Complete the move so the other tests see a settled cluster.
    target_id = next(n[0] for n in cluster.nodes() if n[1] == target)
    for port in {*cluster.ports(), source, target}:
        with cluster.node(port) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    assert await mux.execute("GETDEL", asking) == b"x"


async def test_a_primary_killed_fails_its_commands_as_503_then_its_replica_serves(
    cluster: Cluster, mux: Multiplexer
) -> None:
    key = f"{tag()}:{{failover}}:k"
    await mux.execute("SET", key, "kept")
    with cluster.node(cluster.primary_of(key_slot(key.encode()))[1]) as primary:
        primary.execute_command("WAIT", 1, 2000)  # the replica has the key
        pid = int(primary.info("server")["process_id"])
    os.kill(pid, signal.SIGKILL)  # a primary of ours (the module's private cluster)
    failures = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            value = await mux.execute("GET", key)
        except rx.RedisError as exc:
            error = dependency_error(exc)
            assert error is not None and error.status == 503, repr(exc)
            failures += 1
            await asyncio.sleep(0.2)
            continue
        assert value == b"kept"
        break
    else:
        raise AssertionError("the promoted replica never served")
    assert failures > 0  # the failover was seen, as a 503, never a 500
