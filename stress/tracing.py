"""``python -m stress tracing``: what OpenTelemetry tracing costs a join, off and on.

Two servers of the join benchmark's app (:mod:`stress.join_app`, one worker each) run side
by side on the same fresh database and Redis prefix: one without ``OTEL_EXPORTER_OTLP_ENDPOINT``
(tracing off), one with it pointing at an OTLP/HTTP receiver in this process that reads and
discards what it is sent (tracing on: a server span per join, batched and exported as
protobuf). Load comes from :mod:`stress.loadgen` as in ``python -m stress join`` (a new fan
per request), in ``--rounds`` interleaved rounds (off, on, on, off...), so both sides see the
same noise. ``overhead_on`` = 1 - on/off.

Tracing off cannot be compared with the code before it was instrumented in one run, so its
cost is measured directly: the exact no-op sequence a join runs with tracing off (the
middleware's ``server_span`` call, enter, exit and check) is timed in a loop here, against
the same loop without it, and ``overhead_off_estimate`` = that cost x the off server's
requests per second (its share of one core's second: the server is one process, CPU-bound).
Target: ``overhead_off_estimate`` <= 2%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from admission import operators
from inventory import catalogue
from stress.common import free_port, fresh_database, fresh_prefix
from stress.join import _join_once, _side
from stress.loadgen import LoadResult, run_load
from stress.server import server_process, stopped_cleanly
from waitroom.core import tracing
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import load_settings

TARGET_OFF = 0.02
_HEADERS = [(b"host", b"127.0.0.1"), (b"content-length", b"0")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per side")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the sides")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured start per phase")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--loops", type=int, default=2_000_000, help="no-op span iterations")


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"tracing: {message}", file=sys.stderr, flush=True)


class _Discard:
    """An OTLP/HTTP endpoint that reads every export, counts it and answers 200."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.exports += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def noop_cost_s(loops: int) -> float:
    """Seconds per request of the middleware's tracing code with tracing off (min of 5)."""
    assert not tracing.enabled()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(loops):
            span = tracing.server_span("POST", _HEADERS)
            current = span.__enter__()
            if current is not tracing.NULL_SPAN:
                current.update_name("never")
            span.__exit__(None, None, None)
        traced = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(loops):
            pass
        empty = time.perf_counter() - started
        best = min(best, (traced - empty) / loops)
    return max(best, 0.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_settings()
    per_request_s = noop_cost_s(args.loops)
    _say(args, f"no-op tracing per request: {per_request_s * 1e9:.0f} ns")
    sink = _Discard()
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        work_dir = Path(tempfile.mkdtemp(prefix="waitroom-stress-tracing-"))
        common = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(work_dir),
            log_level="warning",
            trusted_proxies=("127.0.0.1/32",),
            challenge=False,
        )
        off = msgspec.structs.replace(common, port=free_port())
        on = msgspec.structs.replace(common, port=free_port())
        keys = Keys(prefix)
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        redis: Redis = redis_from_url(common.redis_url)
        argv = [sys.executable, "-m", "stress.join_app"]
        results: dict[str, list[LoadResult]] = {"off": [], "on": []}
        try:
            spec = catalogue.EventCreate(
                name="tracing benchmark",
                ticket_types=[catalogue.TicketTypeSpec("ga", 1_000_000, 1000, "EUR")],
            )
            event = await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
            await operators.update_admission(
                pool, redis, keys, event.id, operators.make_patch(paused=True), actor="stress"
            )
            os.environ.pop(tracing.ENDPOINT_VARIABLE, None)
            async with server_process(argv, off, work_dir / "off.log") as proc_off:
                os.environ[tracing.ENDPOINT_VARIABLE] = sink.url
                try:
                    starting_on = server_process(argv, on, work_dir / "on.log")
                    proc_on = await starting_on.__aenter__()
                finally:
                    os.environ.pop(tracing.ENDPOINT_VARIABLE, None)
                try:
                    for port, ip in ((off.port, "192.0.2.1"), (on.port, "192.0.2.2")):
                        status, _ = await _join_once(port, event.id, ip)
                        if status != 201:
                            raise RuntimeError(f"the first join answered {status}")
                    phases = [("off", off.port, proc_off.pid), ("on", on.port, proc_on.pid)]
                    for round_ in range(args.rounds):
                        order = phases if round_ % 2 == 0 else phases[::-1]
                        for index, (name, port, pid) in enumerate(order):
                            result = await run_load(
                                port=port,
                                method="POST",
                                path=f"/v1/events/{event.id}/queue",
                                connections=args.connections,
                                generators=args.generators,
                                seconds=args.seconds / args.rounds,
                                warmup=args.warmup,
                                ip_offset=(round_ * 2 + index + 1) << 20,
                                work_dir=work_dir,
                                watch={"server": [pid]},
                            )
                            results[name].append(result)
                            _say(args, f"round {round_ + 1} tracing {name}: {result.rps:.0f} j/s")
                finally:
                    await starting_on.__aexit__(None, None, None)
            clean = stopped_cleanly(proc_off) and stopped_cleanly(proc_on)
        finally:
            await redis.aclose()
            await pool.close()
            sink.close()
    side_off, side_on = _side(results["off"]), _side(results["on"])
    bad = sum(
        count
        for side in (side_off, side_on)
        for code, count in side["statuses"].items()
        if code != "201"
    )
    overhead_off = per_request_s * side_off["rps"]
    overhead_on = 1 - side_on["rps"] / max(side_off["rps"], 1e-9)
    return {
        "benchmark": "tracing",
        "ok": bad == 0 and clean and sink.exports > 0,
        "join_rps_tracing_off": side_off["rps"],
        "join_rps_tracing_on": side_on["rps"],
        "overhead_on": round(overhead_on, 4),
        "overhead_off_estimate": round(overhead_off, 5),
        "noop_ns_per_request": round(per_request_s * 1e9, 1),
        "p99_ms_tracing_off": side_off["p99_ms"],
        "p99_ms_tracing_on": side_on["p99_ms"],
        "target_off": TARGET_OFF,
        "met": {"overhead_off_estimate": overhead_off <= TARGET_OFF},
        "exports_received": sink.exports,
        "export_bytes": sink.bytes,
        "bad_answers": bad,
        "servers_stopped_cleanly": clean,
        "params": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "connections": args.connections,
            "generators": args.generators,
            "loops": args.loops,
            "server_workers": 1,
            "exporter": "otlp/http protobuf, batch span processor",
        },
        "sides": {"off": side_off, "on": side_on},
    }
