"""A database of the previous release, with a sale in it, upgraded by ``waitroom migrate``; then
the new server sells on it: join → pass → reserve → confirm → tickets."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.admission.support import join
from tests.checkout.test_checkout import Fan
from tests.harness import (
    ADMIN_TOKEN,
    ServerThread,
    WorkersThread,
    cleanup,
    fresh_settings,
    run_cli,
    with_database,
)
from tests.queue_support import fan_headers
from tests.test_migrations import build_release_0_1_0
from waitroom.core.db import ensure_database
from waitroom.core.settings import Settings


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, provider: ServerThread
) -> Iterator[Settings]:
    """This module's settings, on a database built by release 0.1.0 and upgraded by the CLI."""
    run_dir: Path = tmp_path_factory.mktemp("upgrade-run")
    value = fresh_settings(run_dir, admission_loop=True, payment_url=provider.url)
    # Not the fresh (current) database: one made the old way, under a name of its own.
    old_db = with_database(value.database_url, f"waitroom_old_{secrets.token_hex(4)}")
    asyncio.run(ensure_database(old_db))
    asyncio.run(build_release_0_1_0(old_db))
    cleanup(value)
    value = msgspec.structs.replace(value, database_url=old_db, payment_timeout_s=1.0)
    try:
        migrated = run_cli(value, "migrate", "--json")
        assert migrated.returncode == 0, migrated.stderr
        yield value
    finally:
        cleanup(value)


def test_the_new_release_sells_on_an_upgraded_database(
    server: ServerThread, workers: WorkersThread
) -> None:
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        httpx.Client(
            base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as admin,
    ):
        before = admin.get("/v1/admin/events/legacy-sale/stats").json()
        assert (before["sold"], before["available"]) == (2, 8)

        fan = Fan(client, "legacy-sale")
        fan.wait_for_pass()
        reserved = fan.reserve(quantity=3)
        assert reserved.status_code == 201, reserved.text
        hold = reserved.json()
        assert fan.confirm(hold["id"]).status_code == 202
        paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
        assert len(paid["tickets"]) == 3 and paid["amount_minor"] == 3000

        after = admin.get("/v1/admin/events/legacy-sale/stats").json()
        assert (after["sold"], after["held"], after["available"]) == (5, 0, 5)
        # The order of before the upgrade is still the fan's, with its tickets.
        orders = client.get("/v1/orders", headers=fan_headers(fan.token)).json()
        assert [o["reservation_id"] for o in orders] == [hold["id"]]
        # And another fan can still join the same line.
        assert join(client, "legacy-sale")[0] != fan.fan_id
