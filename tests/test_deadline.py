"""Every fan-facing request is answered within the request deadline (issue 12).

The middleware runs in front of a small Starlette app whose routes are slow on purpose (the
real app's slow paths are saturated machines and frozen dependencies:
tests/test_dependency_failures.py bounds those end to end).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.test_errors import assert_error
from waitroom.app import request_deadline_s
from waitroom.core import deadline
from waitroom.core.deadline import DeadlineMiddleware
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio

DEADLINE_S = 0.3
finished: list[str] = []


async def slow(request: Request) -> Response:
    await asyncio.sleep(2)
    finished.append(request.url.path)
    return PlainTextResponse("late")


async def quick(request: Request) -> Response:
    return PlainTextResponse("ok")


async def streaming(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"first "
        await asyncio.sleep(DEADLINE_S * 2)
        yield b"second"

    return StreamingResponse(body())


async def own_timeout(request: Request) -> Response:
    raise TimeoutError("a dependency's own timeout")


async def swallowed(request: Request) -> Response:
    # The deadline's cancellation taken by the app itself, as a dependency's own timeout
    # expiring at the same moment takes it (inventory asks): the app answers its own 503.
    try:
        await asyncio.sleep(2)
    except asyncio.CancelledError:
        return PlainTextResponse("the owner did not answer", status_code=503)
    return PlainTextResponse("late")


async def extended(request: Request) -> Response:
    deadline.extend(request.scope, DEADLINE_S * 2)  # a long poll says how long it waits
    await asyncio.sleep(DEADLINE_S * 2)
    return PlainTextResponse("waited")


def app() -> Starlette:
    routes = [
        Route("/v1/swallowed", swallowed),
        Route("/v1/extended", extended),
        Route("/v1/slow", slow),
        Route("/v1/quick", quick),
        Route("/v1/stream", streaming),
        Route("/v1/own-timeout", own_timeout),
        Route("/v1/admin/slow", slow),
    ]
    application = Starlette(routes=routes)
    application.add_middleware(DeadlineMiddleware, seconds=DEADLINE_S)
    return application


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_a_request_past_the_deadline_is_503_request_timeout_and_its_work_stops(
    client: httpx.AsyncClient,
) -> None:
    started = time.monotonic()
    response = await client.get("/v1/slow")
    took = time.monotonic() - started
    error = assert_error(response, 503, "request_timeout")
    assert response.headers["retry-after"] == "1"
    assert "retry" in error["message"]
    assert DEADLINE_S <= took < DEADLINE_S + 0.5, took
    await asyncio.sleep(2)
    assert "/v1/slow" not in finished  # cancelled, not left running


async def test_quick_requests_and_a_response_already_streaming_are_untouched(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/v1/quick")).text == "ok"
    streamed = await client.get("/v1/stream")
    assert streamed.status_code == 200 and streamed.text == "first second"


async def test_operators_routes_are_exempt(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/admin/slow")
    assert response.status_code == 200 and response.text == "late"


async def test_a_timeout_that_is_not_the_deadline_is_left_to_the_app(
    client: httpx.AsyncClient,
) -> None:
    # No handler here turns it into a 503 (the real app's does): it is not mistaken for ours.
    assert (await client.get("/v1/own-timeout")).status_code == 500


def test_the_deadline_is_within_the_dependency_timeout_and_a_second() -> None:
    for timeout in (0.5, 2.0, 5.0):
        settings = Settings(dependency_timeout_s=timeout)
        assert request_deadline_s(settings) <= max(timeout, 2.0) + 1.0


async def test_an_answer_the_app_made_after_taking_the_deadline_itself_goes_out(
    client: httpx.AsyncClient,
) -> None:
    # Not a 500 from moving a deadline that has already fired.
    response = await client.get("/v1/swallowed")
    assert (response.status_code, response.text) == (503, "the owner did not answer")


async def test_a_handler_that_extends_its_deadline_outlives_it(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/extended")
    assert (response.status_code, response.text) == (200, "waited")


async def test_a_deadline_cancels_its_task_at_most_a_tick_late_and_never_early() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadline.Deadline(0.15) as d:
            await asyncio.sleep(2)
    took = time.monotonic() - started
    assert 0.15 <= took < 0.15 + deadline.TICK_S + 0.5, took
    assert d.expired()


async def test_a_deadline_called_off_or_moved_does_not_fire_then() -> None:
    async with deadline.Deadline(0.05) as off:
        off.reschedule(None)
        await asyncio.sleep(0.3)
    assert not off.expired()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadline.Deadline(0.05) as moved:
            when = moved.when()
            assert when is not None
            moved.reschedule(when + 0.25)
            await asyncio.sleep(2)
    assert time.monotonic() - started >= 0.3


async def test_a_cancellation_that_is_not_the_deadlines_stays_a_cancellation() -> None:
    async def guarded() -> None:
        async with deadline.Deadline(5):
            await asyncio.sleep(2)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
