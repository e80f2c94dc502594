"""What a request handler needs from the running process: settings and dependency clients."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from waitroom.errors import Unauthorized
from waitroom.keys import Keys
from waitroom.settings import Settings


@dataclass
class Context:
    """The process-wide state the app's lifespan opens and closes.

    ``services`` holds the long-lived components later features start in the lifespan
    (broadcasters, admission loops, inventory actors), by name.
    """

    settings: Settings
    redis: Redis
    db: asyncpg.Pool[Any]
    keys: Keys
    services: dict[str, Any] = field(default_factory=dict)


def context(conn: HTTPConnection) -> Context:
    """The :class:`Context` of the app serving ``conn``."""
    ctx: Context = conn.app.state.ctx
    return ctx


def require_admin(conn: HTTPConnection) -> str:
    """Check the operators' bearer token; return the actor name written to the audit log."""
    token = context(conn).settings.admin_token
    if token is None:
        raise Unauthorized(
            "the admin API is disabled: set WAITROOM_ADMIN_TOKEN", code="admin_disabled"
        )
    header = conn.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest keeps the time taken independent of how much of the token matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthorized(
            "send the admin token as 'Authorization: Bearer <token>'",
            code="admin_token_invalid",
            headers={"WWW-Authenticate": 'Bearer realm="waitroom-admin"'},
        )
    return "admin-api"
