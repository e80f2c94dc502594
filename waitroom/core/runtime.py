"""Process-wide runtime tuning applied at the process edge (server, workers, benchmarks),
and the one way long-lived tasks are stopped."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: The collector's thresholds: net new objects between young collections, young collections
#: between middle ones, middle collections between full ones.
GC_THRESHOLDS = (5_000, 500, 100)


def tune_gc() -> None:
    """Run the older generations of the cyclic garbage collector rarely, the young one in
    short pauses.

    A busy server allocates a future, a command and a result per request; with the default
    thresholds (700, 10, 10) the middle and full collections ran every few thousand net new
    objects and walked every survivor again and again; run 1/700th as often they bought back
    a measurable share of CPU (about 13% on the reserve benchmark). Objects alive at start-up
    are frozen out of future collections.

    A young collection walks the objects created since the last one that are still alive,
    and stops the event loop while it does: with 50,000 of them a cluster node stopped for
    0.03-0.35 s each time (gc DEBUG_STATS, session 14), the tail of its fans' requests. With
    5,000 the pauses are a tenth as long and ten times as frequent, for the same work (each
    survivor is walked once as young either way); the middle generation's threshold grows
    by as much, so that it still runs every 2,500,000 net new objects (not once in a sale).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop where it is installed (as uvicorn runs the
    server), else on asyncio's own loop.

    For the processes we start ourselves (``waitroom workers``): on asyncio's selector loop
    the payment workers spent a third of their samples in its transport's Python write
    path during a cluster sale, on a machine where every core is shared.
    """
    try:
        import uvloop
    except ImportError:  # not built for this platform (Windows, PyPy)
        return asyncio.run(main)
    return uvloop.run(main)


async def cancel_and_wait(
    task: asyncio.Future[Any], *, every_s: float = 1.0
) -> BaseException | None:
    """Cancel ``task`` and wait until it has really finished; the exception it ended with.

    Cancelling again each ``every_s``: a library call that swallows one cancellation (redis-py
    and asyncio's own timeouts can, when the cancellation lands as a timeout fires) must not
    leave a shutdown waiting forever. The task's exception, if any, is retrieved (returned),
    so nothing is reported as never retrieved.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    return None if task.cancelled() else task.exception()


def stop_if_cancelled() -> None:
    """Raise :class:`asyncio.CancelledError` if the running task was asked to stop.

    For loops around a blocking Redis read: redis-py's cluster client can swallow a
    cancellation that lands while the read's own timeout is being handled, and return an
    empty answer instead (as in redis/redis-py#2028 for blocking pops), so the loop would
    block again and its owner wait for the next cancellation (a shutdown, or an event let
    go, held up by seconds). The request is still counted on the task
    (``Task.cancelling``), which this checks after each read.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError


def suspended_in(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines ``task`` is suspended in, outermost first (for the log).

    Walks the chain of awaits, since ``Task.get_stack`` gives only the outermost frame of a
    suspended coroutine.
    """
    frames: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(frames) < 50:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            frames.append(repr(awaited)[:200])
            break
        frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return frames
