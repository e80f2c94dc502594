"""``python -m stress affinity``: the ways a reservation reaches its event's inventory actor,
in one run: forwarded over a local socket, forwarded through Redis, or routed to it.

Issue 14 asks that a reservation reach its event's inventory actor "without paying twice":
forwarding batched, or avoided, measured both ways. On this machine, in one run, with the
same database and Redis, four sides at ``--concurrency`` keep-alive clients, every
reservation by another admitted fan with its own pass and ``Idempotency-Key`` (the generator
of ``python -m stress checkout``):

- ``workers2``: ``waitroom serve --workers 2``, the checkout benchmark's server: both workers
  accept on one socket, the kernel splits the connections, and the worker that does not host
  the event forwards its reservations to the one that does, over that worker's local socket
  (:mod:`inventory.siblings`);
- ``workers2_inbox``: the same server with ``WAITROOM_LOCAL_FORWARDING=false``: the
  forwarded reservations go through the event's Redis inbox instead, batched
  (:mod:`inventory.forwarding`), as they did before the local socket;
- ``lb_roundrobin``: two nodes (``waitroom serve``, one process each, named ``node1`` and
  ``node2``, standing for two machines: they forward through Redis) behind HAProxy
  (deploy/haproxy.cfg, :mod:`stress.nodes`), the fans sending no cookie: each request goes
  to either node, and half are forwarded;
- ``lb_affinity``: the same nodes and HAProxy, every fan sending the ``waitroom_node`` cookie
  its admitted status gave it (:mod:`waitroom.core.affinity`, ADR 0017): HAProxy sends every
  reservation to the node hosting the actor, and nothing is forwarded.

Each server has an event of its own. The fans of each side are joined and admitted
beforehand through that side's front door (the workers' port, or HAProxy), as many as each
round may use. The worker that hosts a server's event is the one that took its first
reservation; the node that hosts the nodes' event is the one that took its first reservation
(sent to ``node1`` directly); that an admitted fan's status names it in its cookie, through
HAProxy, is checked. Rounds are interleaved (ABCD, DCBA, ...). Reported per side: ``rps``,
``p50_ms``, ``p99_ms``, ``forwarded_share`` (from ``waitroom_inventory_forwarded_total`` of
every process), and ``cpu_ms_per_reservation`` by process (the server's processes, HAProxy,
Redis, PostgreSQL's backends); and the ratios of the reservation rates
(``local_vs_inbox``, ``affinity_vs_roundrobin``, ``affinity_vs_workers2``). ``ok`` is false
on any answer other than 201, a dropped connection, an acknowledged hold missing from
PostgreSQL, a ticket oversold, a forwarded reservation on the affinity side, an inbox entry
on the ``workers2`` side, or a status that does not name the owner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
from redis.asyncio import Redis

from inventory import catalogue
from inventory.hosting import node_name_of
from stress.checkout import (
    _WORKER_METRICS,
    RESERVE_BODY,
    TICKET_TYPE,
    _Bench,
    _Fan,
    _http,
    _need,
    _Round,
    _side,
    _socket_inodes,
    _workers_up,
    add_round_arguments,
)
from stress.common import free_port, metric_sum, percentile
from stress.nodes import Node, Nodes, running_nodes
from stress.server import server_process
from waitroom.core.affinity import NODE_COOKIE
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings, load_settings

SIDES = ("workers2", "workers2_inbox", "lb_roundrobin", "lb_affinity")
#: The sides served by ``waitroom serve --workers 2``: whether its workers forward locally.
_WORKER_SIDES = {"workers2": True, "workers2_inbox": False}


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"affinity: {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_round_arguments(parser, expect_rps=4000.0)
    parser.add_argument("--concurrency", type=int, default=50, help="keep-alive clients")


class _NodesBench(_Bench):
    """The checkout benchmark's rounds against the nodes behind HAProxy."""

    def __init__(
        self,
        args: argparse.Namespace,
        settings: Settings,
        pool: asyncpg.Pool[Any],
        redis: Redis,
        keys: Keys,
        work_dir: Path,
        nodes: Nodes,
    ) -> None:
        super().__init__(args, settings, pool, redis, keys, work_dir)
        self.nodes = nodes
        self.owner: Node = nodes.nodes[0]

    @property
    def other(self) -> Node:
        return next(n for n in self.nodes.nodes if n is not self.owner)

    async def groups(self) -> dict[str, list[int]]:
        return {
            "owner_node": [self.owner.pid],
            "other_node": [self.other.pid],
            "haproxy": [self.nodes.haproxy.pid],
            "redis": [self.redis_pid],
            "postgres": await self.postgres_backends(),
            "postgres_background": await self.postgres_background(),
        }

    def connection_split(self) -> dict[str, int]:
        """HAProxy's connections to each node (the clients' end at HAProxy)."""
        return {
            "owner": len(_socket_inodes(self.owner.port)),
            "other": len(_socket_inodes(self.other.port)),
        }

    async def worker_metrics(self) -> dict[str, float] | None:
        """The figures summed over the nodes, each asked directly (not through HAProxy)."""
        total = dict.fromkeys(_WORKER_METRICS, 0.0)
        for node in self.nodes.nodes:
            status, body = await _http(node.port, "GET", "/metrics")
            if status != 200:
                return None
            text = body.decode()
            for name in _WORKER_METRICS:
                total[name] += metric_sum(text, name) or 0.0
        return total


async def _events(pool: asyncpg.Pool[Any], args: argparse.Namespace) -> dict[str, str]:
    """An event per server: the two ``serve --workers 2`` sides' and the nodes'."""
    room = catalogue.RoomSpec(
        rate_per_second=args.admit_rate,
        max_active=10_000_000,
        pass_ttl_s=3600,
        hold_ttl_s=3600,
        abandon_grace_s=86_400,
    )

    async def create(name: str) -> str:
        spec = catalogue.EventCreate(
            name=f"affinity benchmark ({name})",
            ticket_types=[catalogue.TicketTypeSpec(TICKET_TYPE, args.stock, 4500, "EUR")],
            room=room,
        )
        now = datetime.now(UTC)
        return (await catalogue.create_event(pool, spec, actor="stress", now=now)).id

    return {name: await create(name) for name in (*_WORKER_SIDES, "nodes")}


async def _probe(port: int, event_id: str, fan: _Fan) -> int:
    """The first reservation of the event, on a fresh connection to ``port``: its status."""
    status, _ = await _http(
        port,
        "POST",
        f"/v1/events/{event_id}/reservations",
        {
            "Authorization": f"Bearer {fan.token}",
            "X-Queue-Pass": fan.queue_pass,
            "Idempotency-Key": f"probe-{fan.fan_id}",
            "Content-Type": "application/json",
        },
        RESERVE_BODY,
    )
    return status


async def _status_cookie(url: str, event_id: str, fan: _Fan) -> str | None:
    """The ``waitroom_node`` cookie an admitted fan's status sets, asked through ``url``."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get(
            f"/v1/events/{event_id}/queue/me",
            headers={"Authorization": f"Bearer {fan.token}", "X-Forwarded-For": "192.0.2.77"},
        )
    return response.cookies.get(NODE_COOKIE) if response.status_code == 200 else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # The first reservation decides each event's owner here (the nodes' admission leaders
    # lead the single servers' events too, and would host their actors: ADR 0022).
    base = msgspec.structs.replace(
        load_settings(),
        admission_loop=True,
        challenge=False,
        log_level="warning",
        warm_inventory=False,
    )
    work_dir = Path(tempfile.mkdtemp(prefix="waitroom-stress-affinity-"))
    async with running_nodes(base, work_dir / "nodes", count=2) as nodes:
        shared = nodes.settings
        keys = Keys(shared.redis_prefix)
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            shared.database_url, min_size=1, max_size=1
        )
        redis = redis_from_url(shared.redis_url)
        try:
            result = await _run(args, nodes, shared, pool, redis, keys, work_dir)
        finally:
            await redis.aclose()
            await pool.close()
    if result["ok"]:
        await asyncio.to_thread(shutil.rmtree, work_dir, ignore_errors=True)
    else:
        result["work_dir"] = str(work_dir)
    return result


async def _run(
    args: argparse.Namespace,
    nodes: Nodes,
    shared: Settings,
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    work_dir: Path,
) -> dict[str, Any]:
    events = await _events(pool, args)
    event_of = {**{side: events[side] for side in _WORKER_SIDES}, "lb_roundrobin": events["nodes"]}
    event_of["lb_affinity"] = events["nodes"]
    redis_pid = int((await redis.info("server"))["process_id"])
    lb_port = urlsplit(nodes.url).port
    assert lb_port is not None
    benches: dict[str, _Bench] = {}
    for side, local in _WORKER_SIDES.items():
        settings = msgspec.structs.replace(
            shared, port=free_port(), node_name="", local_forwarding=local
        )
        benches[side] = _Bench(args, settings, pool, redis, keys, work_dir)
    routed = _NodesBench(
        args, msgspec.structs.replace(shared, port=lb_port), pool, redis, keys, work_dir, nodes
    )
    benches["lb_roundrobin"] = benches["lb_affinity"] = routed
    for bench in benches.values():
        bench.redis_pid = redis_pid
    argv = [sys.executable, "-m", "waitroom", "serve", "--workers", "2"]
    per_round = args.seconds / args.rounds
    rounds: dict[str, list[_Round]] = {side: [] for side in SIDES}
    checks: dict[str, Any] = {}
    accepted = dict.fromkeys(events.values(), 0)
    need = _need(args, args.concurrency, per_round, None)
    async with contextlib.AsyncExitStack() as servers:
        procs = {}
        pools: dict[str, list[_Fan]] = {}
        for side in _WORKER_SIDES:
            bench = benches[side]
            proc = await servers.enter_async_context(
                server_process(argv, bench.settings, work_dir / f"{side}.log")
            )
            procs[side] = proc
            bench.server_pid = proc.pid
            workers = await _workers_up(proc.pid, 2, bench.settings.port)
            pools[events[side]] = await bench.make_fans(events[side], need)
            # The owner: whichever worker takes the first reservation.
            probe = pools[events[side]].pop()
            checks[f"probe_{side}"] = await _probe(bench.settings.port, events[side], probe)
            accepted[events[side]] += checks[f"probe_{side}"] == 201
            bench.owner_pid = await bench.owner_pid_of(events[side])
            bench.other_pid = next((w for w in workers if w != bench.owner_pid), 0)
        pools[events["nodes"]] = await routed.make_fans(events["nodes"], 2 * need)
        # node1 takes the nodes' first reservation, and hosts their event.
        probe = pools[events["nodes"]].pop()
        checks["probe_nodes"] = await _probe(nodes.nodes[0].port, events["nodes"], probe)
        accepted[events["nodes"]] += checks["probe_nodes"] == 201
        lease = await nodes.owner_lease(events["nodes"]) or ""
        owner_name = node_name_of(lease)
        checks["owner_node"] = owner_name
        routed.owner = nodes.node(owner_name) if owner_name else nodes.nodes[0]
        # What a fan's browser is told once admitted, through the balancer.
        checks["status_cookie"] = await _status_cookie(
            nodes.url, events["nodes"], pools[events["nodes"]][-1]
        )
        _say(args, f"owners: workers {[benches[s].owner_pid for s in _WORKER_SIDES]}, {owner_name}")
        for round_ in range(args.rounds):
            order = SIDES if round_ % 2 == 0 else SIDES[::-1]
            for side in order:
                bench, event_id = benches[side], event_of[side]
                take = _need(args, args.concurrency, per_round, {"seen": rounds[side]})
                if len(pools[event_id]) < take and bench.fans_admitted < args.max_fans:
                    more = max(take - len(pools[event_id]), 5000)
                    pools[event_id] += await bench.make_fans(event_id, more)
                batch, pools[event_id] = pools[event_id][:take], pools[event_id][take:]
                result, unused = await bench.reserve_round(
                    event_id,
                    batch,
                    args.concurrency,
                    seconds=per_round,
                    warmup=args.warmup,
                    tag=f"{side}-{round_}",
                    cookie=checks["status_cookie"] if side == "lb_affinity" else None,
                )
                pools[event_id] = unused + pools[event_id]
                accepted[event_id] += result.statuses.get(201, 0)
                rounds[side].append(result)
                _say(
                    args,
                    f"round {round_ + 1} {side}: {result.rps:.0f} req/s,"
                    f" p99 {percentile(result.latencies, 99) * 1000:.1f} ms,"
                    f" forwarded {result.forwarded.get('metric')},"
                    f" statuses {dict(sorted(result.statuses.items()))}",
                )
    for side, proc in procs.items():
        checks[f"server_exit_code_{side}"] = proc.returncode
    for name, event_id in events.items():
        row = await pool.fetchrow(
            "SELECT quantity, held, sold FROM ticket_types WHERE event_id = $1", event_id
        )
        holds = int(
            await pool.fetchval("SELECT count(*) FROM holds WHERE event_id = $1", event_id) or 0
        )
        assert row is not None
        checks[f"acked_missing_{name}"] = max(0, accepted[event_id] - holds)
        checks[f"oversold_{name}"] = max(
            0, int(row["held"]) + int(row["sold"]) - int(row["quantity"])
        )
    return _report(args, rounds, checks)


def _report(
    args: argparse.Namespace, rounds: dict[str, list[_Round]], checks: dict[str, Any]
) -> dict[str, Any]:
    sides = {side: _side(rs) for side, rs in rounds.items()}
    rps = {side: s["rps"] for side, s in sides.items()}
    bad = sum(
        count for s in sides.values() for code, count in s["statuses"].items() if code != "201"
    )
    lost = sum(s["connections_lost"] for s in sides.values())
    affinity_forwarded = sides["lb_affinity"]["forwarded"]["commands"]
    ok = (
        bad == 0
        and lost == 0
        and all(checks[f"probe_{side}"] == 201 for side in _WORKER_SIDES)
        and checks["probe_nodes"] == 201
        and sides["workers2"]["forwarded"]["inbox_entries"] == 0
        and checks["owner_node"] is not None
        and checks["status_cookie"] == checks["owner_node"]
        and affinity_forwarded == 0
        and all(v == 0 for k, v in checks.items() if k.startswith(("acked_missing", "oversold")))
    )
    return {
        "benchmark": "affinity",
        "ok": ok,
        "http_reserve_rps": rps,
        "http_reserve_p99_ms": {side: s["p99_ms"] for side, s in sides.items()},
        "http_reserve_p50_ms": {side: s["p50_ms"] for side, s in sides.items()},
        "forwarded_share": {side: s["forwarded_share"] for side, s in sides.items()},
        "cpu_ms_per_reservation": {side: s["cpu_ms_per_reservation"] for side, s in sides.items()},
        "local_vs_inbox": round(rps["workers2"] / max(rps["workers2_inbox"], 1e-9), 3),
        "affinity_vs_roundrobin": round(rps["lb_affinity"] / max(rps["lb_roundrobin"], 1e-9), 3),
        "affinity_vs_workers2": round(rps["lb_affinity"] / max(rps["workers2"], 1e-9), 3),
        "roundrobin_vs_workers2": round(rps["lb_roundrobin"] / max(rps["workers2"], 1e-9), 3),
        "bad_answers": bad,
        "connections_lost": lost,
        "checks": checks,
        "sides": sides,
        "params": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "generators": args.generators,
            "nodes": 2,
            "balancer": "HAProxy (deploy/haproxy.cfg)",
        },
    }
