"""The ledger of one event's inventory: pure bookkeeping of holds, with no I/O at all.

The inventory actor of an event owns exactly one :class:`Ledger` and is the only code that
touches it, so nothing here locks. The actor feeds it commands (:class:`Reserve`,
:class:`Confirm`, :class:`Cancel`, :class:`Expire`, and :class:`Restock`, which gives a refund's
tickets back to stock) through :meth:`Ledger.apply`, together with
the current time and a source of fresh hold ids; the ledger answers with a result or a typed
:class:`Refused`. Time and ids come in as arguments, so the ledger is deterministic: the same
commands with the same ``now`` values always give the same results, which is what lets the
tests drive it with hypothesis and compare it against a naive model.

State machine of a hold::

    held ──Confirm (before its deadline)──▶ paid
      │ ──Cancel──────────────────────────▶ cancelled
      └───deadline reached (Expire, or any later command)──▶ expired

``paid``, ``expired`` and ``cancelled`` are final; the PostgreSQL trigger on ``holds`` enforces
the same machine, so the database would reject a bug here.

Counting: tickets in ``held`` and ``paid`` holds count against the ticket type's quantity and
against the fan's limits (per ticket type and per event); ``expired`` and ``cancelled`` ones
give their tickets back. A hold is expired exactly when ``now >= expires_at``.

Idempotency (invariant 7): a command carrying an idempotency key is recorded under
``(fan_id, key)`` with a :func:`fingerprint` of what it asks for and its *first* result,
refusals included ("first result wins"): a retry of the same request returns that stored
result and changes nothing, even if the world has moved on since (a retried ``sold_out``
stays ``sold_out``; the client uses a new key to try again). The same key with a different
request is refused with :data:`IDEMPOTENCY_MISMATCH`.

Bounded idempotency records: a fan's refusals are kept for replay only up to
``max_refusals_per_fan`` (16 by default); recording one more forgets that fan's oldest
refusal, so a client spraying fresh keys at a sold-out event cannot grow the ledger without
bound. Successes are never forgotten here (they are bounded by the per-fan ticket limits and
the hold cycle below). A retry that comes back after its refusal was forgotten is applied
afresh, which is safe: a refusal changed nothing. (PostgreSQL keeps its rows for a time; the
workers' safety net purges them, see :mod:`workers.safety`.)

One hold cycle per queue pass: a pass may reserve (several holds at once, within the limits)
until the fan has no hold left ``held`` under it; the moment its last live hold is settled
(cancelled, expired or paid), the pass's cycle is over and any further reserve with it is
refused (:data:`PASS_USED`). So reserve -> cancel (or let expire) -> reserve loops cannot keep
tickets locked away from the fans behind in line: tickets come back and stay back for them. It also keeps ``max_active`` honest: a cancel that frees the pass's
admission slot (:func:`admission.operators.complete_pass`) can never be followed by more
shopping on that pass. Commands without a pass (``pass_jti`` None: tests, benchmarks) are
not subject to it. Cycles are kept per (fan, pass).

Seats: when the event has a seat map, the ledger owns its :class:`~inventory.seats.SeatLedger`
too, and the ticket types of the map's price levels are sold as seats. A :class:`Reserve`
then names ``seats`` (pick) or a price ``level`` (best available, ``quantity`` seats); its
ticket type is the seats' (one hold is of one ticket type: a pick across ticket types is
refused with :data:`MIXED_TICKET_TYPES`) and its quantity their number, so every rule above
(limits per fan, stock, pass cycles, idempotency) counts seats unchanged; a quantity-only
reserve of a seated ticket type is refused (:data:`SEATS_REQUIRED`). The seat checks come
first, so a refusal names the seats (:data:`SEATS_UNAVAILABLE` lists every taken one). The
hold carries its seats (``Hold.seats``), and settling it (confirm, cancel, expiry) moves them.
A seated ticket type's quantity is its open seats (:func:`inventory.venue.import_seat_map`
sets it), so its availability here is its free seats. A :class:`Restock` of a seated hold
names the seats it returns (one per ticket, the hold's own, none returned before): they are
free again and can be sold to the next fan, while the hold keeps ``paid`` and its ``seats``
as sold (what the fan bought; :meth:`Ledger.returned_seats` says which came back).

Persistence: the actor applies a batch of commands, then calls :meth:`Ledger.drain_changes` and
writes exactly those rows in one transaction (INSERT ``new_holds``, UPDATE ``updated_holds``,
INSERT ``idempotency``), and only then replies. There is deliberately no in-memory rollback:
if the commit fails, the actor throws the ledger away and rebuilds it with
:meth:`Ledger.restore` from what PostgreSQL holds, which is one linear pass over the rows. That
keeps a single source of truth and makes "nothing unacknowledged is applied" hold by
construction.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, assert_never

import msgspec

from inventory.seats import SeatHold, SeatLedger
from inventory.venue import SeatMap

HoldStatus = Literal["held", "paid", "expired", "cancelled"]
_K = TypeVar("_K")

# Refusal codes. They are the ``code`` of the error body the HTTP layer renders.
SOLD_OUT = "sold_out"
#: Not enough left right now, but enough is only held by fans checking out: their holds may
#: lapse and the tickets come back. Fans are told the truth ("try again shortly"), and only
#: ``sold_out`` when nothing can come back.
TICKETS_HELD = "tickets_held"
FAN_LIMIT = "fan_limit"
UNKNOWN_HOLD = "hold_not_found"
HOLD_EXPIRED = "hold_expired"
ALREADY_CONFIRMED = "hold_already_confirmed"
HOLD_CANCELLED = "hold_cancelled"
UNKNOWN_TICKET_TYPE = "unknown_ticket_type"
BAD_QUANTITY = "bad_quantity"
IDEMPOTENCY_MISMATCH = "idempotency_key_reused"
#: The reserve's queue pass already finished its hold cycle (see the module docstring).
PASS_USED = "pass_used"
#: Refusals kept per fan for replay by default (see the module docstring).
MAX_REFUSALS_PER_FAN = 16
#: A :class:`Restock` asks to give back more than its hold sold, or a hold that is not paid.
RETURN_EXCEEDS_SALE = "return_exceeds_sale"
# Deliberately the same code (and message) as an unknown hold: a fan probing someone else's
# hold id must not learn that it exists.
NOT_YOUR_HOLD = UNKNOWN_HOLD
# Refusals of seated reserves (see "Seats" in the module docstring).
#: Some of the seats asked for are held or sold; ``details.seats`` names them.
SEATS_UNAVAILABLE = "seats_unavailable"
#: Some of the seats asked for are killed or held back: never on sale.
SEATS_NOT_FOR_SALE = "seats_not_for_sale"
UNKNOWN_SEAT = "unknown_seat"
UNKNOWN_LEVEL = "unknown_price_level"
#: A pick of seats of more than one ticket type (one hold is of one ticket type).
MIXED_TICKET_TYPES = "mixed_ticket_types"
#: A quantity-only reserve of a ticket type sold as seats.
SEATS_REQUIRED = "seats_required"
#: Best available found fewer free seats of the level than asked for.
NOT_ENOUGH_SEATS = "not_enough_seats"
# Refusals of a Restock's seats (see "Seats" in the module docstring).
#: A return of a seated hold's tickets must name exactly one of its seats per ticket.
RETURN_SEATS_REQUIRED = "return_seats_required"
#: Some seats of a return are not the hold's (any seat, for a general-admission hold).
SEATS_NOT_IN_HOLD = "seats_not_in_hold"
#: Some seats of a return were returned by an earlier refund already.
SEATS_ALREADY_RETURNED = "seats_already_returned"

#: HTTP status of each refusal code.
REFUSAL_STATUS: dict[str, int] = {
    SOLD_OUT: 409,
    TICKETS_HELD: 409,
    FAN_LIMIT: 409,
    UNKNOWN_HOLD: 404,
    HOLD_EXPIRED: 410,
    ALREADY_CONFIRMED: 409,
    HOLD_CANCELLED: 409,
    UNKNOWN_TICKET_TYPE: 422,
    BAD_QUANTITY: 422,
    IDEMPOTENCY_MISMATCH: 422,
    PASS_USED: 403,
    RETURN_EXCEEDS_SALE: 409,
    SEATS_UNAVAILABLE: 409,
    SEATS_NOT_FOR_SALE: 422,
    UNKNOWN_SEAT: 422,
    UNKNOWN_LEVEL: 422,
    MIXED_TICKET_TYPES: 422,
    SEATS_REQUIRED: 422,
    NOT_ENOUGH_SEATS: 409,
    RETURN_SEATS_REQUIRED: 422,
    SEATS_NOT_IN_HOLD: 422,
    SEATS_ALREADY_RETURNED: 409,
}


# --- rules -------------------------------------------------------------------------------


class TicketTypeRules(msgspec.Struct, frozen=True):
    """What the ledger needs to know about one ticket type."""

    name: str
    quantity: int
    #: Tickets of this type one fan may hold or buy.
    per_fan_limit: int
    price_minor: int
    currency: str


class EventRules(msgspec.Struct, frozen=True):
    """The inventory rules of one event."""

    event_id: str
    #: Tickets one fan may hold or buy across all ticket types of the event.
    per_fan_limit: int
    hold_ttl_s: int
    ticket_types: tuple[TicketTypeRules, ...]


class Hold(msgspec.Struct, frozen=True, gc=False):
    """Tickets set aside for one fan until ``expires_at`` (unix seconds), or for good once paid."""

    id: str
    fan_id: str
    ticket_type: str
    quantity: int
    status: HoldStatus
    expires_at: float
    pass_jti: str | None
    payment_ref: str | None = None
    #: The seats the hold took, for a ticket type sold as seats (``quantity`` of them).
    seats: tuple[str, ...] = ()


# --- commands ----------------------------------------------------------------------------
# Holds, commands and results are made by the hundred thousand and kept in the ledger's maps
# for the whole sale; none of them can be part of a reference cycle (they hold strings,
# numbers and each other, never a container that points back), so they are kept out of
# the cyclic garbage collector (gc=False): its passes over them cost the actor long pauses.
# Tagged so that ``Command`` is a msgspec union that can cross processes (the Redis stream
# that forwards commands to the owning process) and be decoded without guessing.


class Reserve(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Hold ``quantity`` tickets of ``ticket_type`` for ``fan_id``."""

    fan_id: str
    ticket_type: str
    quantity: int
    idempotency_key: str | None
    #: The queue pass the fan reserved with; kept on the hold for audit, not part of the request.
    pass_jti: str | None
    #: Pick-your-seat: exactly these seats (then ``ticket_type`` is ignored and ``quantity``
    #: is their number).
    seats: tuple[str, ...] = ()
    #: Best available: ``quantity`` best free seats of this price level (``ticket_type``
    #: ignored).
    level: str | None = None


class Confirm(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Mark a hold paid."""

    hold_id: str
    fan_id: str
    #: Must be stable across retries of one request (e.g. derived from the idempotency key),
    #: because it is part of the request's fingerprint.
    payment_ref: str
    idempotency_key: str | None


class Cancel(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Give a hold's tickets back."""

    hold_id: str
    fan_id: str
    idempotency_key: str | None


class Expire(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Expire every hold whose deadline is at or before ``now``; sent by the actor's timer."""


class Restock(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Give ``quantity`` sold tickets of a paid hold back to stock (a refund): once per
    ``refund_id``, the command's idempotency key (a retry returns the first result).

    Stock goes up and the fan's counts down; the hold stays ``paid`` (the sale happened) and
    PostgreSQL records the return in ``stock_returns`` (schema 15), whose trigger takes the
    tickets off ``ticket_types.sold``. For a seated hold, ``seats`` names the seats returned
    (``quantity`` of the hold's seats): they are on sale again, and the same trigger takes
    their ``seat_holds`` rows out of the live ones (schema 19). Empty for general admission.
    """

    refund_id: str
    hold_id: str
    fan_id: str
    ticket_type: str
    quantity: int
    #: A default, so commands without seats (stored, forwarded by an older process) decode.
    seats: tuple[str, ...] = ()

    @property
    def idempotency_key(self) -> str:
        """The refund id: what makes a repeated Restock safe (see ``hosting._repeatable``)."""
        return self.refund_id


Command = Reserve | Confirm | Cancel | Expire | Restock


# --- results -----------------------------------------------------------------------------
# Tagged too: results are stored with their idempotency key (as JSON) and must decode back
# into exactly the value that was first returned.


class Reserved(msgspec.Struct, frozen=True, tag=True, gc=False):
    """A new hold."""

    hold: Hold


class Confirmed(msgspec.Struct, frozen=True, tag=True, gc=False):
    """The hold, now paid."""

    hold: Hold


class Cancelled(msgspec.Struct, frozen=True, tag=True, gc=False):
    """The hold, now cancelled."""

    hold: Hold


class Expired(msgspec.Struct, frozen=True, tag=True, gc=False):
    """The holds this :class:`Expire` expired, by deadline then id."""

    holds: tuple[Hold, ...]


class Refused(msgspec.Struct, frozen=True, tag=True, gc=False):
    """A typed refusal; ``code`` is one of the module's codes, see :data:`REFUSAL_STATUS`."""

    code: str
    message: str
    details: dict[str, Any]

    @property
    def status(self) -> int:
        """The HTTP status this refusal is answered with."""
        return REFUSAL_STATUS[self.code]


class Restocked(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Tickets back in stock for a refund; ``available`` is the type's stock right after."""

    refund_id: str
    hold_id: str
    ticket_type: str
    quantity: int
    available: int
    #: The seats back on sale (a seated hold's return), in the order the Restock named them.
    seats: tuple[str, ...] = ()


Result = Reserved | Confirmed | Cancelled | Expired | Refused | Restocked

_result_decoder: msgspec.json.Decoder[Result] = msgspec.json.Decoder(Result)
_encoder = msgspec.json.Encoder()
_fingerprint_encoder = msgspec.msgpack.Encoder()


def encode_result(result: Result) -> bytes:
    """JSON of a result, as stored next to its idempotency key."""
    return _encoder.encode(result)


def decode_result(data: bytes | str) -> Result:
    """The result :func:`encode_result` encoded, equal to the original."""
    return _result_decoder.decode(data)


def fingerprint(command: Reserve | Confirm | Cancel) -> bytes:
    """A digest of what a keyed command asks for, to tell a retry from a reused key.

    It covers the command's kind and every field that changes the request's meaning, but not
    the idempotency key and fan (they are the lookup key) nor the pass id: a fan retrying
    with a refreshed pass is still asking for the same thing. A fixed-size SHA-256 so the
    persistence layer can store it as-is (e.g. ``.hex()`` in ``request_hash``); restoring must
    hand back exactly these bytes.
    """
    fields: tuple[Any, ...]
    match command:
        case Reserve():
            if command.seats or command.level is not None:
                fields = ("reserve", "", command.quantity, command.seats, command.level)
            else:
                # Unchanged for general admission: fingerprints stored before seats existed
                # must still match their retries.
                fields = ("reserve", command.ticket_type, command.quantity)
        case Confirm():
            fields = ("confirm", command.hold_id, command.payment_ref)
        case Cancel():
            fields = ("cancel", command.hold_id)
        case _:
            assert_never(command)
    return hashlib.sha256(_fingerprint_encoder.encode(fields)).digest()


class Changes(msgspec.Struct, frozen=True):
    """Everything that changed since the last :meth:`Ledger.drain_changes`, to persist at once.

    A hold created in the batch appears once, in ``new_holds``, with its status at the end of
    the batch (it may already be paid, cancelled or expired) and never in ``updated_holds``;
    ``updated_holds`` holds the final state of older holds whose status changed. So the
    persistence layer INSERTs ``new_holds``, then UPDATEs ``updated_holds``, and derives the
    outbox rows from the statuses (a new hold that is no longer ``held`` was created *and*
    moved on within the batch). ``idempotency`` rows are ``(fan_id, key, fingerprint, result)``.
    """

    new_holds: list[Hold]
    updated_holds: list[Hold]
    idempotency: list[tuple[str, str, bytes, Result]]
    #: Tickets given back by :class:`Restock` (a ``stock_returns`` row each).
    restocks: list[Restock] = []

    def empty(self) -> bool:
        """Whether there is nothing to write."""
        return not (self.new_holds or self.updated_holds or self.idempotency or self.restocks)


_UNKNOWN_HOLD_MESSAGE = "No such reservation."


class Ledger:
    """Holds, availability and per-fan counts of one event; mutated only by :meth:`apply`."""

    __slots__ = (
        "_available",
        "_deadlines",
        "_fan_total",
        "_fan_type",
        "_fingerprints",
        "_held",
        "_holds",
        "_idempotency",
        "_max_refusals",
        "_new",
        "_new_idempotency",
        "_new_restocks",
        "_pass_closed",
        "_pass_live",
        "_refusals",
        "_restocked",
        "_returned",
        "_returned_seats",
        "_rules",
        "_seats",
        "_types",
        "_updated",
    )

    def __init__(
        self,
        rules: EventRules,
        holds: Iterable[Hold] = (),
        idempotency: Mapping[tuple[str, str], tuple[bytes, Result]] | None = None,
        *,
        used_passes: Iterable[tuple[str, str]] = (),
        max_refusals_per_fan: int = MAX_REFUSALS_PER_FAN,
        returns: Iterable[Restock] = (),
        seat_map: SeatMap | None = None,
    ) -> None:
        """Build the ledger of ``rules`` with existing ``holds`` (any statuses) already in it.

        ``returns`` are the stock returns of refunds already made (their tickets were sold,
        then given back), applied before stock is checked.

        ``idempotency`` is taken in its order (oldest first): beyond ``max_refusals_per_fan``
        refusals of one fan, the oldest are dropped. ``used_passes`` are ``(fan, pass)`` whose
        hold cycle is over although none of their settled holds is among ``holds``; a pass
        with a settled hold in ``holds`` and none still ``held`` is over too.

        With a ``seat_map`` (validated), its price levels' ticket types are sold as seats:
        the live holds of those types must carry their seats.

        Raises ``ValueError`` if the holds contradict the rules (an unknown ticket type, a
        duplicate id, more tickets held and sold than exist, a seat in two live holds):
        better to refuse to start than to sell from a wrong picture.
        """
        self._rules = rules
        self._types: dict[str, TicketTypeRules] = {}
        for t in rules.ticket_types:
            if t.name in self._types:
                raise ValueError(f"ticket type {t.name!r} appears twice")
            self._types[t.name] = t
        self._available = {t.name: t.quantity for t in rules.ticket_types}
        # Tickets in 'held' holds per type: the ones that could still come back.
        self._held = dict.fromkeys(self._types, 0)
        self._holds: dict[str, Hold] = {}
        self._fan_total: dict[str, int] = {}
        self._fan_type: dict[tuple[str, str], int] = {}
        # Entries of settled holds are not removed (a heap cannot do that cheaply); they are
        # skipped when they reach the top.
        self._deadlines: list[tuple[float, str]] = []
        self._idempotency: dict[tuple[str, str], tuple[bytes, Result]] = {}
        #: Per fan, the keys of its stored refusals, oldest first (bounded, see above).
        self._refusals: dict[str, collections.deque[str]] = {}
        self._max_refusals = max_refusals_per_fan
        #: Holds still 'held' per (fan, pass), and the (fan, pass) whose cycle is over.
        self._pass_live: dict[tuple[str, str], int] = {}
        self._pass_closed: set[tuple[str, str]] = set()
        self._new: dict[str, Hold] = {}
        self._updated: dict[str, Hold] = {}
        self._new_idempotency: list[tuple[str, str, bytes, Result]] = []
        self._fingerprints: dict[tuple[str, int], bytes] = {}
        #: Restocks applied, by refund id, and tickets returned per hold.
        self._restocked: dict[str, Restock] = {}
        self._returned: dict[str, int] = {}
        #: Seats given back per seated hold, in the order they came back.
        self._returned_seats: dict[str, tuple[str, ...]] = {}
        self._new_restocks: list[Restock] = []
        # Built below, after the returns: they are checked against the holds' seats here,
        # and the seat ledger then starts with only the seats still sold.
        self._seats: SeatLedger | None = None
        settled_passes: set[tuple[str, str]] = set()
        for hold in holds:
            if hold.id in self._holds:
                raise ValueError(f"hold {hold.id!r} appears twice")
            if hold.ticket_type not in self._types:
                raise ValueError(f"hold {hold.id!r} has unknown ticket type {hold.ticket_type!r}")
            self._holds[hold.id] = hold
            if hold.status in ("held", "paid"):
                self._take(hold)
                if hold.status == "held":
                    self._deadlines.append((hold.expires_at, hold.id))
            if hold.pass_jti is not None:
                cycle = (hold.fan_id, hold.pass_jti)
                if hold.status == "held":
                    self._pass_live[cycle] = self._pass_live.get(cycle, 0) + 1
                else:
                    settled_passes.add(cycle)
        # A live cycle's last hold was settled exactly when it has settled holds and no live one.
        self._pass_closed.update(
            c for c in (*settled_passes, *used_passes) if c not in self._pass_live
        )
        for (fan, key), (fp, result) in (idempotency or {}).items():
            self._remember(fan, key, fp, result)
        for command in returns:
            if isinstance(self._restock(command), Refused):
                raise ValueError(f"stock return {command.refund_id!r} contradicts the holds")
        self._new_restocks = []
        for name, left in self._available.items():
            if left < 0:
                raise ValueError(f"ticket type {name!r} is oversold by {-left}")
        heapq.heapify(self._deadlines)
        if seat_map is not None:
            self._seats = SeatLedger(
                seat_map,
                holds=(
                    SeatHold(h.id, h.fan_id, self._seats_kept(h), h.expires_at, h.status)
                    for h in self._holds.values()
                    if h.seats and h.status in ("held", "paid")
                ),
            )
            seated = self._seats.seated_ticket_types()
            for h in self._holds.values():
                if h.status in ("held", "paid") and h.ticket_type in seated and not h.seats:
                    raise ValueError(f"hold {h.id!r} of seated {h.ticket_type!r} has no seats")

    @classmethod
    def restore(
        cls,
        rules: EventRules,
        holds: Iterable[Hold],
        idempotency: Mapping[tuple[str, str], tuple[bytes, Result]],
        *,
        used_passes: Iterable[tuple[str, str]] = (),
        max_refusals_per_fan: int = MAX_REFUSALS_PER_FAN,
        returns: Iterable[Restock] = (),
        seat_map: SeatMap | None = None,
    ) -> Ledger:
        """Rebuild a ledger from persisted rows, in one pass (a crash or failed commit).

        Holds may be all of the event's or only the live ones (``held`` and ``paid``):
        availability and limits come out the same; settled holds that are left out answer
        later commands with ``hold_not_found`` instead of ``hold_expired`` or
        ``hold_cancelled``, and the passes of the ones left out must come in
        ``used_passes`` for their hold cycles to stay over.
        """
        return cls(
            rules,
            holds,
            idempotency,
            used_passes=used_passes,
            max_refusals_per_fan=max_refusals_per_fan,
            returns=returns,
            seat_map=seat_map,
        )

    # --- reading ---------------------------------------------------------------------------

    @property
    def rules(self) -> EventRules:
        """The rules this ledger enforces."""
        return self._rules

    def available(self, ticket_type: str) -> int:
        """Tickets of ``ticket_type`` neither held nor sold; ``KeyError`` if unknown."""
        return self._available[ticket_type]

    def availability(self) -> dict[str, int]:
        """Tickets available per ticket type, in the rules' order."""
        return dict(self._available)

    @property
    def seats(self) -> SeatLedger | None:
        """The seat ledger, when the event has a seat map (read it, never change it)."""
        return self._seats

    def held(self) -> dict[str, int]:
        """Tickets in ``held`` holds per ticket type (taken, but they may come back)."""
        return dict(self._held)

    def hold(self, hold_id: str) -> Hold | None:
        """The hold with this id, or ``None``."""
        return self._holds.get(hold_id)

    def live_holds(self) -> list[Hold]:
        """Holds whose tickets are taken: ``held`` and ``paid`` ones."""
        return [h for h in self._holds.values() if h.status in ("held", "paid")]

    def all_holds(self) -> list[Hold]:
        """Every hold the ledger knows, settled ones included."""
        return list(self._holds.values())

    def sold_out(self) -> bool:
        """Nothing available and no ``held`` hold whose tickets could come back."""
        return not any(self._available.values()) and not any(self._held.values())

    def next_deadline(self) -> float | None:
        """When the earliest ``held`` hold expires: when the actor's timer should fire next."""
        heap = self._deadlines
        while heap:
            expires_at, hold_id = heap[0]
            hold = self._holds.get(hold_id)
            if hold is not None and hold.status == "held":
                return expires_at
            # Settled since it was pushed: dropping it here keeps the timer from waking
            # up for nothing.
            heapq.heappop(heap)
        return None

    def pass_used(self, fan_id: str, pass_jti: str) -> bool:
        """Whether the hold cycle of ``fan_id``'s pass ``pass_jti`` is over."""
        return (fan_id, pass_jti) in self._pass_closed

    def stored_keys(self, fan_id: str) -> int:
        """Idempotency records kept for ``fan_id`` (successes and refusals)."""
        return sum(1 for fan, _ in self._idempotency if fan == fan_id)

    def fan_count(self, fan_id: str, ticket_type: str | None = None) -> int:
        """Tickets ``fan_id`` holds or bought, in the event or of one ticket type."""
        if ticket_type is None:
            return self._fan_total.get(fan_id, 0)
        return self._fan_type.get((fan_id, ticket_type), 0)

    # --- changing --------------------------------------------------------------------------

    def apply(self, command: Command, now: float, new_id: Callable[[], str]) -> Result:
        """Apply one command at time ``now``; ``new_id`` is called once per hold created."""
        return self.apply_many((command,), now, new_id)[0]

    def apply_many(
        self, commands: Sequence[Command], now: float, new_id: Callable[[], str]
    ) -> list[Result]:
        """Apply ``commands`` in order, all at time ``now``; one result per command.

        Exactly the same as calling :meth:`apply` for each command in turn with the same
        ``now``: this is the actor's path for a whole batch, so what is the same for every
        command of the batch (the expiry of due holds, the deadline of new holds, the
        fingerprint of a reserve) is worked out once instead of once per command.
        """
        results: list[Result] = []
        append = results.append
        idempotency = self._idempotency
        new_idempotency = self._new_idempotency
        expires_at = -1.0
        # Holds that fell due are expired before the first command that is not a replay: a
        # retry answered from its key changes nothing at all, not even expiry (the next
        # fresh command does that). Once at `now` is enough for the whole batch.
        due = True
        for command in commands:
            if isinstance(command, Expire):
                append(Expired(tuple(self._expire_due(now))))
                due = False
                continue
            if isinstance(command, Restock):
                append(self._restock(command))
                continue
            key = command.idempotency_key
            if key is not None:
                fp = self._fingerprint(command)
                stored = idempotency.get((command.fan_id, key))
                if stored is not None:
                    append(stored[1] if stored[0] == fp else _key_reused(key))
                    continue
            if due:
                self._expire_due(now)
                due = False
            result: Result
            if isinstance(command, Reserve):
                if expires_at < 0:
                    # Whole microseconds, PostgreSQL's precision, so that a ledger restored
                    # from the database holds bit-identical deadlines.
                    expires_at = round(now + self._rules.hold_ttl_s, 6)
                result = self._reserve(command, expires_at, new_id)
            elif isinstance(command, Confirm):
                result = self._confirm(command)
            else:
                result = self._cancel(command)
            if key is not None:
                self._remember(command.fan_id, key, fp, result)
                new_idempotency.append((command.fan_id, key, fp, result))
            append(result)
        return results

    def drain_changes(self) -> Changes:
        """What changed since the last call (see :class:`Changes`), and forget it."""
        changes = Changes(
            new_holds=list(self._new.values()),
            updated_holds=list(self._updated.values()),
            idempotency=self._new_idempotency,
            restocks=self._new_restocks,
        )
        self._new = {}
        self._updated = {}
        self._new_idempotency = []
        self._new_restocks = []
        return changes

    def returned(self, hold_id: str) -> int:
        """Tickets of ``hold_id`` given back to stock so far."""
        return self._returned.get(hold_id, 0)

    def returned_seats(self, hold_id: str) -> tuple[str, ...]:
        """Seats of ``hold_id`` given back (on sale again) so far, in the order they came."""
        return self._returned_seats.get(hold_id, ())

    def _seats_kept(self, hold: Hold) -> tuple[str, ...]:
        """``hold``'s seats that were not returned, in their order."""
        returned = self._returned_seats.get(hold.id)
        if not returned:
            return hold.seats
        return tuple(s for s in hold.seats if s not in returned)

    # --- internals -------------------------------------------------------------------------

    def _remember(self, fan_id: str, key: str, fp: bytes, result: Result) -> None:
        """Store a keyed first result; past the cap, forget the fan's oldest refusal."""
        self._idempotency[(fan_id, key)] = (fp, result)
        if not isinstance(result, Refused):
            return
        keys = self._refusals.get(fan_id)
        if keys is None:
            keys = self._refusals[fan_id] = collections.deque()
        keys.append(key)
        if len(keys) > self._max_refusals:
            del self._idempotency[(fan_id, keys.popleft())]

    def _fingerprint(self, command: Reserve | Confirm | Cancel) -> bytes:
        """:func:`fingerprint`, remembered for the few (ticket type, quantity) reserves ask for."""
        if not isinstance(command, Reserve) or command.seats or command.level is not None:
            return fingerprint(command)
        known = (command.ticket_type, command.quantity)
        fp = self._fingerprints.get(known)
        if fp is None:
            fp = fingerprint(command)
            # Bounded: only real ticket types and quantities a fan may ask for are kept.
            rules = self._types.get(command.ticket_type)
            if rules is not None and 0 < command.quantity <= rules.per_fan_limit:
                self._fingerprints[known] = fp
        return fp

    def _reserve(self, cmd: Reserve, expires_at: float, new_id: Callable[[], str]) -> Result:
        cycle = None if cmd.pass_jti is None else (cmd.fan_id, cmd.pass_jti)
        if cycle is not None and cycle in self._pass_closed:
            return Refused(
                PASS_USED,
                "This queue pass has had its turn: its holds were cancelled, expired or"
                " paid, and a pass reserves once.",
                {},
            )
        if cmd.seats or cmd.level is not None:
            seated = self._seated(cmd)
            if isinstance(seated, Refused):
                return seated
            cmd = seated
        elif self._seats is not None and cmd.ticket_type in self._seats.seated_ticket_types():
            return Refused(
                SEATS_REQUIRED,
                f"{cmd.ticket_type!r} tickets are seats: choose them (seats) or ask for the"
                " best available (best_available).",
                {"ticket_type": cmd.ticket_type},
            )
        rules = self._types.get(cmd.ticket_type)
        if rules is None:
            return Refused(
                UNKNOWN_TICKET_TYPE,
                f"This event has no ticket type {cmd.ticket_type!r}.",
                {"ticket_type": cmd.ticket_type, "known": list(self._types)},
            )
        if cmd.quantity < 1:
            return Refused(BAD_QUANTITY, "Quantity must be at least 1.", {"quantity": cmd.quantity})
        # The narrower limit first, so the message names the rule the fan actually hit.
        current = self._fan_type.get((cmd.fan_id, cmd.ticket_type), 0)
        if current + cmd.quantity > rules.per_fan_limit:
            return Refused(
                FAN_LIMIT,
                f"At most {rules.per_fan_limit} {cmd.ticket_type!r} tickets per fan.",
                {
                    "scope": "ticket_type",
                    "ticket_type": cmd.ticket_type,
                    "limit": rules.per_fan_limit,
                    "current": current,
                },
            )
        current = self._fan_total.get(cmd.fan_id, 0)
        if current + cmd.quantity > self._rules.per_fan_limit:
            return Refused(
                FAN_LIMIT,
                f"At most {self._rules.per_fan_limit} tickets per fan for this event.",
                {"scope": "event", "limit": self._rules.per_fan_limit, "current": current},
            )
        available = self._available[cmd.ticket_type]
        if cmd.quantity > available:
            held = self._held[cmd.ticket_type]
            if cmd.quantity <= available + held:
                return Refused(
                    TICKETS_HELD,
                    f"The {cmd.ticket_type!r} tickets left are held by fans checking out; some"
                    " may come back when their holds lapse. Try again shortly.",
                    {"ticket_type": cmd.ticket_type, "available": available, "held": held},
                )
            return Refused(
                SOLD_OUT,
                f"Not enough {cmd.ticket_type!r} tickets left.",
                {"ticket_type": cmd.ticket_type, "available": available},
            )
        hold_id = new_id()
        if hold_id in self._holds:
            raise ValueError(f"new_id returned an existing hold id {hold_id!r}")
        if self._seats is not None and (cmd.seats or cmd.level is not None):
            taken = (
                self._seats.hold(hold_id, cmd.fan_id, cmd.seats, expires_at=expires_at)
                if cmd.seats
                else self._seats.hold_best(
                    hold_id, cmd.fan_id, cmd.level or "", cmd.quantity, expires_at=expires_at
                )
            )
            if not isinstance(taken, SeatHold):  # checked by _seated: a bug if it happens
                raise ValueError(f"seat ledger refused a checked hold: {taken.message}")
            hold = Hold(
                hold_id,
                cmd.fan_id,
                cmd.ticket_type,
                cmd.quantity,
                "held",
                expires_at,
                cmd.pass_jti,
                None,
                taken.seats,
            )
        else:
            # The hot path of every general-admission reserve: positional, no seats.
            hold = Hold(
                hold_id, cmd.fan_id, cmd.ticket_type, cmd.quantity, "held", expires_at, cmd.pass_jti
            )
        self._holds[hold_id] = hold
        self._take(hold)
        heapq.heappush(self._deadlines, (hold.expires_at, hold_id))
        self._new[hold_id] = hold
        if cycle is not None:
            self._pass_live[cycle] = self._pass_live.get(cycle, 0) + 1
        return Reserved(hold)

    def _seated(self, cmd: Reserve) -> Reserve | Refused:
        """Check a seated reserve and return it with its ticket type and quantity filled in.

        Everything the seat ledger could refuse is checked here, before the ticket type's
        rules (limits, stock), so that a refusal names the seats: afterwards the seat ledger
        cannot refuse, and the hold and its seats are taken together.
        """
        seat_ledger = self._seats
        if seat_ledger is None:
            return Refused(
                UNKNOWN_SEAT if cmd.seats else UNKNOWN_LEVEL,
                "This event has no seat map: reserve by ticket type and quantity.",
                {},
            )
        if cmd.seats and cmd.level is not None:
            return Refused(BAD_QUANTITY, "Ask for seats or for the best available, not both.", {})
        if cmd.level is not None:
            ticket_type = seat_ledger.ticket_type_of_level(cmd.level)
            if ticket_type is None:
                return Refused(
                    UNKNOWN_LEVEL,
                    f"This event has no price level {cmd.level!r}.",
                    {"level": cmd.level},
                )
            if cmd.quantity < 1:
                return Refused(BAD_QUANTITY, "Ask for at least one seat.", {"count": cmd.quantity})
            free = seat_ledger.available(cmd.level)
            if free < cmd.quantity:
                return Refused(
                    NOT_ENOUGH_SEATS,
                    f"Only {free} seats of price level {cmd.level!r} are free.",
                    {"level": cmd.level, "available": free},
                )
            return msgspec.structs.replace(cmd, ticket_type=ticket_type)
        unknown = [s for s in cmd.seats if seat_ledger.level_of(s) is None]
        if unknown:
            return Refused(UNKNOWN_SEAT, f"No such seat: {', '.join(unknown)}.", {"seats": unknown})
        if len(set(cmd.seats)) != len(cmd.seats):
            return Refused(BAD_QUANTITY, "A seat is asked for twice.", {"seats": list(cmd.seats)})
        killed = [s for s in cmd.seats if seat_ledger.state(s) == "killed"]
        if killed:
            return Refused(
                SEATS_NOT_FOR_SALE,
                f"Not for sale: {', '.join(killed)}.",
                {"seats": killed},
            )
        taken = [s for s in cmd.seats if seat_ledger.state(s) != "free"]
        if taken:
            return Refused(
                SEATS_UNAVAILABLE,
                f"Already taken: {', '.join(taken)}.",
                {"seats": taken},
            )
        types = seat_ledger.ticket_types(cmd.seats)
        if len(types) != 1:
            return Refused(
                MIXED_TICKET_TYPES,
                "One reservation holds seats of one ticket type; reserve the others apart.",
                {"ticket_types": sorted(types)},
            )
        (ticket_type,) = types
        return msgspec.structs.replace(cmd, ticket_type=ticket_type, quantity=len(cmd.seats))

    def _confirm(self, cmd: Confirm) -> Result:
        # Expiry already ran for this `now`, so a hold past its deadline is 'expired' here:
        # confirming it is refused, never accepted late.
        hold = self._holds.get(cmd.hold_id)
        if hold is None or hold.fan_id != cmd.fan_id:
            return _unknown_hold(cmd.hold_id)
        if hold.status != "held":
            return _settled(hold)
        return Confirmed(self._settle(hold, "paid", cmd.payment_ref))

    def _cancel(self, cmd: Cancel) -> Result:
        hold = self._holds.get(cmd.hold_id)
        if hold is None or hold.fan_id != cmd.fan_id:
            return _unknown_hold(cmd.hold_id)
        if hold.status != "held":
            return _settled(hold)
        return Cancelled(self._settle(hold, "cancelled", None))

    def _restock(self, cmd: Restock) -> Result:
        """Give a paid hold's tickets back, once per refund id."""
        done = self._restocked.get(cmd.refund_id)
        if done is not None:
            if done != cmd:
                return _key_reused(cmd.refund_id)
            return Restocked(
                cmd.refund_id,
                cmd.hold_id,
                cmd.ticket_type,
                cmd.quantity,
                self._available[cmd.ticket_type],
                cmd.seats,
            )
        hold = self._holds.get(cmd.hold_id)
        if hold is None or hold.fan_id != cmd.fan_id or hold.ticket_type != cmd.ticket_type:
            return _unknown_hold(cmd.hold_id)
        if cmd.quantity < 1:
            return Refused(BAD_QUANTITY, "Quantity must be at least 1.", {"quantity": cmd.quantity})
        returned = self._returned.get(hold.id, 0)
        if hold.status != "paid" or returned + cmd.quantity > hold.quantity:
            return Refused(
                RETURN_EXCEEDS_SALE,
                "This return gives back more tickets than the reservation sold.",
                {
                    "hold_id": hold.id,
                    "status": hold.status,
                    "sold": hold.quantity if hold.status == "paid" else 0,
                    "returned": returned,
                    "quantity": cmd.quantity,
                },
            )
        refused = self._check_returned_seats(hold, cmd)
        if refused is not None:
            return refused
        # The counts _take made when the hold was taken, undone for the tickets returned:
        # stock for the next fans, and the fan's limits (they no longer have these tickets).
        q = cmd.quantity
        self._available[hold.ticket_type] += q
        _decrement(self._fan_total, hold.fan_id, q)
        _decrement(self._fan_type, (hold.fan_id, hold.ticket_type), q)
        self._returned[hold.id] = returned + q
        if cmd.seats:
            self._returned_seats[hold.id] = self.returned_seats(hold.id) + cmd.seats
            # None while restoring: the seat ledger is then built without these seats.
            if self._seats is not None:
                freed = self._seats.return_seats(hold.id, cmd.seats)
                if not isinstance(freed, SeatHold):  # checked above: a bug if it happens
                    raise ValueError(f"seat ledger refused a checked return: {freed.message}")
        self._restocked[cmd.refund_id] = cmd
        self._new_restocks.append(cmd)
        left = self._available[hold.ticket_type]
        return Restocked(cmd.refund_id, hold.id, hold.ticket_type, q, left, cmd.seats)

    def _check_returned_seats(self, hold: Hold, cmd: Restock) -> Refused | None:
        """Refuse a return whose seats are not exactly ``quantity`` of the hold's seats still
        sold (for a general-admission hold: any seat at all)."""
        details: dict[str, Any] = {"hold_id": hold.id, "seats": list(cmd.seats)}
        outside = [s for s in cmd.seats if s not in hold.seats]
        if outside:
            return Refused(
                SEATS_NOT_IN_HOLD,
                f"Not seats of this reservation: {', '.join(outside)}.",
                {**details, "seats": outside},
            )
        if not hold.seats:
            return None
        if len(set(cmd.seats)) != len(cmd.seats) or len(cmd.seats) != cmd.quantity:
            return Refused(
                RETURN_SEATS_REQUIRED,
                "A return of seats names each seat it gives back once, one per ticket.",
                {**details, "quantity": cmd.quantity},
            )
        again = [s for s in cmd.seats if s in self.returned_seats(hold.id)]
        if again:
            return Refused(
                SEATS_ALREADY_RETURNED,
                f"Already given back: {', '.join(again)}.",
                {**details, "seats": again},
            )
        return None

    def _expire_due(self, now: float) -> list[Hold]:
        """Expire every ``held`` hold with ``expires_at <= now``: O(k log n) for k due."""
        expired: list[Hold] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, hold_id = heapq.heappop(heap)
            hold = self._holds.get(hold_id)
            if hold is not None and hold.status == "held":
                expired.append(self._settle(hold, "expired", None))
        return expired

    def _take(self, hold: Hold) -> None:
        """Count a held or paid hold against stock and the fan's limits."""
        q = hold.quantity
        self._available[hold.ticket_type] -= q
        if hold.status == "held":
            self._held[hold.ticket_type] += q
        self._fan_total[hold.fan_id] = self._fan_total.get(hold.fan_id, 0) + q
        key = (hold.fan_id, hold.ticket_type)
        self._fan_type[key] = self._fan_type.get(key, 0) + q

    def _settle(self, hold: Hold, status: HoldStatus, payment_ref: str | None) -> Hold:
        """Move a ``held`` hold to a final status, fix the counts and record the change."""
        q = hold.quantity
        self._held[hold.ticket_type] -= q
        if status != "paid":
            # Expired and cancelled holds give their tickets back to stock and to the fan.
            self._available[hold.ticket_type] += q
            _decrement(self._fan_total, hold.fan_id, q)
            _decrement(self._fan_type, (hold.fan_id, hold.ticket_type), q)
        if hold.pass_jti is not None:
            cycle = (hold.fan_id, hold.pass_jti)
            left = self._pass_live[cycle] - 1
            if left:
                self._pass_live[cycle] = left
            else:
                # The pass's last live hold: its cycle is over (see the module docstring).
                del self._pass_live[cycle]
                self._pass_closed.add(cycle)
        if hold.seats and self._seats is not None:
            self._seats.end(hold.id, status)
        settled = msgspec.structs.replace(hold, status=status, payment_ref=payment_ref)
        self._holds[hold.id] = settled
        # A hold created in this batch is still an INSERT, just with its final status.
        if hold.id in self._new:
            self._new[hold.id] = settled
        else:
            self._updated[hold.id] = settled
        return settled


def _decrement(counts: dict[_K, int], key: _K, by: int) -> None:
    left = counts[key] - by
    # Dropped at zero so the maps only grow with fans who currently hold something.
    if left:
        counts[key] = left
    else:
        del counts[key]


def _key_reused(key: str) -> Refused:
    return Refused(
        IDEMPOTENCY_MISMATCH,
        "This Idempotency-Key was already used for a different request.",
        {"idempotency_key": key},
    )


def _unknown_hold(hold_id: str) -> Refused:
    return Refused(UNKNOWN_HOLD, _UNKNOWN_HOLD_MESSAGE, {"hold_id": hold_id})


def _settled(hold: Hold) -> Refused:
    """The refusal for touching a hold that is no longer ``held``."""
    details = {"hold_id": hold.id, "status": hold.status}
    if hold.status == "paid":
        return Refused(ALREADY_CONFIRMED, "This reservation is already paid.", details)
    if hold.status == "cancelled":
        return Refused(HOLD_CANCELLED, "This reservation was cancelled.", details)
    return Refused(
        HOLD_EXPIRED,
        "This reservation expired.",
        {**details, "expired_at": hold.expires_at},
    )
