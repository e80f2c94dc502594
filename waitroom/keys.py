"""Every Redis key name waitroom uses, built in this one module.

Per-event keys carry the event id in a hash tag (``wr:{evt123}:queue``) so that all of one
event's keys live in one Redis Cluster slot and a Lua script may touch them together.
The prefix comes from settings, so test runs and deployments sharing a Redis never collide.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventKeys:
    """The keys of one event, all in the event's hash slot."""

    base: str

    @property
    def queue(self) -> str:
        """Sorted set: fan id -> place score (lower is earlier)."""
        return f"{self.base}:queue"

    @property
    def seq(self) -> str:
        """Counter handing out join sequence numbers."""
        return f"{self.base}:seq"

    @property
    def fans(self) -> str:
        """Hash: fan id -> joined sequence number, kept after admission (idempotent join)."""
        return f"{self.base}:fans"

    @property
    def seen(self) -> str:
        """Sorted set: fan id -> last time the fan was connected or polled (abandonment)."""
        return f"{self.base}:seen"

    @property
    def meta(self) -> str:
        """Hash: the room's live state (mode, opened, paused, sold out, counters)."""
        return f"{self.base}:meta"

    @property
    def admitted(self) -> str:
        """Hash: fan id -> the fan's queue pass once admitted."""
        return f"{self.base}:admitted"

    @property
    def availability(self) -> str:
        """Hash: ticket type -> tickets available, published by the inventory actor."""
        return f"{self.base}:availability"

    @property
    def events(self) -> str:
        """Pub/sub channel of room-wide news (paused, resumed, sold out, settings)."""
        return f"{self.base}:news"

    def key(self, name: str) -> str:
        """A further per-event key called ``name``, still inside the event's hash slot."""
        return f"{self.base}:{name}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one deployment prefix."""

    prefix: str = "wr"

    def event(self, event_id: str) -> EventKeys:
        """The keys of ``event_id``."""
        return EventKeys(f"{self.prefix}:{{{event_id}}}")

    def ratelimit(self, scope: str, subject: str) -> str:
        """Token bucket of ``subject`` (an IP or an identity) for the limit called ``scope``."""
        return f"{self.prefix}:rl:{scope}:{subject}"

    def revoked_pass(self, jti: str) -> str:
        """Marker of a revoked queue pass, kept until the pass would have expired."""
        return f"{self.prefix}:revoked:{jti}"

    def global_key(self, name: str) -> str:
        """A deployment-wide key called ``name``."""
        return f"{self.prefix}:{name}"
