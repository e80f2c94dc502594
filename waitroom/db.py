"""PostgreSQL adapter: the connection pool and the versioned migrations.

Migrations are the ``NNNN_name.sql`` files beside this module, applied in order, each in its
own transaction and recorded in ``schema_migrations``. A session-level advisory lock makes
``waitroom migrate`` safe when several processes run it at once: the second waits, then
finds nothing left to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from waitroom.settings import Settings

log = logging.getLogger("waitroom.db")

#: Arbitrary constant naming the advisory lock that serializes migrations.
MIGRATION_LOCK_ID = 0x77616974726F6F6D  # "waitroom"


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema migration file."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    found = []
    for entry in resources.files("waitroom.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            found.append(Migration(int(version), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def migrate(dsn: str, *, timeout: float = 10.0) -> list[int]:
    """Apply the migrations the database at ``dsn`` lacks; return the versions applied."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, timeout=timeout)
    applied: list[int] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations():
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                log.info("applied migration", extra={"version": migration.version})
                applied.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()
    return applied


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def database_name(dsn: str) -> str:
    """The database named by ``dsn``."""
    return urlsplit(dsn).path.lstrip("/") or "postgres"


async def ensure_database(dsn: str, *, timeout: float = 10.0) -> bool:
    """Create the database named by ``dsn`` when it does not exist; True if it was created."""
    name = database_name(dsn)
    admin: asyncpg.Connection[Any] = await asyncpg.connect(
        _with_database(dsn, "postgres"), timeout=timeout
    )
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await admin.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:
            return False  # another process created it first
        return True
    finally:
        await admin.close()


async def drop_database(dsn: str, *, timeout: float = 10.0) -> None:
    """Drop the database named by ``dsn`` (tests), ending its other sessions."""
    name = database_name(dsn)
    admin: asyncpg.Connection[Any] = await asyncpg.connect(
        _with_database(dsn, "postgres"), timeout=timeout
    )
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await admin.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await admin.close()


async def create_pool(settings: Settings) -> asyncpg.Pool[Any]:
    """A pool that does not need PostgreSQL to be up yet: connections open on demand.

    Every connection attempt and every statement is bounded, so a database that is down or
    hanging turns into an error (503 upstream) rather than a stuck request.
    """
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=settings.db_pool_max,
        timeout=settings.dependency_timeout_s,
        command_timeout=max(settings.dependency_timeout_s, 5.0),
        max_inactive_connection_lifetime=60.0,
    )
    return pool
