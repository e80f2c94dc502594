"""The whole system as real processes: mock payment provider, ``waitroom serve``, ``workers``.

Used by the end-to-end benchmark; each process logs to a file in ``run_dir`` and is stopped
with SIGTERM (then SIGKILL after a grace period) when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from stress.common import free_port
from waitroom.core.settings import Settings, settings_env

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    """URLs of a running stack."""

    base_url: str
    provider_url: str
    processes: list[asyncio.subprocess.Process]


async def _wait_http(url: str, proc: asyncio.subprocess.Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@asynccontextmanager
async def running_stack(
    settings: Settings, run_dir: Path, *, workers: int = 1
) -> AsyncIterator[Stack]:
    """Start the provider, the server (``workers`` processes) and the workers process."""
    provider_port, port = free_port(), free_port()
    provider_url = f"http://127.0.0.1:{provider_port}"
    settings = msgspec.structs.replace(settings, port=port, payment_url=provider_url)
    env = settings_env(settings)
    processes: list[asyncio.subprocess.Process] = []

    async def start(name: str, *argv: str) -> asyncio.subprocess.Process:
        log = (run_dir / f"{name}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        processes.append(proc)
        return proc

    try:
        provider = await start(
            "provider", sys.executable, "-m", "workers.mock_provider", "--port", str(provider_port)
        )
        await _wait_http(f"{provider_url}/v1/stats", provider)
        server = await start(
            "server", sys.executable, "-m", "waitroom", "serve", "--workers", str(workers)
        )
        await _wait_http(f"http://127.0.0.1:{port}/readyz", server)
        await start("workers", sys.executable, "-m", "waitroom", "workers")
        yield Stack(f"http://127.0.0.1:{port}", provider_url, processes)
    finally:
        for proc in reversed(processes):
            if proc.returncode is None:
                proc.terminate()
        for proc in reversed(processes):
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
