"""The seat map's live updates pushed to viewers over WebSockets: ``stress seats --viewers N``.

The second half of issue 17's "map update fan-out cost" (the first, the actor-side cost of
building and encoding diffs, is :func:`stress.seats.fan_out`). After the sale, with the
sale's database:

1. a second event is created with the same generated arena, every seat still on sale: the
   *viewers' event* (the sale's own event is sold out by then, and viewers must start from
   the map the sale started from);
2. a real ``waitroom serve`` (one worker process: the process whose CPU is weighed) starts on
   that database and a private Redis key prefix, listening on 127.0.0.1 only;
3. ``--viewer-clients`` processes (:mod:`stress.seatviewers`) open ``--viewers`` WebSockets on
   ``/v1/events/{id}/seats/live`` between them, wait for each one's ``ready`` and read the
   snapshot, as the seat map page does;
4. the sale's group commits that changed seats (recorded by the actor, with their times) are
   replayed in order through the real publish path,
   :func:`waitroom.line.seatnews.publish_seat_changes` (a version from Redis, one ``PUBLISH``
   on the event's channel), at their recorded pace (``--replay-speed`` 1) or
   faster/slower; the server's subscription coalesces them every
   :data:`~waitroom.line.seatnews.FLUSH_INTERVAL_S` and sends each viewer its messages;
5. once every viewer has received the last publication (or ``--viewer-timeout`` runs out),
   the clients rebuild each viewer's map from the snapshot and its messages and compare it
   with the sale's final ledger.

Figures (``ws_fan_out``): ``viewers``; ``messages`` delivered in all and per viewer, their
``bytes_per_message``; ``messages_missed`` (messages the server flushed that a viewer did
not get: with one server process every viewer is due every distinct message),
``publications_missed`` (publications no message a viewer received covered) and
``viewers_diverged`` (viewers whose rebuilt map differs from the final ledger): all three
must be 0; ``lag_p50_ms``/``lag_p99_ms``/``lag_max_ms``, from a publication (just before
``publish_seat_changes`` is called, as the actor's host would call it after its commit) to
the arrival at a viewer of the first message that covers it, for every publication and
viewer (so a publication that waits for the next flush counts that wait:
up to the coalescing interval); ``server_cpu_s_per_1000_messages``, the server process's user
+ system CPU (``/proc/<pid>/stat``) from the first publication until the last viewer had the
last one, per 1,000 messages delivered (``server_idle_cpu_pct``, measured just before over a
second, says how much of that the idle server spends anyway); the clients' CPU apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import msgspec
from redis.asyncio import Redis

from stress.common import free_port, fresh_prefix, percentile
from stress.seatviewers import Publications, ViewerReport
from stress.server import cpu_seconds, server_process, stop, stopped_cleanly
from stress.websocket import Clients
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings
from waitroom.line.seatnews import FLUSH_INTERVAL_S, publish_seat_changes

#: Viewers per client process by default (well under the 20,000 open files of a process).
VIEWERS_PER_CLIENT = 4000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--viewers", type=int, default=0, help="seat map viewers on WebSockets (0: none)"
    )
    parser.add_argument(
        "--viewer-clients",
        type=int,
        default=0,
        help=f"viewer client processes (0: one per {VIEWERS_PER_CLIENT} viewers)",
    )
    parser.add_argument(
        "--replay-speed", type=float, default=1.0, help="replay pace, x the sale's own"
    )
    parser.add_argument(
        "--viewer-nap-ms", type=float, default=10.0, help="viewer clients' read batching"
    )
    parser.add_argument(
        "--viewer-timeout", type=float, default=180.0, help="bound on the viewers' part (s)"
    )


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"seats: {message}", file=sys.stderr, flush=True)


async def measure(
    args: argparse.Namespace,
    base: Settings,
    dsn: str,
    event_id: str,
    diffs: list[tuple[float, dict[str, str]]],
    expected: dict[str, str],
) -> dict[str, Any]:
    """Push ``diffs`` (the sale's commits: time, seat id -> letter) to ``args.viewers``
    viewers of ``event_id`` through a real server; ``expected`` is the final map."""
    async with fresh_prefix(base) as prefix:
        work_dir = Path(tempfile.mkdtemp(prefix="waitroom-stress-seats-"))
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(work_dir),
            log_level="warning",
            host="127.0.0.1",
            port=free_port(),
            # Nothing here waits in line: no admission ticks in the CPU weighed.
            admission_loop=False,
            # Each viewer sends its own X-Forwarded-For from 127.0.0.1: the per-address caps
            # on sockets then count each viewer apart.
            trusted_proxies=("127.0.0.1/32",),
        )
        (work_dir / "expected.json").write_bytes(msgspec.json.encode(expected))
        redis = redis_from_url(settings.redis_url)
        clients = Clients([])
        argv = [sys.executable, "-m", "waitroom", "serve", "--workers", "1"]
        try:
            async with (
                asyncio.timeout(args.viewer_timeout),
                server_process(argv, settings, work_dir / "server.log") as server,
            ):
                try:
                    result = await _measure(
                        args,
                        settings.port,
                        event_id,
                        diffs,
                        Keys(prefix),
                        redis,
                        server.pid,
                        work_dir,
                        clients,
                    )
                finally:
                    for proc in clients.procs:
                        await stop(proc, grace=10)
            result["server_stopped_cleanly"] = stopped_cleanly(server)
            result["ok"] = result["ok"] and stopped_cleanly(server)
            result["logs"] = str(work_dir)
            return result
        finally:
            await redis.aclose()


async def _spawn(
    args: argparse.Namespace, port: int, event_id: str, work_dir: Path, clients: Clients
) -> None:
    count = args.viewer_clients or max(1, math.ceil(args.viewers / VIEWERS_PER_CLIENT))
    shares = [args.viewers // count + (i < args.viewers % count) for i in range(count)]
    for i, share in enumerate(shares):
        with (work_dir / f"viewers-{i}.log").open("wb") as log:
            clients.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "stress.seatviewers",
                    f"--port={port}",
                    f"--event={event_id}",
                    f"--viewers={share}",
                    f"--ip-offset={i << 20}",
                    f"--nap-ms={args.viewer_nap_ms}",
                    f"--timeout={args.viewer_timeout}",
                    f"--expected={work_dir / 'expected.json'}",
                    f"--out={work_dir / f'lags-{i}.bin'}",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
            )


async def _measure(
    args: argparse.Namespace,
    port: int,
    event_id: str,
    diffs: list[tuple[float, dict[str, str]]],
    keys: Keys,
    redis: Redis,
    server_pid: int,
    work_dir: Path,
    clients: Clients,
) -> dict[str, Any]:
    await _spawn(args, port, event_id, work_dir, clients)
    started = time.monotonic()
    connected = sum(await clients.expect("connected", args.viewer_timeout))
    connect_s = time.monotonic() - started
    _say(args, f"{connected} seat map viewers ready in {connect_s:.1f} s")

    idle0, idle_at = cpu_seconds([server_pid]), time.monotonic()
    await asyncio.sleep(1.0)
    idle_pct = (cpu_seconds([server_pid]) - idle0) / (time.monotonic() - idle_at) * 100

    await clients.say("go")
    await clients.expect("recording", args.viewer_timeout)
    versions: list[int] = []
    times: list[float] = []
    cpu0 = cpu_seconds([server_pid])
    replay_started = time.monotonic()
    first = diffs[0][0] if diffs else 0.0
    for at, diff in diffs:
        await asyncio.sleep(
            max(0.0, replay_started + (at - first) / args.replay_speed - time.monotonic())
        )
        published = time.time()
        version = await publish_seat_changes(redis, keys, event_id, diff)
        if version is not None:
            versions.append(version)
            times.append(published)
    replay_s = time.monotonic() - replay_started
    path = work_dir / "publications.json"
    path.write_bytes(msgspec.json.encode(Publications(versions, times)))
    await clients.say(f"final {versions[-1] if versions else 0} {path}")
    delivered_to = sum(await clients.expect("delivered", args.viewer_timeout))
    cpu_s = cpu_seconds([server_pid]) - cpu0
    window_s = time.monotonic() - replay_started
    _say(args, f"{len(versions)} publications reached {delivered_to} viewers in {window_s:.1f} s")
    reports = [
        msgspec.json.decode(line, type=ViewerReport)
        for line in await clients.lines(args.viewer_timeout)
    ]
    for proc in clients.procs:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 15)
    lags = array("d")
    for i in range(len(clients.procs)):
        lag_file = work_dir / f"lags-{i}.bin"
        lags.frombytes(lag_file.read_bytes())
        lag_file.unlink()
    return figures(args, reports, lags, len(versions), connected, cpu_s, window_s, idle_pct) | {
        "replay_s": round(replay_s, 3),
        "connect_s": round(connect_s, 1),
    }


def figures(
    args: argparse.Namespace,
    reports: list[ViewerReport],
    lags: array[float],
    publications: int,
    connected: int,
    cpu_s: float,
    window_s: float,
    idle_pct: float,
) -> dict[str, Any]:
    """The ``ws_fan_out`` object from the clients' reports (see the module docstring)."""
    messages = sum(r.messages for r in reports)
    payload = sum(r.payload_bytes for r in reports)
    open_at_end = sum(r.open_at_end for r in reports)
    # One server process sends every viewer the same messages: the most any client saw.
    sent = max((r.distinct_messages for r in reports), default=0)
    missed = sent * connected - messages
    close_codes: dict[str, int] = {}
    for report in reports:
        for code, count in report.close_codes.items():
            close_codes[code] = close_codes.get(code, 0) + count
    dropped = sum(r.dropped for r in reports)
    diverged = sum(r.diverged for r in reports)
    publications_missed = sum(r.publications_missed for r in reports)
    ok = (
        connected == args.viewers
        and open_at_end == args.viewers
        and dropped == 0
        and diverged == 0
        and missed == 0
        and publications_missed == 0
        and messages > 0
    )
    return {
        "ok": ok,
        "viewers": args.viewers,
        "connected": connected,
        "open_at_end": open_at_end,
        "dropped": dropped,
        "close_codes": close_codes,
        "publications": publications,
        "messages_sent_per_viewer": sent,
        "messages": messages,
        "messages_per_viewer": round(messages / max(connected, 1), 2),
        "messages_missed": missed,
        "publications_missed": publications_missed,
        "viewers_behind": sum(r.behind for r in reports),
        "viewers_diverged": diverged,
        "bytes_per_message": round(payload / max(messages, 1), 1),
        "bytes_delivered": payload,
        "lag_p50_ms": round(percentile(lags, 50) * 1000, 1),
        "lag_p99_ms": round(percentile(lags, 99) * 1000, 1),
        "lag_max_ms": round(max(lags, default=0.0) * 1000, 1),
        "lag_samples": len(lags),
        "server_cpu_s": round(cpu_s, 3),
        "server_cpu_s_per_1000_messages": round(cpu_s / max(messages, 1) * 1000, 4),
        "server_cpu_us_per_kb": round(cpu_s / max(payload / 1000, 1e-9) * 1e6, 2),
        "server_idle_cpu_pct": round(idle_pct, 1),
        "window_s": round(window_s, 3),
        "final_wait_s": max((r.final_wait_s for r in reports), default=0.0),
        "clients_cpu_s": round(sum(r.cpu_s for r in reports), 2),
        "coalesce_ms": round(FLUSH_INTERVAL_S * 1000),
        "params": {
            "viewers": args.viewers,
            "viewer_clients": len(reports),
            "replay_speed": args.replay_speed,
            "viewer_nap_ms": args.viewer_nap_ms,
            "server_workers": 1,
        },
    }
