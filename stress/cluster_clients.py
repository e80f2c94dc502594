"""``python -m stress cluster_clients``: which Redis Cluster client for the join hot path?

Issue 13, item 1: teach our :class:`~waitroom.core.redis.Multiplexer` hash slots (one
pipelined connection per primary), or use a maintained cluster client? This measures the
throughput of the join's hot path, one ``EVALSHA`` of the real ``join.lua`` (with its
includes, through :func:`waitroom.line.scripts.join`: 11 keys in the event's slot, rate-limit
buckets, ``HEXISTS``, ``INCR``, ``ZADD``, ``HSET``...; every call a new fan, so every call does
the full work of a new place), from ``--concurrency`` (200) asyncio tasks making ``--calls``
(20,000) calls over ``--events`` (16) events, through each client in turn:

- ``multiplexer_one_primary``: our Multiplexer on ONE primary, with events of that primary's
  slots only: the per-primary cost a slot-aware multiplexer would have. Its
  ``scaled_3_primaries_calls_per_s`` = min(3 x calls/s, 1e6 / client us per call,
  cores x 1e6 / (client + Redis us per call)): three primaries serving in parallel, until
  the benchmark process's own core, or the machine's cores shared with the Redis nodes, run
  out (an estimate; the next side measures it);
- ``multiplexer_per_primary``: the slot-aware multiplexer, prototyped here (not in
  ``waitroom``): one Multiplexer per primary, each call routed by the hash slot of its first
  key from the slot table read once (no MOVED handling). Events spread over all primaries.
  This is the figure the libraries are compared with (``ratio_vs_multiplexer``);
- ``redis_py``: redis-py's ``redis.asyncio.cluster.RedisCluster`` (a dependency already);
- ``coredis``: ``coredis.RedisCluster`` (RESP3, an anyio client), when installed;
- ``glide``: ``valkey-glide``'s ``GlideClusterClient`` (a Rust core), when installed.

coredis and valkey-glide are not dependencies of waitroom: ``pip install coredis
valkey-glide`` into .venv to measure them; a client that is not installed is reported as such.
Every side gets rooms of its own (fresh, empty) and the same calls; the libraries spread their
events over all three primaries as the per-primary multiplexer does.

Per side: ``calls_per_s``, ``cpu_us_per_call`` (``time.process_time`` of this process, every
thread: glide's Rust threads count too), ``redis_cpu_us_per_call`` (the six nodes' ``INFO cpu``),
``p50_ms``/``p99_ms`` per call, ``errors``; and, when the benchmark started the cluster itself,
``scripts_on_primaries``: the script cache of every primary is flushed before each side, so the
side loads the script through its own ``NOSCRIPT`` handling, and this counts the primaries
that hold it afterwards.

The cluster: ``--cluster-url``, else ``WAITROOM_REDIS_URL`` when it is a ``redis+cluster://``
URL, else the checkout's private cluster (``.run/redis-cluster``) when it runs, else one
started for the run by ``scripts/services --cluster`` in a temporary directory
(``SERVICES_RUN_DIR``) and stopped at the end. The run's keys are deleted at the end. The
decision rule of the issue: prefer a library whose join throughput is within 20% of ours
(``ratio_vs_multiplexer`` >= 0.8). ``ok`` is false when any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from stress.common import percentile
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.redis import Multiplexer
from waitroom.line import scripts
from waitroom.line.ratelimit import Limit

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "scripts" / "services"
#: The decision rule of issue 13: a library within 20% of our join throughput is preferred.
THRESHOLD = 0.8
#: Limits no call reaches: every call does the full work of a new place.
WIDE = Limit(rate=1e6, burst=1_000_000)
#: Distinct client addresses per run (each a rate-limit bucket per event).
ADDRESSES = 61
NOW = 1_800_000_000.0
TIMEOUT_S = 2.0
SIDES = ("multiplexer_one_primary", "multiplexer_per_primary", "redis_py", "coredis", "glide")

Address = tuple[str, int]
Arg = str | bytes | int | float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=20_000, help="measured joins per client")
    parser.add_argument("--warmup", type=int, default=1_000, help="unmeasured joins first")
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent caller tasks")
    parser.add_argument("--events", type=int, default=16, help="events the joins spread over")
    parser.add_argument("--cluster-url", default="", help="redis+cluster://host:port,... to use")
    parser.add_argument(
        "--clients", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}"
    )


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"cluster_clients: {message}", file=sys.stderr, flush=True)


def _seeds(url: str) -> list[Address]:
    rest = url.removeprefix("redis+cluster://").split("/", 1)[0].split("?", 1)[0]
    rest = rest.rsplit("@", 1)[-1]
    seeds: list[Address] = []
    for seed in rest.split(","):
        host, _, port = seed.rpartition(":")
        seeds.append((host or "127.0.0.1", int(port)))
    return seeds


async def _cluster_ok(seeds: Sequence[Address]) -> bool:
    for host, port in seeds:
        client = Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2)
        try:
            info: Any = await _execute(client, "CLUSTER INFO")
            return bool(info.get("cluster_state") == "ok")
        except (rx.RedisError, OSError):
            continue
        finally:
            await client.aclose()
    return False


async def _execute(client: Redis, *command: str) -> Any:
    # redis-py's asyncio execute_command is untyped; its reply, parsed by command, is Any.
    execute: Any = client.execute_command
    return await execute(*command)


async def _services(run_dir: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "WAITROOM_REDIS_URL"}
    env["SERVICES_RUN_DIR"] = run_dir
    # Output to a file, not a pipe: the daemonized redis-servers can inherit a copy of the
    # pipe's write end (under uvloop a socketpair), and then EOF never comes.
    log = Path(run_dir) / "services.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(SERVICES), *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
        await proc.wait()
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/services {' '.join(args)} failed:\n{text}")
    return text


@contextlib.asynccontextmanager
async def _cluster(args: argparse.Namespace) -> AsyncIterator[tuple[list[Address], bool]]:
    """The seeds of a running cluster, and whether this run started it (and stops it)."""
    candidates = [args.cluster_url]
    configured = os.environ.get("WAITROOM_REDIS_URL", "")
    if configured.startswith("redis+cluster://"):
        candidates.append(configured)
    recorded = ROOT / ".run" / "redis-cluster" / "url"
    if recorded.exists():
        candidates.append(recorded.read_text().strip())
    for url in candidates:
        if url and await _cluster_ok(_seeds(url)):
            _say(args, f"using the running cluster {url}")
            yield _seeds(url), False
            return
    run_dir = tempfile.mkdtemp(prefix="waitroom-cluster-clients-")
    try:
        _say(args, "starting a private cluster: scripts/services --cluster")
        await _services(run_dir, "--cluster")
        url = (Path(run_dir) / "redis-cluster" / "url").read_text().strip()
        yield _seeds(url), True
    finally:
        # Plain `stop`: the cluster, and anything else the temporary run dir got.
        with contextlib.suppress(RuntimeError):
            await _services(run_dir, "stop")
        shutil.rmtree(run_dir, ignore_errors=True)


# --- the clients, each behind the two calls scripts.join makes (evalsha, script_load) -------


class _SlotRouted:
    """The slot-aware multiplexer, prototyped: one Multiplexer per primary, routed by slot."""

    def __init__(self, by_node: dict[Address, Multiplexer], slots: list[Address]) -> None:
        self._by_node = by_node
        self._by_slot = [by_node[node] for node in slots]

    async def evalsha(self, sha: str, numkeys: int, *args: Arg) -> Any:
        key = args[0]
        mux = self._by_slot[key_slot(key if isinstance(key, bytes) else str(key).encode())]
        return await mux.evalsha(sha, numkeys, *args)

    async def script_load(self, source: str) -> str:
        shas = await asyncio.gather(*(m.script_load(source) for m in self._by_node.values()))
        return shas[0]

    async def aclose(self) -> None:
        for mux in self._by_node.values():
            await mux.aclose()


class _Coredis:
    """coredis's cluster client, speaking redis-py's evalsha signature and NOSCRIPT class."""

    def __init__(self, client: Any, noscript: type[Exception]) -> None:
        self._client = client
        self._noscript = noscript

    async def evalsha(self, sha: str, numkeys: int, *args: Arg) -> Any:
        try:
            return await self._client.evalsha(sha, keys=args[:numkeys], args=args[numkeys:])
        except self._noscript as exc:
            raise rx.NoScriptError(str(exc)) from exc

    async def script_load(self, source: str) -> str:
        sha = await self._client.script_load(source)
        return sha.decode() if isinstance(sha, bytes) else str(sha)


class _Glide:
    """valkey-glide's cluster client: ``invoke_script`` (EVALSHA, loading it on NOSCRIPT)."""

    def __init__(self, client: Any, script: Any) -> None:
        self._client = client
        self._script = script

    async def evalsha(self, sha: str, numkeys: int, *args: Arg) -> Any:
        encoded = [a if isinstance(a, str | bytes) else str(a) for a in args]
        return await self._client.invoke_script(
            self._script, keys=encoded[:numkeys], args=encoded[numkeys:]
        )

    async def script_load(self, source: str) -> str:  # invoke_script loads by itself
        return scripts.JOIN.sha


@contextlib.asynccontextmanager
async def _client(
    side: str,
    seeds: list[Address],
    primaries: list[Address],
    slots: list[Address],
    concurrency: int,
) -> AsyncIterator[Any]:
    """A connected client of ``side``; ``None`` when its library is not installed."""
    if side == "multiplexer_one_primary":
        host, port = primaries[0]
        mux = Multiplexer(f"redis://{host}:{port}/0", timeout=TIMEOUT_S)
        try:
            yield mux
        finally:
            await mux.aclose()
    elif side == "multiplexer_per_primary":
        routed = _SlotRouted(
            {p: Multiplexer(f"redis://{p[0]}:{p[1]}/0", timeout=TIMEOUT_S) for p in primaries},
            slots,
        )
        try:
            yield routed
        finally:
            await routed.aclose()
    elif side == "redis_py":
        rc = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in seeds],
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            # Per node, and a caller beyond it fails (MaxConnectionsError), never waits: the
            # default of 100 fails calls at 200 callers. Sized as WAITROOM_REDIS_MAX_CONNECTIONS.
            max_connections=max(256, concurrency),
        )
        await rc.initialize()
        try:
            yield rc
        finally:
            await rc.aclose()
    elif side == "coredis":
        try:
            coredis: Any = importlib.import_module("coredis")
            exceptions: Any = importlib.import_module("coredis.exceptions")
        except ImportError:
            yield None
            return
        client = coredis.RedisCluster(
            startup_nodes=[{"host": h, "port": p} for h, p in seeds],
            stream_timeout=TIMEOUT_S,
            connect_timeout=TIMEOUT_S,
        )
        async with client:
            yield _Coredis(client, exceptions.NoScriptError)
    elif side == "glide":
        try:
            glide: Any = importlib.import_module("glide")
        except ImportError:
            yield None
            return
        config = glide.GlideClusterClientConfiguration(
            addresses=[glide.NodeAddress(h, p) for h, p in seeds],
            request_timeout=int(TIMEOUT_S * 1000),
        )
        client = await glide.GlideClusterClient.create(config)
        try:
            yield _Glide(client, glide.Script(scripts.JOIN.source))
        finally:
            await client.close()
    else:
        raise ValueError(f"unknown client {side!r}")


# --- the cluster's layout and state -----------------------------------------------------------


async def _layout(seeds: list[Address]) -> tuple[list[Address], list[Address], list[Address]]:
    """(primaries, every node, the primary of each of the 16384 slots)."""
    client = Redis(host=seeds[0][0], port=seeds[0][1], socket_timeout=5)
    try:
        raw: Any = await _execute(client, "CLUSTER", "SLOTS")
    finally:
        await client.aclose()
    slots: list[Address | None] = [None] * 16384
    primaries: set[Address] = set()
    nodes: set[Address] = set()
    # Each entry: [start, end, [host, port, id, ...] of the primary, [...] of each replica].
    for start, end, owner, *replicas in raw:
        primary = (_text(owner[0]), int(owner[1]))
        primaries.add(primary)
        nodes.add(primary)
        nodes.update((_text(r[0]), int(r[1])) for r in replicas)
        for slot in range(int(start), int(end) + 1):
            slots[slot] = primary
    if any(owner is None for owner in slots):
        raise RuntimeError("the cluster does not cover every slot")
    return sorted(primaries), sorted(nodes), [owner for owner in slots if owner is not None]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _on_nodes(nodes: Sequence[Address], *command: str) -> list[Any]:
    async def one(node: Address) -> Any:
        client = Redis(host=node[0], port=node[1], socket_timeout=5)
        try:
            return await _execute(client, *command)
        finally:
            await client.aclose()

    return list(await asyncio.gather(*(one(node) for node in nodes)))


async def _redis_cpu_s(nodes: Sequence[Address]) -> float:
    infos = await _on_nodes(nodes, "INFO", "cpu")
    return sum(float(i["used_cpu_sys"]) + float(i["used_cpu_user"]) for i in infos)


def _pick_events(
    prefix: str, count: int, slots: list[Address], among: Sequence[Address]
) -> list[EventKeys]:
    """``count`` events whose slots are on ``among``, as evenly spread as can be."""
    quota = {node: count // len(among) for node in among}
    for node in list(among)[: count % len(among)]:
        quota[node] += 1
    keys, i = Keys(prefix), 0
    picked: list[EventKeys] = []
    while len(picked) < count:
        ek = keys.event(f"e{i}")
        node = slots[key_slot(ek.meta.encode())]
        if quota.get(node, 0) > 0:
            quota[node] -= 1
            picked.append(ek)
        i += 1
    return picked


_ROOM = {
    "mode": "fifo",
    "opens_at": "0.0",
    "grace_s": "60",
    "rate": "10.0",
    "max_active": "100",
    "pass_ttl_s": "900",
    "paused": "0",
    "sold_out": "0",
    "admitted_total": "0",
    "abandoned_total": "0",
    "opened": "0",
    "drawn": "0",
    "commitment": "",
}


async def _cleanup(prefix: str, primaries: list[Address]) -> int:
    """Delete every key of the run (all start ``PREFIX-SIDE:``), primary by primary."""
    deleted = 0
    for host, port in primaries:
        client = Redis(host=host, port=port, socket_timeout=10)
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{prefix}-*", count=2000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await _unlink_by_slot(client, batch)
                    batch = []
            if batch:
                deleted += await _unlink_by_slot(client, batch)
        finally:
            await client.aclose()
    return deleted


async def _unlink_by_slot(client: Redis, keys: list[bytes]) -> int:
    by_slot: dict[int, list[bytes]] = {}
    for key in keys:
        by_slot.setdefault(key_slot(key), []).append(key)
    removed = 0
    for group in by_slot.values():
        removed += int(await client.unlink(*group))
    return removed


# --- one side -----------------------------------------------------------------------------


async def _run_calls(
    client: Any,
    events: list[EventKeys],
    fans: Sequence[tuple[int, str, str]],
    concurrency: int,
    latencies: list[float] | None,
) -> tuple[int, int, str]:
    """Make every join of ``fans`` from ``concurrency`` tasks; (errors, unexpected, first error)."""
    pending = iter(fans)
    errors = unexpected = 0
    first = ""
    clock = time.perf_counter

    async def caller() -> None:
        nonlocal errors, unexpected, first
        for event, fan, ip in pending:
            started = clock()
            try:
                reply = await scripts.join(
                    client, events[event], fan, now=NOW, ip=ip, ip_limit=WIDE, fan_limit=WIDE
                )
            except Exception as exc:
                errors += 1
                first = first or repr(exc)[:300]
                continue
            if latencies is not None:
                latencies.append(clock() - started)
            if reply is None or reply.outcome != "joined" or not reply.created:
                unexpected += 1
                first = first or f"unexpected reply {reply!r}"[:300]

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return errors, unexpected, first


async def _side(
    args: argparse.Namespace,
    side: str,
    seeds: list[Address],
    layout: tuple[list[Address], list[Address], list[Address]],
    prefix: str,
    own_cluster: bool,
) -> dict[str, Any]:
    primaries, nodes, slots = layout
    among = primaries[:1] if side == "multiplexer_one_primary" else primaries
    events = _pick_events(f"{prefix}-{side}", args.events, slots, among)
    setup = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds], socket_timeout=5)
    await setup.initialize()
    try:
        fields = [x for pair in _ROOM.items() for x in pair]
        for ek in events:
            await scripts.INIT_ROOM(
                setup, [ek.meta, ek.seed, ek.seq, ek.incarnation], ["", *fields]
            )
    finally:
        await setup.aclose()
    if own_cluster:
        # Each side loads the script through its own NOSCRIPT handling.
        await _on_nodes(primaries, "SCRIPT", "FLUSH")

    total = args.warmup + args.calls
    calls = [(i % len(events), f"fan-{i}", f"10.1.{i % ADDRESSES}.7") for i in range(total)]
    async with _client(side, seeds, primaries, slots, args.concurrency) as client:
        if client is None:
            return {"installed": False}
        errors, unexpected, first = await _run_calls(
            client, events, calls[: args.warmup], args.concurrency, None
        )
        latencies: list[float] = []
        redis_cpu = await _redis_cpu_s(nodes)
        cpu, wall = time.process_time(), time.perf_counter()
        more = await _run_calls(client, events, calls[args.warmup :], args.concurrency, latencies)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        redis_cpu = await _redis_cpu_s(nodes) - redis_cpu
    errors, unexpected, first = errors + more[0], unexpected + more[1], first or more[2]
    result: dict[str, Any] = {
        "calls_per_s": round(args.calls / wall),
        "cpu_us_per_call": round(cpu / args.calls * 1e6, 1),
        "redis_cpu_us_per_call": round(redis_cpu / args.calls * 1e6, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "errors": errors,
        "unexpected_replies": unexpected,
        "primaries_used": len(among),
    }
    if first:
        result["first_error"] = first
    if own_cluster:
        found = await _on_nodes(primaries, "SCRIPT", "EXISTS", scripts.JOIN.sha)
        result["scripts_on_primaries"] = sum(1 for reply in found if reply and reply[0])
    if side == "multiplexer_one_primary":
        result["scaled_3_primaries_calls_per_s"] = _scaled(result)
    return result


def _scaled(one: dict[str, Any]) -> int:
    """The one-primary figure scaled to three primaries: three times the calls, bounded by
    this process's CPU (one core: 1e6 / client us per call) and by the machine's cores shared
    by client and Redis nodes (cores x 1e6 / (client + Redis us per call))."""
    client_us = max(float(one["cpu_us_per_call"]), 1e-9)
    both_us = client_us + float(one["redis_cpu_us_per_call"])
    cores = os.cpu_count() or 1
    return round(min(3.0 * float(one["calls_per_s"]), 1e6 / client_us, cores * 1e6 / both_us))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [s.strip() for s in args.clients.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SIDES))
    if unknown:
        raise SystemExit(f"unknown clients: {', '.join(unknown)} (choose from {', '.join(SIDES)})")
    prefix = f"stressclu{secrets.token_hex(4)}"
    results: dict[str, Any] = {}
    async with _cluster(args) as (seeds, own_cluster):
        layout = await _layout(seeds)
        primaries = layout[0]
        if len(primaries) < 2:
            raise RuntimeError(f"a cluster of {len(primaries)} primary is no cluster to measure")
        try:
            for side in wanted:
                _say(args, f"measuring {side}")
                results[side] = await _side(args, side, seeds, layout, prefix, own_cluster)
                _say(args, f"{side}: {results[side]}")
        finally:
            deleted = await _cleanup(prefix, primaries)
            _say(args, f"deleted {deleted} keys of the run")

    reference = results.get("multiplexer_per_primary", {}).get("calls_per_s")
    one = results.get("multiplexer_one_primary", {})
    for side in ("redis_py", "coredis", "glide"):
        side_result = results.get(side)
        if not side_result or not side_result.get("calls_per_s"):
            continue
        rate = side_result["calls_per_s"]
        if reference:
            side_result["ratio_vs_multiplexer"] = round(rate / reference, 3)
        if one.get("calls_per_s"):
            side_result["ratio_vs_one_primary"] = round(rate / one["calls_per_s"], 3)
            side_result["ratio_vs_scaled"] = round(rate / one["scaled_3_primaries_calls_per_s"], 3)
    best = max(
        (
            s
            for s in ("redis_py", "coredis", "glide")
            if "ratio_vs_multiplexer" in results.get(s, {})
        ),
        key=lambda s: float(results[s]["ratio_vs_multiplexer"]),
        default=None,
    )
    if best is None:
        decision = "not decided (no library measured against the per-primary multiplexer)"
    elif results[best]["ratio_vs_multiplexer"] >= THRESHOLD:
        decision = f"library: {best} (within 20% of the slot-aware multiplexer)"
    else:
        decision = (
            "multiplexer with slots (no library within 20%); redis-py RedisCluster off the hot path"
        )
    failed = sum(
        int(r.get("errors", 0)) + int(r.get("unexpected_replies", 0)) for r in results.values()
    )
    return {
        "ok": failed == 0,
        "command": "python -m stress cluster_clients --json",
        "calls": args.calls,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "events": args.events,
        "primaries": [f"{h}:{p}" for h, p in primaries],
        "cluster_started_by_run": own_cluster,
        "threshold": THRESHOLD,
        "best_library": best,
        "decision": decision,
        "clients": results,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    found: dict[str, str] = {}
    for name in ("redis", "hiredis", "coredis", "valkey-glide"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found
