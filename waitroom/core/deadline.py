"""A deadline on every fan-facing HTTP request: an answer in bounded time, never a hang.

Each dependency call is bounded on its own (Redis and PostgreSQL by the dependency timeout,
an inventory ask likewise), but a request makes several, and on a saturated machine (a burst
of thousands of fans reconnecting after an outage) the waits for a pooled connection, the
event loop and the actor add up past any one bound. So the request as a whole gets one:
:class:`DeadlineMiddleware` answers 503 ``request_timeout`` with ``Retry-After`` when the app
has not started its response in time, and cancels the rest of its work.

Cancelling is safe because every write a fan can make is idempotent: a reservation the actor
committed after its asker was cancelled is found again by its Idempotency-Key, a payment
started is answered as ``payment_in_progress`` on a retry, a join returns the same place.
Operators' routes (``/v1/admin``) are exempt: a restore of a large room may take longer, and
an operator waits for it rather than retrying.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waitroom.core.errors import Unavailable
from waitroom.core.http import error_response

DEADLINE_EXCEEDED = Counter(
    "waitroom_request_deadline_exceeded_total",
    "Requests answered 503 request_timeout because they ran past the request deadline.",
)


_SCOPE_KEY = "waitroom.deadline"


def extend(scope: Scope, seconds: float) -> None:
    """Move the request's deadline ``seconds`` later: for a handler about to wait that long
    on purpose (a long poll), whose work around the wait stays bounded as any request's.
    No-op outside the middleware (an exempt path, a test app)."""
    deadline = scope.get(_SCOPE_KEY)
    if isinstance(deadline, asyncio.Timeout) and not deadline.expired():
        when = deadline.when()
        if when is not None:
            deadline.reschedule(when + seconds)


class DeadlineMiddleware:
    """Answer 503 ``request_timeout`` for an HTTP request not answered within ``seconds``."""

    def __init__(
        self, app: ASGIApp, *, seconds: float, exempt: tuple[str, ...] = ("/v1/admin",)
    ) -> None:
        self.app = app
        self.seconds = seconds
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        started = False
        deadline = asyncio.timeout(self.seconds)

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not deadline.expired():
                    # The answer is going out: a body being written is not cut off half-way.
                    deadline.reschedule(None)
                # Otherwise the deadline fired while this answer was being made and the app
                # took the cancellation itself (a dependency's own timeout expiring at the
                # same moment turns it into its 503): that answer goes out as it is.
            await send(message)

        # A handler that waits on purpose (a long poll) moves its own deadline: extend().
        scope[_SCOPE_KEY] = deadline
        try:
            async with deadline:
                await self.app(scope, receive, send_started)
        except TimeoutError:
            if started or not deadline.expired():
                raise  # not ours (a dependency's own timeout escaping) or too late to answer
            DEADLINE_EXCEEDED.inc()
            error = Unavailable(
                "the server could not answer in time; retry (with the same Idempotency-Key)",
                retry_after=1,
                code="request_timeout",
            )
            await error_response(error)(scope, receive, send)
