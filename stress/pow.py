"""A small native solver of the waiting room's proof-of-work (ALTCHA v1, SHA-256).

Simulated fans (``stress/simulation.py``, the demo) and the bot farm of ``stress/bots.py``
solve challenges with this, as a non-browser client would: find ``n`` in ``[0, maxnumber]``
with ``sha256(salt + str(n)) == challenge`` and send the base64 JSON payload in the join's
``X-Challenge-Solution`` header. The loop hashes the salt once and copies that state per
number, some 700,000 numbers per second per core here (a browser's ``crypto.subtle`` does
about 80,000): the price a farm pays is what it pays natively.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def find_number(challenge: str, salt: str, maxnumber: int, start: int = 0) -> int | None:
    """The number that solves the challenge, or None when none in ``[start, maxnumber]`` does."""
    target = bytes.fromhex(challenge)
    prefix = hashlib.sha256(salt.encode())
    copy = prefix.copy
    for n in range(start, maxnumber + 1):
        h = copy()
        h.update(str(n).encode())
        if h.digest() == target:
            return n
    return None


def payload(body: dict[str, Any], number: int) -> str:
    """The ``X-Challenge-Solution`` value for ``body`` (a challenge answer) solved by ``number``."""
    data = {
        "algorithm": body["algorithm"],
        "challenge": body["challenge"],
        "number": number,
        "salt": body["salt"],
        "signature": body["signature"],
    }
    return base64.b64encode(json.dumps(data).encode()).decode()


def solve(body: dict[str, Any]) -> str:
    """Solve ``body`` in this thread; the ``X-Challenge-Solution`` value."""
    number = find_number(body["challenge"], body["salt"], int(body["maxnumber"]))
    if number is None:
        raise ValueError("no number solves this challenge")
    return payload(body, number)


class Solver:
    """Solves challenges in worker processes, so an event loop of simulated fans keeps going."""

    def __init__(self, processes: int = 1) -> None:
        # spawn, not fork: a forked worker would inherit the pipes of whatever subprocess
        # the caller runs (Playwright's driver waits for their EOF to stop).
        self._pool = ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn")
        )

    async def solve(self, body: dict[str, Any]) -> str:
        """The ``X-Challenge-Solution`` value for ``body``, solved off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, solve, body)

    def close(self) -> None:
        """Stop the worker processes (pending solves are cancelled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
