"""Test harness: a private database and Redis prefix per test run, and real servers on port 0.

Tests talk to the real Redis and PostgreSQL named by ``WAITROOM_REDIS_URL`` and
``WAITROOM_DATABASE_URL`` (as ``scripts/services`` left them), never to fakes. Each run gets
a freshly created, migrated database with a random name and a random Redis key prefix, both
removed at the end, so concurrent runs never see each other's data.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis
import redis.cluster
import uvicorn
from redis.asyncio import Redis as AsyncRedis
from starlette.applications import Starlette

from waitroom.app import create_app
from waitroom.core import httpserver
from waitroom.core.db import drop_database, ensure_database, migrate
from waitroom.core.redis import cluster_seeds, is_cluster_url, redis_from_url
from waitroom.core.settings import Settings, load_settings, settings_env

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-" + secrets.token_hex(8)


def base_settings() -> Settings:
    """Settings from the environment, as the scripts set it (defaults otherwise)."""
    return load_settings()


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name``."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def fresh_settings(tmp_dir: Path, **overrides: Any) -> Settings:
    """Settings for one test run: a new migrated database and a new Redis prefix."""
    base = base_settings()
    suffix = secrets.token_hex(4)
    dsn = with_database(base.database_url, f"waitroom_test_{suffix}")
    asyncio.run(_create(dsn))
    values = msgspec.structs.asdict(base)
    values.update(
        database_url=dsn,
        redis_prefix=f"t{suffix}",
        admin_token=ADMIN_TOKEN,
        run_dir=str(tmp_dir),
        port=0,
        log_level="warning",
        # Admission loops would admit the fans of every test's events; the tests of
        # admission turn them on (tests/admission).
        admission_loop=False,
        # Tests spread their fans over many addresses with X-Forwarded-For from 127.0.0.1,
        # as a local reverse proxy would send it (tests/test_proxy.py checks the real thing).
        trusted_proxies=("127.0.0.1/32",),
        # Every test's server sees 127.0.0.1 and shares the run's Redis prefix: the tests
        # of wrong admin tokens would add up to 429s. tests/test_admin_auth.py sets its own.
        admin_auth_failures=100_000,
        # Joins would need a solved proof-of-work challenge; the tests of the challenge
        # (tests/test_challenge.py, test_identity_limits.py) and of the waiting page turn
        # it on, as production has it.
        challenge=False,
    )
    values.update(overrides)
    return Settings(**values)


async def _create(dsn: str) -> None:
    await ensure_database(dsn)
    await migrate(dsn)


def cleanup(settings: Settings) -> None:
    """Drop the run's database and delete its Redis keys."""
    asyncio.run(drop_database(settings.database_url))
    client = sync_redis(settings.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


class ServerThread:
    """A real uvicorn server on 127.0.0.1 and a free port, running in a background thread."""

    def __init__(self, app: Starlette) -> None:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it every response waits ~40 ms on Nagle's algorithm.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        # proxy_headers off and our HTTP protocol, as `waitroom serve` runs it: only
        # WAITROOM_TRUSTED_PROXIES may make a forwarded header count.
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            http=httpserver.PROTOCOL,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by start()
            self.error = exc

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"server failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 20 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@contextmanager
def running(settings: Settings, **kwargs: Any) -> Iterator[ServerThread]:
    """A server for ``settings`` for the duration of the block."""
    server = ServerThread(create_app(settings, **kwargs)).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A TCP port that was free a moment ago (for child processes that bind themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sync_redis(url: str) -> redis.Redis:
    """A synchronous client for ``url``: redis-py's cluster client for a cluster URL (the
    suite also runs against a Redis Cluster, ``WAITROOM_REDIS_URL=redis+cluster://...``)."""
    if is_cluster_url(url):
        seeds, _ = cluster_seeds(url)
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in seeds]  # type: ignore[no-untyped-call]
        return cast(redis.Redis, redis.cluster.RedisCluster(startup_nodes=nodes))
    return redis.Redis.from_url(url)


def async_redis(url: str) -> AsyncRedis:
    """An asyncio client for ``url``, a cluster's when it names one (see :func:`sync_redis`)."""
    return redis_from_url(url)


def run_cli(
    settings: Settings, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real ``waitroom`` console script of this virtualenv."""
    exe = Path(sys.executable).with_name("waitroom")
    return subprocess.run(
        [str(exe), *args],
        env={**settings_env(settings), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


class WorkersThread:
    """``waitroom workers`` (payments, outbox relay, safety net) in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from workers.main import run_workers

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            self.ready.set()
            await run_workers(self.settings, self.stop_event, drain_s=2)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self.ready.set()

    def start(self) -> WorkersThread:
        self.thread.start()
        if not self.ready.wait(20):
            raise RuntimeError("workers did not start within 20 s")
        return self

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout=20)
        if self.error is not None:
            raise RuntimeError(f"workers failed: {self.error!r}")
