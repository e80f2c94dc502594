"""Shutting tasks down: a swallowed cancellation, a loop that never returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from waitroom.core.runtime import cancel_and_wait, stop_if_cancelled, suspended_in
from workers.main import stop_loops

pytestmark = pytest.mark.anyio


async def _swallows_one_cancellation(started: asyncio.Event) -> str:
    """What asyncio.wait_for in Python 3.11 does when a cancellation lands as its inner call
    answers: the cancellation is lost and the loop goes on."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    await asyncio.Event().wait()  # on, until cancelled again
    return "never"


async def test_cancel_and_wait_cancels_again_until_the_task_ends() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(_swallows_one_cancellation(started))
    await started.wait()
    await asyncio.wait_for(cancel_and_wait(task, every_s=0.05), 2)
    assert task.cancelled()


async def _reads_until_cancelled(reads: list[int], *, check: bool) -> None:
    """A loop around a blocking read whose library swallows the cancellation (redis-py's
    cluster client: the read returns empty instead)."""
    while True:
        if not reads:
            with contextlib.suppress(asyncio.CancelledError):  # the first read swallows it
                await asyncio.sleep(3600)
        else:
            await asyncio.sleep(3600)  # later ones do not
        reads.append(1)
        if check:
            stop_if_cancelled()
        await asyncio.sleep(0.05)  # the next read, slow to end (a blocking read's timeout)


async def test_a_loop_that_checks_after_each_read_ends_on_one_cancellation() -> None:
    reads: list[int] = []
    task = asyncio.create_task(_reads_until_cancelled(reads, check=True))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done() and task.cancelled()
    assert reads == [1]


async def test_without_the_check_the_same_loop_outlives_its_cancellation() -> None:
    # What the check is for: the cancellation was swallowed, and the loop read on.
    reads: list[int] = []
    task = asyncio.create_task(_reads_until_cancelled(reads, check=False))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done() and reads == [1]
    assert await cancel_and_wait(task, every_s=0.1) is None
    assert task.cancelled()


async def test_stop_if_cancelled_does_nothing_in_a_task_nobody_cancelled() -> None:
    stop_if_cancelled()
    await asyncio.sleep(0)
    stop_if_cancelled()


async def test_cancel_and_wait_returns_the_error_the_task_ended_with() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    error = await cancel_and_wait(task)
    assert isinstance(error, ValueError)


async def _inner_wait(gate: asyncio.Event) -> None:
    await gate.wait()


async def _outer_wait(gate: asyncio.Event) -> None:
    await _inner_wait(gate)


async def test_suspended_in_names_every_coroutine_down_the_chain() -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_outer_wait(gate))
    await asyncio.sleep(0)
    where = suspended_in(task)
    assert [line.rsplit(" ", 1)[-1] for line in where[:3]] == ["_outer_wait", "_inner_wait", "wait"]
    gate.set()
    await task


async def test_stop_loops_cancels_a_loop_that_does_not_return_and_logs_where_it_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()

    async def obeys() -> None:
        await stop.wait()

    async def ignores() -> None:
        await asyncio.sleep(3600)

    tasks = [
        asyncio.create_task(obeys(), name="obeys"),
        asyncio.create_task(ignores(), name="ignores"),
    ]
    stop.set()
    with caplog.at_level(logging.ERROR, logger="waitroom.workers"):
        await asyncio.wait_for(stop_loops(tasks, within_s=0.2), 5)
    assert tasks[0].done() and not tasks[0].cancelled()
    assert tasks[1].cancelled()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("worker loop did not")]
    assert record.loop == "ignores"  # type: ignore[attr-defined]
    assert any(line.endswith(" ignores") for line in record.waiting_in)  # type: ignore[attr-defined]


def test_the_processes_we_start_run_on_uvloop() -> None:
    """``waitroom workers`` runs through :func:`waitroom.core.runtime.run`: on uvloop, as the
    server does (asyncio's selector loop was a third of the payment workers' samples)."""
    import uvloop

    from waitroom.core import runtime

    async def main() -> type[asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    assert issubclass(runtime.run(main()), uvloop.Loop)
