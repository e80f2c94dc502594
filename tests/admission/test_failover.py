"""Leader failover with two real server processes: kill -9 the leader, the other takes over."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.admission.support import create_event, join, wait_for
from tests.harness import ADMIN_TOKEN, ROOT, async_redis, free_port
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings, settings_env

pytestmark = pytest.mark.slow


@contextmanager
def serve(settings: Settings, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``waitroom serve`` through the console script, in its own process, on a free port."""
    port = free_port()
    exe = Path(sys.executable).with_name("waitroom")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", "--port", str(port)],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def leads(url: str, event_id: str) -> bool:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    pattern = rf'^waitroom_admission_leading{{event="{re.escape(event_id)}"}} 1\.0$'
    return re.search(pattern, text, re.MULTILINE) is not None


async def redis_state(settings: Settings, event_id: str) -> tuple[int, list[str]]:
    """(admitted_total, order) of the event, straight from Redis."""
    ek = Keys(settings.redis_prefix).event(event_id)
    r = async_redis(settings.redis_url)
    try:
        total = int(await r.hget(ek.meta, "admitted_total") or 0)
        order = [f.decode() if isinstance(f, bytes) else f for f in await r.lrange(ek.order, 0, -1)]
    finally:
        await r.aclose()
    return total, order


async def pass_rows(settings: Settings, event_id: str) -> list[Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT seq, fan_id FROM queue_passes WHERE event_id = $1 ORDER BY seq", event_id
            )
        )
    finally:
        await conn.close()


def test_killing_the_leader_hands_the_loop_over_within_3_s_without_double_admission(
    settings: Settings, tmp_path: Path
) -> None:
    fans_count = 160
    with (
        serve(settings, tmp_path / "a.log") as (proc_a, url_a),
        serve(settings, tmp_path / "b.log") as (proc_b, url_b),
    ):
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with (
            httpx.Client(base_url=url_a, headers=headers, timeout=10) as admin,
            httpx.Client(base_url=url_b, timeout=10) as fans_client,
        ):
            event_id = create_event(admin, rate=40, paused=True)
            fans = [join(fans_client, event_id)[0] for _ in range(fans_count)]
            # Both processes run a loop for the event; exactly one leads.
            leader_url = wait_for(
                lambda: next((u for u in (url_a, url_b) if leads(u, event_id)), None), timeout=10
            )
            assert [leads(u, event_id) for u in (url_a, url_b)].count(True) == 1
            resumed = admin.patch(f"/v1/admin/events/{event_id}/admission", json={"paused": False})
            assert resumed.status_code == 200
            wait_for(lambda: asyncio.run(redis_state(settings, event_id))[0] >= 40, timeout=10)

            victim, survivor_url = (proc_a, url_b) if leader_url == url_a else (proc_b, url_a)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            killed_at = time.monotonic()
            at_kill, _ = asyncio.run(redis_state(settings, event_id))
            assert at_kill < fans_count
            wait_for(
                lambda: asyncio.run(redis_state(settings, event_id))[0] > at_kill,
                timeout=5,
                every=0.02,
            )
            takeover_s = time.monotonic() - killed_at
            print(f"leader killed; the other process admitted again after {takeover_s:.2f} s")
            assert takeover_s < 3.0, takeover_s
            assert leads(survivor_url, event_id)

            wait_for(
                lambda: asyncio.run(redis_state(settings, event_id))[0] == fans_count, timeout=15
            )
            time.sleep(0.5)  # anything admitted twice would show up by now
            total, order = asyncio.run(redis_state(settings, event_id))
            assert total == fans_count
            # Every fan exactly once, in join order, across the two leaders.
            assert order == fans

            # The survivor also recorded the passes the dead leader had no time to record.
            rows = wait_for(
                lambda: (
                    (rs := asyncio.run(pass_rows(settings, event_id)))
                    and len(rs) == fans_count
                    and rs
                ),
                timeout=10,
            )
            assert [r["seq"] for r in rows] == list(range(1, fans_count + 1))
            assert [r["fan_id"] for r in rows] == fans
