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
#: How often the deadlines in force are looked at: a request is cut off at most this late.
TICK_S = 0.1


class Deadline:
    """A deadline on the task that enters it, as :func:`asyncio.timeout` (the same
    cancel-then-``TimeoutError`` protocol, ``when``/``reschedule``/``expired``), for a
    fraction of its cost.

    ``asyncio.timeout`` starts a timer of the event loop for every request and cancels it
    when the answer starts (~5 us a request, twice the loop's own work for a timer). Here a
    request's deadline is only noted in its loop's :class:`_Watch`, which looks at every
    deadline in force each :data:`TICK_S`: a request past its deadline is cancelled at most
    a tick late, and no request pays for a timer of its own.
    """

    __slots__ = ("_cancelling", "_expired", "_expiring", "_task", "_watch", "_when")

    def __init__(self, seconds: float) -> None:
        self._watch = _Watch.of(asyncio.get_running_loop())
        self._when: float | None = self._watch.loop.time() + seconds
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expiring = False
        self._expired = False

    def when(self) -> float | None:
        """The loop time of the deadline; None once there is none."""
        return self._when

    def reschedule(self, when: float | None) -> None:
        """Move the deadline to loop time ``when`` (None: no deadline any more)."""
        self._when = when
        if self._task is not None and not self._expiring:
            if when is None:
                self._watch.active.pop(self, None)
            else:
                self._watch.active[self] = None
                self._watch.start()

    def expired(self) -> bool:
        """Whether the deadline passed and cancelled the task."""
        return self._expiring or self._expired

    def _fire(self) -> None:
        assert self._task is not None
        self._expiring = True
        self._task.cancel()

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline must be entered in a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.reschedule(self._when)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._watch.active.pop(self, None)
        if self._expiring:
            self._expiring = False
            self._expired = True
            assert self._task is not None
            # As asyncio.timeout: the cancellation is ours to turn into TimeoutError only if
            # nobody else asked to cancel the task meanwhile.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc


class _Watch:
    """The deadlines in force on one event loop, looked at every :data:`TICK_S` while any is."""

    _by_loop: dict[asyncio.AbstractEventLoop, _Watch] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Insertion-ordered set of the deadlines of tasks inside their ``async with``.
        self.active: dict[Deadline, None] = {}
        self._ticking = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Watch:
        watch = cls._by_loop.get(loop)
        if watch is None:
            # One loop per process serves requests; loops of tests come and go (and closed
            # ones are dropped here, so that their watches do not pile up).
            for old in [old for old in cls._by_loop if old.is_closed()]:
                del cls._by_loop[old]
            watch = cls._by_loop[loop] = _Watch(loop)
        return watch

    def start(self) -> None:
        if not self._ticking:
            self._ticking = True
            self.loop.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        due = [d for d in self.active if d._when is not None and d._when <= now]
        for deadline in due:
            del self.active[deadline]
            deadline._fire()
        if self.active:
            self.loop.call_later(TICK_S, self._tick)
        else:
            self._ticking = False


def extend(scope: Scope, seconds: float) -> None:
    """Move the request's deadline ``seconds`` later: for a handler about to wait that long
    on purpose (a long poll), whose work around the wait stays bounded as any request's.
    No-op outside the middleware (an exempt path, a test app)."""
    deadline = scope.get(_SCOPE_KEY)
    if isinstance(deadline, Deadline) and not deadline.expired():
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
        deadline = Deadline(self.seconds)

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
