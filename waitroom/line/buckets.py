"""Token buckets in Redis for limits outside the join: one ``EVALSHA`` takes a token.

The join charges its limits inside ``join.lua``; other routes call :func:`take` on a bucket
key of :class:`~waitroom.core.keys.EventKeys` (``bucket(scope, subject)``, in the event's
hash slot). Every process shares the buckets, so a limit holds across a fleet. The
arithmetic is ``lua/bucket.lua``'s, which :func:`waitroom.line.ratelimit.take` mirrors in
pure Python; the reply is the same :class:`~waitroom.line.ratelimit.Decision` the join uses.

Scopes in use: ``checkout`` (subject: a queue pass's jti) limits the checkout writes of one
pass (reserve, confirm, cancel): see :mod:`waitroom.checkout_api`.
"""

from __future__ import annotations

from waitroom.core.lua_scripts import Script
from waitroom.line.ratelimit import Decision, Limit
from waitroom.line.scripts import Client

TAKE = Script("waitroom.line.lua", "take.lua")


async def take(client: Client, key: str, limit: Limit, now_ms: int, cost: int = 1) -> Decision:
    """Take ``cost`` tokens from the bucket at ``key`` if it has them; the decision either way."""
    reply = await TAKE(client, [key], [limit.rate, limit.burst, now_ms, cost])
    allowed, remaining, retry_ms, reset_ms = (int(v) for v in reply)
    return Decision(
        allowed=bool(allowed),
        limit=limit.burst,
        remaining=remaining,
        retry_after_ms=retry_ms,
        reset_ms=reset_ms,
    )
