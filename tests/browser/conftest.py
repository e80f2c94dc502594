"""The stack of each browser test module here, module-scoped: a database of its own with
admission loops, the mock payment provider, the payment workers, one headless Chromium, and
a page per screen (desktop and a 375 px phone). The server itself is the suite's ``server``
fixture (tests/conftest.py), on these settings."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
from playwright.sync_api import Browser, Page

from tests.browser_support import SCREENS, Screen, browser_context, chromium
from tests.harness import ServerThread, WorkersThread, cleanup, fresh_settings
from waitroom.core.settings import Settings
from workers import mock_provider


@pytest.fixture(scope="module")
def provider() -> Iterator[ServerThread]:
    """The mock payment provider, its own HTTP server."""
    server = ServerThread(mock_provider.create_app()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def settings(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: ServerThread,
) -> Iterator[Settings]:
    """The module's own database with admission loops on (other modules' fans stay out)."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    value = fresh_settings(
        tmp_path_factory.mktemp(f"{name}-run"), admission_loop=True, payment_url=provider.url
    )
    value = msgspec.structs.replace(value, payment_timeout_s=1.0)
    try:
        yield value
    finally:
        cleanup(value)


@pytest.fixture(scope="module")
def workers(settings: Settings, server: ServerThread) -> Iterator[WorkersThread]:
    """The payment workers, outbox relay and safety net."""
    thread = WorkersThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def browser(workers: WorkersThread) -> Iterator[Browser]:
    """One headless Chromium for the module."""
    # After the server fixtures and before their teardown: Playwright's sync API keeps an
    # event loop running in this thread, where the harness's asyncio.run() cannot work.
    with chromium() as value:
        yield value


@pytest.fixture(params=SCREENS, ids=lambda screen: screen.name)
def screen(request: pytest.FixtureRequest) -> Screen:
    """Each test once per screen."""
    value: Screen = request.param
    return value


@pytest.fixture
def page(browser: Browser, server: ServerThread, screen: Screen) -> Iterator[Page]:
    """A fresh page in a fresh context of the screen's size."""
    with browser_context(browser, server.url, screen) as context:
        yield context.new_page()
