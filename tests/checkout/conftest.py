"""The whole stack for the checkout tests: mock payment provider, server, payment workers.

Every module here gets a database of its own with admission loops on (the run's shared
database holds other modules' events, whose fans those loops would admit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.harness import ADMIN_TOKEN, ServerThread, WorkersThread, cleanup, fresh_settings, running
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
    tmp_path_factory: pytest.TempPathFactory, provider: ServerThread
) -> Iterator[Settings]:
    """This module's settings: its own database, admission loops on, the mock provider."""
    run_dir: Path = tmp_path_factory.mktemp("checkout-run")
    value = fresh_settings(run_dir, admission_loop=True, payment_url=provider.url)
    value = msgspec.structs.replace(value, payment_timeout_s=1.0)
    try:
        yield value
    finally:
        cleanup(value)


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[ServerThread]:
    """A real server with admission loops."""
    with running(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def workers(settings: Settings, server: ServerThread) -> Iterator[WorkersThread]:
    """The payment workers, outbox relay and safety net."""
    thread = WorkersThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def client(server: ServerThread, workers: WorkersThread) -> Iterator[httpx.Client]:
    """A fan's HTTP client; the payment workers run while it is in use."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture
def admin(server: ServerThread) -> Iterator[httpx.Client]:
    """The operators' HTTP client."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as c:
        yield c


@pytest.fixture
def control(provider: ServerThread) -> Iterator[Callable[..., None]]:
    """Set the provider's behaviour for one test; back to the defaults after it."""

    def set_control(**fields: Any) -> None:
        response = httpx.post(f"{provider.url}/v1/control", json=fields)
        assert response.status_code == 200, response.text

    yield set_control
    set_control()
