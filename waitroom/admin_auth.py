"""Operators' bearer tokens: who an admin request is, and a brake on guessing.

- **Named operators.** ``WAITROOM_ADMIN_TOKENS`` (``name:token,...``) and the single
  ``WAITROOM_ADMIN_TOKEN`` (the operator ``admin``) give every operator a token of their own,
  so the audit log says who made a change (``admin:NAME``). A given token is compared with
  every operator's, each as a SHA-256 digest with :func:`hmac.compare_digest`: equal lengths,
  no early exit, so the time taken tells neither which operator nor how much matched.
- **Failed logins are throttled per client address** (IPv4, or IPv6 /64; the address of
  :mod:`waitroom.core.clientaddr`): a token bucket in Redis (``failures.lua``) of
  ``WAITROOM_ADMIN_AUTH_FAILURES`` failures (10), refilled over :data:`FAILURES_WINDOW_S`
  (5 minutes: one every 30 s by default). An empty bucket answers 429
  ``admin_auth_throttled`` with ``Retry-After`` to every admin request from that address,
  right token or not. Ten mistakes in a row is more than an operator makes; a guesser gets
  2,880 tries a day per address, which against a 32-character random token is nothing.
  While Redis is down the bucket can be neither read nor charged: operators still get in
  (the detailed ``/readyz`` and ``/metrics`` are most needed then), and wrong tokens still
  get 401, unthrottled for that long.
- **Every failure is logged** (warning ``admin authentication failed``: client address,
  reason, request id; never any of the token's text).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import time

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from waitroom.core import clientaddr
from waitroom.core.audit import Actor
from waitroom.core.errors import RateLimited, Unauthorized
from waitroom.core.http import dependency_error, request_id_var
from waitroom.core.keys import Keys
from waitroom.core.lua_scripts import Script
from waitroom.core.settings import Settings, operators, staff
from waitroom.line.ratelimit import Limit

log = logging.getLogger("waitroom.admin")

#: Seconds over which an emptied bucket of failed logins refills completely.
FAILURES_WINDOW_S = 300.0
FAILURES_SCRIPT = Script("waitroom.line.lua", "failures.lua")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="waitroom-admin"'}


class OperatorTokens:
    """The operators' tokens, kept as SHA-256 digests, matched in constant time."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._digests = [(name, _digest(token)) for name, token in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, given: str) -> str | None:
        """The name of the operator whose token ``given`` is, or None."""
        digest = _digest(given)
        found: str | None = None
        for name, expected in self._digests:
            # No early exit: every operator's digest is compared whatever matched before.
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def failures_limit(settings: Settings) -> Limit:
    """The bucket of failed admin logins per client address under ``settings``."""
    burst = settings.admin_auth_failures
    return Limit(rate=burst / FAILURES_WINDOW_S, burst=burst)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@functools.lru_cache(maxsize=4)
def _tokens_of(admin_token: str | None, admin_tokens: tuple[str, ...]) -> OperatorTokens:
    return OperatorTokens(operators(Settings(admin_token=admin_token, admin_tokens=admin_tokens)))


def operator_tokens(settings: Settings) -> OperatorTokens:
    """The :class:`OperatorTokens` of ``settings``, built once per process."""
    return _tokens_of(settings.admin_token, settings.admin_tokens)


@functools.lru_cache(maxsize=4)
def _staff_of(staff_tokens: tuple[str, ...]) -> OperatorTokens:
    return OperatorTokens(staff(Settings(staff_tokens=staff_tokens)))


def staff_tokens(settings: Settings) -> OperatorTokens:
    """The door staff's tokens (``WAITROOM_STAFF_TOKENS``), built once per process."""
    return _staff_of(settings.staff_tokens)


def client_address(conn: HTTPConnection, settings: Settings) -> clientaddr.IPAddress | None:
    """The client address of ``conn`` under ``settings``' trusted proxies."""
    trusted = clientaddr.trusted_networks(settings.trusted_proxies)
    forwarded = conn.headers.getlist("x-forwarded-for") if trusted else []
    return clientaddr.client_address(conn.client.host if conn.client else None, forwarded, trusted)


#: Most seconds the failed-login throttle waits for Redis (it answers in a millisecond).
THROTTLE_TIMEOUT_S = 0.5


async def authenticate(
    conn: HTTPConnection, settings: Settings, redis: Redis, keys: Keys, *, door: bool = False
) -> Actor:
    """The operator behind ``conn``'s bearer token, or 401 / 429 (see the module's doc).

    With ``door`` (check-in), a door staff's token is taken too (the actor ``staff:NAME``);
    failures count in the same throttle.
    """
    tokens = operator_tokens(settings)
    door_tokens = staff_tokens(settings) if door else OperatorTokens({})
    if not tokens and not door_tokens:
        raise Unauthorized(
            "the admin API is disabled: set WAITROOM_ADMIN_TOKEN or WAITROOM_ADMIN_TOKENS",
            code="admin_disabled",
        )
    address = client_address(conn, settings)
    scheme, _, given = conn.headers.get("authorization", "").partition(" ")
    name = tokens.match(given.strip()) if scheme.lower() == "bearer" else None
    prefix = "admin"
    if name is None and door_tokens and scheme.lower() == "bearer":
        name = door_tokens.match(given.strip())
        prefix = "staff"
    subject = clientaddr.limit_subject(address)
    limit = failures_limit(settings)
    shown = str(address) if address is not None else clientaddr.UNKNOWN
    try:
        allowed, retry_ms = await asyncio.wait_for(
            FAILURES_SCRIPT(
                redis,
                [keys.admin_auth_failures(subject)],
                [limit.rate, limit.burst, int(time.time() * 1000), 0 if name else 1],
            ),
            # Short: the route itself may wait for Redis after this (a frozen Redis would
            # otherwise cost an operator twice the dependency timeout).
            min(settings.dependency_timeout_s, THROTTLE_TIMEOUT_S),
        )
    except Exception as exc:
        if dependency_error(exc) is None:
            raise
        # Redis is down: the bucket can be neither read nor charged. Operators still get in
        # (the detailed /readyz and /metrics matter most during an outage); guesses get
        # their 401 unthrottled for that long, harmless against a 32-character token.
        log.warning(
            "admin login throttle unavailable",
            extra={"client": shown, "error": repr(exc), "request_id": request_id_var.get()},
        )
        allowed, retry_ms = 1, 0
    if not allowed:
        log.warning(
            "admin authentication throttled",
            extra={"client": shown, "subject": subject, "request_id": request_id_var.get()},
        )
        raise RateLimited(
            "too many failed admin logins from this address; wait for Retry-After seconds",
            code="admin_auth_throttled",
            retry_after=int(retry_ms) / 1000,
        )
    if name is None:
        reason = "no_bearer_token" if scheme.lower() != "bearer" or not given else "bad_token"
        log.warning(
            "admin authentication failed",
            extra={"client": shown, "reason": reason, "request_id": request_id_var.get()},
        )
        raise Unauthorized(
            "send an operator's token as 'Authorization: Bearer <token>'",
            code="admin_token_invalid",
            headers=dict(_CHALLENGE),
        )
    return Actor(
        name=f"{prefix}:{name}",
        client_address=str(address) if address else None,
        request_id=request_id_var.get(),
    )
