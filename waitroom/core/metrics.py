"""Prometheus metrics of one process, or of every worker process of one server, as one page.

``waitroom serve --workers N`` runs N uvicorn worker processes behind one socket. Each one
counts in its own memory, and a scrape of ``/metrics`` reaches whichever worker accepts the
connection: two scrapes in a row read two different processes, and Prometheus takes the
drop from one worker's count to the other's for a counter reset. So ``serve`` runs
prometheus_client's multiprocess mode when it starts several workers
(:func:`multiprocess_dir`): each worker writes its values to memory-mapped files in a
private directory, and :func:`exposition` merges every worker's files into one page,
counters and histograms summed, so every worker answers the same totals. (The other way,
one port per worker, would leave the scrape configuration to know how many workers each
node runs; one endpoint per node is what operators and the load balancer already have.)
With one worker, the default, nothing changes: values live in memory, as always.

Gauges in multiprocess mode say how the workers' values combine (``multiprocess_mode``):

- ``livesum``: each process holds a share (connections, pooled connections);
- ``livemax``: one process holds the value (the admission leader's view, the inventory
  owner's stock, the broadcaster's count of a shared Redis line). Its child is dropped
  with :func:`forget` when that process lets go; prometheus_client cannot remove a child
  from its files, so there the child is set to 0 instead, which ``max`` never prefers
  over the value of the process that holds it.

``live`` modes drop a worker's gauges when it exits (:func:`process_stopped`), and those of
workers killed without a word when the next one starts (:func:`process_started`). Counters
of exited workers stay in the sums: a total never goes down while the server runs.

Also here, for every long-lived process: how late its event loop runs timers, its
PostgreSQL pool, and a round trip to each dependency (:func:`monitoring`); and
:class:`MetricsListener`, the ``/metrics`` listener of a process without an HTTP server of its
own (``waitroom workers``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hmac
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

import asyncpg
import msgspec
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from waitroom.core.errors import SettingsError, Unauthorized
from waitroom.core.runtime import cancel_and_wait
from waitroom.core.settings import Settings, operators
from waitroom.core.stalls import StallWatch

log = logging.getLogger("waitroom.metrics")

#: prometheus_client's variable: the directory of the multiprocess mode's files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: prometheus_client picks its value class once, when it is imported, from the variable
#: above: whatever the variable says later, this is what the process counts with.
MULTIPROCESS: bool = values.ValueClass is not values.MutexValue

#: Seconds between two looks at the event loop's lateness and the pools.
MONITOR_EVERY_S = 1.0
#: Seconds between two round trips to each dependency.
PING_EVERY_S = 5.0

DEPENDENCIES = ("redis", "postgresql")

EVENT_LOOP_LAG = Histogram(
    "waitroom_event_loop_lag_seconds",
    "How late a timer of the process's event loop fires: how long any callback, a request's"
    " or a lease renewal's, waits behind work already queued.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
GC_PAUSES = Histogram(
    "waitroom_gc_pause_seconds",
    "How long each run of the cyclic garbage collector stopped the process (its event loop"
    " with it), by the oldest generation collected.",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DB_POOL_CONNECTIONS = Gauge(
    "waitroom_db_pool_connections",
    "PostgreSQL connections of the processes' pools, by state (in_use, idle).",
    ["state"],
    multiprocess_mode="livesum",
)
DB_POOL_MAX = Gauge(
    "waitroom_db_pool_max_connections",
    "Most PostgreSQL connections the processes' pools may open.",
    multiprocess_mode="livesum",
)
DEPENDENCY_PING = Histogram(
    "waitroom_dependency_ping_seconds",
    f"Round trip of a PING to Redis or a SELECT 1 on PostgreSQL, every {PING_EVERY_S:g} s.",
    ["dependency"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DEPENDENCY_ERRORS = Counter(
    "waitroom_dependency_errors_total",
    "Failures of Redis or PostgreSQL: requests answered 503 because of one, and failed"
    " round trips of the process's own pings, by dependency (redis, postgresql, other).",
    ["dependency"],
)
for _dependency in (*DEPENDENCIES, "other"):
    # Made at zero, so that a rate over them is 0 rather than no data before the first one.
    DEPENDENCY_ERRORS.labels(_dependency)


def exposition() -> bytes:
    """The Prometheus text page of this process, or of every worker of its server."""
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def forget(gauge: Gauge, *labels: str) -> None:
    """Stop reporting ``gauge``'s child ``labels`` from this process (see the module's
    docstring: removed, or set to 0 in multiprocess mode)."""
    if MULTIPROCESS:
        gauge.labels(*labels).set(0)
        return
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


@contextlib.contextmanager
def multiprocess_dir(workers: int) -> Iterator[str | None]:
    """For a server of ``workers`` processes, a fresh private directory for their metrics,
    named in the environment they inherit, and removed when the server stops; None (and
    nothing done) for one worker, which counts in memory."""
    if workers <= 1:
        yield None
        return
    path = tempfile.mkdtemp(prefix="waitroom-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    # uvicorn spawns its workers: each imports prometheus_client afresh and sees this.
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def process_started() -> None:
    """Drop the live gauges of worker processes that are gone without saying so (killed):
    uvicorn replaces a dead worker, and its successor must not add the dead one's sockets."""
    path = os.environ.get(MULTIPROC_ENV)
    if not MULTIPROCESS or not path:
        return
    pids = {int(m.group(1)) for f in os.listdir(path) if (m := _LIVE_FILE.match(f))}
    for pid in pids - {os.getpid()}:
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def process_stopped() -> None:
    """Drop this worker's live gauges: it no longer holds what they count."""
    path = os.environ.get(MULTIPROC_ENV)
    if MULTIPROCESS and path:
        multiprocess.mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now has that pid
        return True
    return True


# --- the process monitor -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def monitoring(
    redis: Redis, db: asyncpg.Pool[Any], *, timeout_s: float, stall_ms: int = 0
) -> AsyncIterator[None]:
    """Watch the event loop, the PostgreSQL pool and a round trip to each dependency for
    the duration of the block (two tasks, one timer a second and two pings every
    :data:`PING_EVERY_S`), and with ``stall_ms`` the loop's stalls longer than that
    (:mod:`waitroom.core.stalls`)."""
    probes: dict[str, Callable[[], Awaitable[Any]]] = {
        "redis": redis.ping,
        "postgresql": lambda: db.fetchval("SELECT 1"),
    }
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)
    tasks = [
        asyncio.create_task(_watch_loop(db), name="metrics:loop"),
        asyncio.create_task(_ping(probes, timeout_s), name="metrics:ping"),
    ]
    watch = StallWatch(stall_ms / 1000) if stall_ms > 0 else None
    if watch is not None:
        watch.start()
    try:
        yield
    finally:
        if watch is not None:
            watch.stop()
        # Cancelled again until they end: asyncio.wait_for in Python 3.11 can swallow a
        # cancellation that lands as the probe answers, and the ping would then go on forever.
        await asyncio.gather(*(cancel_and_wait(task) for task in tasks))


#: Collections timed since the monitor last looked: (generation, seconds).
_collections: collections.deque[tuple[int, float]] = collections.deque(maxlen=10_000)
_collection_started = [0.0]


def _time_collection(phase: str, info: dict[str, int]) -> None:
    # Called by the collector itself, at whatever allocation set it off: possibly inside
    # prometheus_client's own (non-reentrant) lock, so the pause is only noted here and
    # observed by the monitor (a histogram observed from here could deadlock).
    if phase == "start":
        _collection_started[0] = time.perf_counter()
    elif _collection_started[0]:
        _collections.append((info["generation"], time.perf_counter() - _collection_started[0]))


async def _watch_loop(db: asyncpg.Pool[Any]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        scheduled = loop.time() + MONITOR_EVERY_S
        await asyncio.sleep(MONITOR_EVERY_S)
        EVENT_LOOP_LAG.observe(max(0.0, loop.time() - scheduled))
        while _collections:
            generation, seconds = _collections.popleft()
            GC_PAUSES.labels(str(generation)).observe(seconds)
        size, idle = db.get_size(), db.get_idle_size()
        DB_POOL_CONNECTIONS.labels("in_use").set(size - idle)
        DB_POOL_CONNECTIONS.labels("idle").set(idle)
        DB_POOL_MAX.set(db.get_max_size())


async def _ping(probes: dict[str, Callable[[], Awaitable[Any]]], timeout_s: float) -> None:
    while True:
        for name, probe in probes.items():
            started = time.perf_counter()
            try:
                await asyncio.wait_for(probe(), timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # what failed is /readyz's and the logs' to say
                DEPENDENCY_ERRORS.labels(name).inc()
            else:
                DEPENDENCY_PING.labels(name).observe(time.perf_counter() - started)
        await asyncio.sleep(PING_EVERY_S)


# --- a /metrics listener of its own --------------------------------------------------------


def metrics_app(settings: Settings) -> Starlette:
    """An app serving only ``GET /metrics``, with an operator's token unless metrics are
    public (``WAITROOM_METRICS_PUBLIC``), as the server's own ``/metrics``."""
    tokens = [token.encode() for token in operators(settings).values()]

    async def endpoint(request: Request) -> Response:
        if not settings.public_metrics and not _authorized(request, tokens):
            refused = Unauthorized(
                "send an operator's token as 'Authorization: Bearer <token>'",
                code="admin_token_invalid",
            )
            return Response(
                msgspec.json.encode(refused.body()),
                status_code=refused.status,
                media_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])


def _authorized(request: Request, tokens: list[bytes]) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    presented = given.strip().encode()
    # Every token compared, in constant time: which one matched (or how far) must not show.
    return any([hmac.compare_digest(presented, token) for token in tokens])


class _Server(uvicorn.Server):
    """uvicorn, leaving signals to the process it runs in: that process's own SIGTERM
    handling drains its work first, and uvicorn's would take the signal away from it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class MetricsListener:
    """``GET /metrics`` (:func:`metrics_app`) on ``settings.host`` and ``port``, in the
    event loop of a process that serves no HTTP of its own (``waitroom workers``)."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen; a port that cannot be had stops the process with one line naming it."""
        host = self.settings.host
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host.strip("[]"), self.port), family=family)
        except OSError as exc:
            raise SettingsError(
                f"cannot serve metrics on {host}:{self.port}"
                f" ({os.strerror(exc.errno) if exc.errno else exc}): choose"
                " a free port (WAITROOM_WORKERS_METRICS_PORT, or --metrics-port)",
                variable="WAITROOM_WORKERS_METRICS_PORT",
            ) from None
        config = uvicorn.Config(
            metrics_app(self.settings),
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="metrics")
        log.info("serving metrics", extra={"url": f"http://{host}:{self.port}/metrics"})

    async def stop(self) -> None:
        """Stop listening (requests in flight finish)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
