"""What every benchmark shares: a private database and Redis prefix, percentiles, servers."""

from __future__ import annotations

import math
import re
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from waitroom.core.db import drop_database, ensure_database, migrate
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile of ``values`` (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def metric_sum(text: str, name: str) -> float | None:
    """The sum of every sample of ``name`` in a Prometheus text page (None: not there)."""
    found: float | None = None
    for match in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M):
        found = (found or 0.0) + float(match.group(1))
    return found


@asynccontextmanager
async def fresh_database(settings: Settings) -> AsyncIterator[str]:
    """A new, migrated database next to the configured one, dropped afterwards."""
    parts = urlsplit(settings.database_url)
    dsn = urlunsplit(
        (parts.scheme, parts.netloc, f"/waitroom_stress_{secrets.token_hex(4)}", parts.query, "")
    )
    await ensure_database(dsn)
    try:
        await migrate(dsn)
        yield dsn
    finally:
        await drop_database(dsn)


@asynccontextmanager
async def fresh_prefix(settings: Settings) -> AsyncIterator[str]:
    """A new Redis key prefix whose keys are deleted afterwards."""
    prefix = f"stress{secrets.token_hex(4)}"
    try:
        yield prefix
    finally:
        client = redis_from_url(settings.redis_url)
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{prefix}:*", count=2000):
                batch.append(key)
                if len(batch) >= 1000:
                    await client.delete(*batch)
                    batch = []
            if batch:
                await client.delete(*batch)
        finally:
            await client.aclose()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
