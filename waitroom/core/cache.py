"""A small in-process cache of read views: time-bounded, one load at a time per key.

Public reads that everyone in a sale repeats (the event view, the lottery view) would
otherwise cost a PostgreSQL query each: tens of thousands of fans polling them can take
every pooled connection. :class:`ViewCache` keeps each answer for a few seconds at most,
and while a key is being loaded every other caller waits for that one load instead of
starting its own (a stampede of misses costs one query). Answers that a key names nothing
(:class:`~waitroom.core.errors.NotFound`) are kept too, for a shorter time, so repeating a
wrong id is free; other failures (a dependency down) are never kept.

Staleness is the price, and it is bounded: an entry is served at most ``ttl`` seconds after
it was read, and :meth:`ViewCache.invalidate` drops it at once where this process itself
changed the data. Each process has its own cache; nothing here is shared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from waitroom.core.errors import NotFound

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    until: float
    value: V | None
    #: For a kept NotFound: its code, message and details (a fresh error is raised each
    #: time: raising one instance again and again would grow its traceback).
    missing: tuple[str, str, dict[str, Any]] | None


class ViewCache(Generic[V]):
    """Values by key for at most their time to live; see the module docstring."""

    def __init__(
        self,
        *,
        negative_ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Entry[V]] = {}
        self._loading: dict[str, asyncio.Task[tuple[V, float]]] = {}
        #: Bumped by invalidate(): a load that started before it must not store its value.
        self._generation: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str, load: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        """The value of ``key``; ``load()`` returns a fresh ``(value, ttl_s)`` on a miss.

        A ``NotFound`` from ``load`` is kept for the negative time to live and raised to
        every caller until then; any other error is raised and nothing is kept.
        """
        entry = self._entries.get(key)
        if entry is not None:
            if self._clock() < entry.until:
                if entry.missing is not None:
                    code, message, details = entry.missing
                    raise NotFound(message, code=code, details=dict(details))
                return entry.value  # type: ignore[return-value]
            del self._entries[key]
        task = self._loading.get(key)
        if task is None:
            # The generation is taken now, not when the task first runs: an invalidation
            # in between must still keep this load's result out.
            generation = self._generation.get(key, 0)
            task = asyncio.create_task(self._load(key, load, generation), name=f"view:{key}")
            self._loading[key] = task
            task.add_done_callback(lambda t: self._settled(key, t))
        # Shielded: a caller that gives up (its client left) does not cancel the others' load.
        value, _ = await asyncio.shield(task)
        return value

    async def _load(
        self, key: str, load: Callable[[], Awaitable[tuple[V, float]]], generation: int
    ) -> tuple[V, float]:
        try:
            value, ttl_s = await load()
        except NotFound as exc:
            if self._generation.get(key, 0) == generation:
                missing = (exc.code, exc.message, dict(exc.details))
                self._store(key, _Entry(self._clock() + self._negative_ttl_s, None, missing))
            raise
        if self._generation.get(key, 0) == generation and ttl_s > 0:
            self._store(key, _Entry(self._clock() + ttl_s, value, None))
        return value, ttl_s

    def _store(self, key: str, entry: _Entry[V]) -> None:
        if len(self._entries) >= self._max_entries and key not in self._entries:
            # Bounded: a scan of many ids must not grow memory. Expired entries go first;
            # if all are live, everything goes (the next reads simply load again).
            now = self._clock()
            for stale in [k for k, e in self._entries.items() if e.until <= now]:
                del self._entries[stale]
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
                self._generation.clear()
        self._entries[key] = entry

    def _settled(self, key: str, task: asyncio.Task[tuple[V, float]]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        # Retrieve the outcome so an error nobody awaited is not reported as lost.
        if not task.cancelled():
            task.exception()

    def invalidate(self, key: str) -> None:
        """Forget ``key`` now: this process changed what it shows (a load under way is not kept)."""
        self._entries.pop(key, None)
        # Later callers start a new load; those already waiting get the one under way.
        self._loading.pop(key, None)
        self._generation[key] = self._generation.get(key, 0) + 1
        if len(self._generation) > self._max_entries:
            self._generation.clear()

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._generation.clear()
