"""Every Redis key name waitroom uses, built in this one module.

Per-event keys carry the event id in a hash tag (``wr:{evt123}:queue``) so that all of one
event's keys live in one Redis Cluster slot and a Lua script may touch them together.
The prefix comes from settings, so test runs and deployments sharing a Redis never collide.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventKeys:
    """The keys of one event, all in the event's hash slot.

    The data model of a room (all per event):

    - ``queue``     ZSET fan -> place. FIFO places are join sequence numbers (1, 2, ...);
                    a lottery draw gives the pre-queue fans places -n..-1, ahead of everyone
                    who joined after opening. Rank in this set = fans ahead.
    - ``prequeue``  ZSET fan -> join seq of lottery fans who joined before the sale opened.
    - ``seq``       counter of join sequence numbers.
    - ``fans``      HASH fan -> join seq, for every fan waiting or admitted (idempotent join),
                    followed while the fan waits by the address and subnet it joined from
                    (``"<seq> a:IP n:CIDR"``); removed when the fan leaves or is dropped as
                    abandoned.
    - ``live``      HASH address or subnet -> fans waiting in line from there (the caps).
    - ``seen``      ZSET fan -> unix time the fan was last connected or polling.
    - ``meta``      HASH of the room's live state: mode, opens_at, grace_s, opened, drawn,
                    paused, sold_out, rate, max_active, pass_ttl_s, admitted_total,
                    abandoned_total, commitment; and of the waitlist
                    (:mod:`admission.waitlist`): waitlist, per_fan_limit, waitlisting,
                    wl_seen, returned.
    - ``seed``      STRING the lottery seed, secret until the draw.
    - ``admitted``  HASH fan -> the fan's queue pass (JWT) once admitted.
    - ``active``    ZSET pass jti -> expiry: the passes that count against max_active.
    - ``order``     LIST of admitted fans in admission order (order audits and benchmarks).
    - ``leader``    STRING lease of the process running the admission loop (value = token).
    - ``owner``     STRING lease of the process hosting the inventory actor.
    - ``availability`` HASH ticket type -> tickets available, published by the actor.
    - ``inbox``     STREAM of inventory commands forwarded to the owner (a mailbox, capped).
    - ``news``      pub/sub channel of room-wide news (paused, resumed, sold out, settings).
    - ``seat-news`` pub/sub channel of seat changes; ``seat-version`` their counter.
    - ``draw-lease`` STRING lease of the caller applying the lottery draw.
    - ``traces``    HASH fan -> traceparent of the fan's join (tracing on only).
    - ``rl:SCOPE:SUBJECT`` HASH token buckets of the join limits (per IP, per fan), and of
                    a client address's other requests (scope ``addr``: polls, challenges,
                    WebSocket tickets and handshakes), and of a queue pass's checkout writes
                    (scope ``checkout``, subject the pass's jti: ``checkout_bucket``).
    - ``pow:COUNTER``, ``pow-rate``, ``pow-used:CHALLENGE``: the proof-of-work pressure
                    counters, the line's growth and solved challenges
                    (:mod:`waitroom.line.challenge`).
    - ``ws-ticket:TICKET`` STRING fan id a one-time WebSocket ticket stands for (expires
                    in seconds; taken with GETDEL, so it opens one socket at most).
    """

    base: str

    @property
    def queue(self) -> str:
        return f"{self.base}:queue"

    @property
    def prequeue(self) -> str:
        return f"{self.base}:prequeue"

    @property
    def seq(self) -> str:
        return f"{self.base}:seq"

    @property
    def fans(self) -> str:
        return f"{self.base}:fans"

    @property
    def seen(self) -> str:
        return f"{self.base}:seen"

    @property
    def meta(self) -> str:
        return f"{self.base}:meta"

    @property
    def seed(self) -> str:
        return f"{self.base}:seed"

    @property
    def admitted(self) -> str:
        return f"{self.base}:admitted"

    @property
    def active(self) -> str:
        return f"{self.base}:active"

    @property
    def order(self) -> str:
        return f"{self.base}:order"

    @property
    def leader(self) -> str:
        return f"{self.base}:leader"

    @property
    def owner(self) -> str:
        return f"{self.base}:owner"

    @property
    def availability(self) -> str:
        return f"{self.base}:availability"

    @property
    def news(self) -> str:
        return f"{self.base}:news"

    @property
    def seat_news(self) -> str:
        """Pub/sub channel of the event's seat changes (:mod:`waitroom.line.seatnews`)."""
        return f"{self.base}:seat-news"

    @property
    def seat_version(self) -> str:
        """STRING counter numbering the event's publications of seat changes."""
        return f"{self.base}:seat-version"

    @property
    def draw_lease(self) -> str:
        """STRING lease of the one caller applying the lottery draw (value = its token)."""
        return f"{self.base}:draw-lease"

    @property
    def incarnation(self) -> str:
        """STRING the run id of the Redis process the room's pass state was last written
        under from PostgreSQL (created, or rebuilt); admission waits while it is not the
        running one's (``admission/lua/admit.lua``)."""
        return f"{self.base}:incarnation"

    @property
    def traces(self) -> str:
        """HASH fan -> W3C traceparent of the fan's join, written only while tracing is on
        (the admission that admits the fan links to it, then deletes it); expires an hour
        after the last join, so a room whose tracing was turned off leaves nothing behind."""
        return f"{self.base}:traces"

    def bucket(self, scope: str, subject: str) -> str:
        """HASH token bucket of ``subject`` (an IP, a fan) for this event's limit ``scope``.

        Kept in the event's slot, so the join script can check and charge the limits in the
        same round trip as the join itself.
        """
        return f"{self.base}:rl:{scope}:{subject}"

    def checkout_bucket(self, jti: str) -> str:
        """HASH token bucket of the checkout writes (reserve, confirm, cancel) of one pass."""
        return self.bucket("checkout", jti)

    @property
    def inbox(self) -> str:
        """STREAM of inventory commands forwarded to the event's owner."""
        return f"{self.base}:inbox"

    def challenge_used(self, challenge: str) -> str:
        """STRING marker of a solved challenge (its hash) that paid for a place; kept until
        the challenge would have expired, so a replay is refused."""
        return f"{self.base}:pow-used:{challenge}"

    def pressure(self, counter: str) -> str:
        """HASH decayed count of challenges asked for: ``crowd`` (the whole event), or an
        address (``a:IP``) or subnet (``n:CIDR``) of :func:`waitroom.line.challenge.networks`."""
        return f"{self.base}:pow:{counter}"

    @property
    def join_rate(self) -> str:
        """HASH smoothed joins per second of the line (``challenge.lua`` samples ``seq``)."""
        return f"{self.base}:pow-rate"

    def revoked_pass(self, jti: str) -> str:
        """Marker of a revoked queue pass of this event, kept until the pass would have
        expired. In the event's slot, so that the pass gate reads it with the spent marker
        and the fan's admission in one step, on Redis Cluster too."""
        return f"{self.base}:revoked:{jti}"

    def spent_pass(self, jti: str) -> str:
        """Marker of a queue pass of this event whose order was paid: it may not reserve
        again (in the event's slot, like :meth:`revoked_pass`)."""
        return f"{self.base}:spent:{jti}"

    @property
    def live(self) -> str:
        """HASH address (``a:IP``) or subnet (``n:CIDR``) -> fans waiting in line from there:
        the hard caps of :data:`waitroom.line.challenge.CAPS` (``waitroom/line/lua/live.lua``)."""
        return f"{self.base}:live"

    def ws_ticket(self, ticket: str) -> str:
        """STRING: the fan id a one-time WebSocket ticket of this event stands for."""
        return f"{self.base}:ws-ticket:{ticket}"

    @property
    def offers(self) -> str:
        """HASH pass jti -> tickets it claims: the passes issued from the waitlist of a
        sold-out sale (:mod:`admission.waitlist`), forgotten once they stop counting."""
        return f"{self.base}:offers"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one deployment prefix.

    Deployment-wide keys: ``revoked:JTI`` and ``spent:JTI`` (pass markers, one key each, so
    they spread over a cluster's slots), ``admin-auth:ADDRESS`` (failed admin logins),
    ``inventory-replies:NODE`` (one list per process),
    ``outbox`` and ``outbox-dead`` (streams of the outbox relay).
    """

    prefix: str = "wr"

    def event(self, event_id: str) -> EventKeys:
        """The keys of ``event_id``."""
        return EventKeys(f"{self.prefix}:{{{event_id}}}")

    def admin_auth_failures(self, subject: str) -> str:
        """HASH token bucket of failed admin logins from one client address (IPv4, or /64)."""
        return f"{self.prefix}:admin-auth:{subject}"

    def inventory_replies(self, node_id: str) -> str:
        """LIST of replies to the inventory commands one process forwarded (expires idle).

        Outside any event's slot on purpose: one process's replies come from every owner.
        """
        return f"{self.prefix}:inventory-replies:{node_id}"

    @property
    def redis_incarnation(self) -> str:
        """STRING the run ids of the Redis primaries the passes' state was last reconciled
        with (:mod:`workers.redis_restarts`)."""
        return f"{self.prefix}:redis-incarnation"

    @property
    def outbox(self) -> str:
        """STREAM the outbox relay publishes committed domain events to."""
        return f"{self.prefix}:outbox"

    @property
    def outbox_dead(self) -> str:
        """STREAM of outbox rows that could not be published after every attempt."""
        return f"{self.prefix}:outbox-dead"
