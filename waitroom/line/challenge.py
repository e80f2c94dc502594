"""Proof-of-work on the way in: challenges a fan solves before the line gives it a place.

The format is ALTCHA's (the ``altcha`` package, v1 API): the server picks a secret number in
``[0, maxnumber]`` and sends ``challenge = sha256(salt + number)`` in hex with
``signature = HMAC-SHA256(key, challenge)``; the client tries numbers from 0 up until the
hash matches and sends back ``base64(JSON {algorithm, challenge, number, salt, signature})``
in the ``X-Challenge-Solution`` header of its join. Verifying costs the server one SHA-256
and one HMAC (some 10-20 µs); solving costs the client ``number`` hashes, on average half
of ``maxnumber``. Everything the server must know later rides inside the signed salt (the
salt is part of the hashed input, so it cannot be edited without a new search):
``<nonce>?expires=<unix s>&e=<event id>&a=<client address>&``.

Single use: the join script records the challenge in Redis (``SET NX``, until it would have
expired) atomically with the place it pays for; a second join with it is refused.

Difficulty (``maxnumber``) is :func:`difficulty`, pure: the base for a normal crowd, and
doubling for every few challenges the same address or subnet (IPv4 /24, IPv6 /48) asks for
beyond its allowance, and when the line grows faster than the operator expected. The counts
it reads are decayed counters kept in Redis by ``challenge.lua`` (half-life
:data:`PRESSURE_HALF_LIFE_S`). Measured in headless Chromium on the 2-core development box,
``crypto.subtle`` SHA-256 in a Web Worker (``static/pow-worker.js``) does some 70,000 hashes/s
per worker, under load: the worst case (the number is the last one tried) costs, with one and
two workers and the workers' start included, 0.5/0.36 s for ``maxnumber`` 20,000, 1.1/0.8 s
for 80,000 and 4.4/3.1 s for 320,000. The default base of 10,000 is thus at most ~0.25 s
there (half that on average), within 1 s on a phone three to four times slower. A native
Python solver (``stress/pow.py``) does about 700,000 hashes/s per core, ten times a browser:
which is why the brake on a bot farm is the rising difficulty, not the base.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import secrets
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
from altcha import v1 as altcha

from waitroom.core import clientaddr, keyfiles
from waitroom.core.errors import Forbidden, Gone, SettingsError
from waitroom.core.settings import Settings
from waitroom.line import receipts

#: How long a challenge may be solved and used: long enough for a slow phone at a raised
#: difficulty, short enough that a farm cannot stock up on cheap ones before a sale.
TTL_S = 120
#: The header a join carries its solution in.
HEADER = "X-Challenge-Solution"
#: Longest solution looked at: a real one is about 400 characters.
MAX_SOLUTION_CHARS = 2048
#: Half-life of the counters of challenges asked for (per address, per subnet, per event).
PRESSURE_HALF_LIFE_S = 300.0
_ALGORITHM: Literal["SHA-256"] = "SHA-256"
_SECRET_NAME = "challenge-secret"
_MIN_SECRET_BYTES = 32


# --- difficulty (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """How difficulty answers pressure; the defaults are argued in the field comments.

    The allowance of an address or subnet is ``max(free, share * crowd)``: a household gets
    ``address_free`` cheap challenges, and behind a carrier NAT or a campus the allowance
    grows with the crowd (a subnet may take ``share`` of the recent crowd before paying
    more), so a shared address is slowed, not shut out. Beyond it the work doubles every
    ``*_step`` challenges. A bot farm on one /24 with ``C`` hashes of CPU gets about
    ``allowance + subnet_step * log2(C / base)`` places: with 2 cores for a minute (some
    80 M hashes) that is 8 + 0.5 * 13, some 15, whatever the crowd.
    """

    #: ``maxnumber`` of a normal crowd (about ``base/2`` hashes on average to solve).
    base: int = 10_000
    #: Hardest challenge ever issued: 2^12 times the base, minutes in a browser; the counters
    #: decay (half-life 5 min), so a subnet that stops asking comes back down.
    max_number: int = 10_000 * 4096
    #: Cheap challenges per address (IPv4, IPv6 /64) before the price rises: a household.
    address_free: float = 4.0
    #: Doubling every extra challenge of one address.
    address_step: float = 1.0
    #: Cheap challenges per subnet (IPv4 /24, IPv6 /48): a small office.
    subnet_free: float = 8.0
    #: Doubling twice per extra challenge of one subnet: the main brake on a farm.
    subnet_step: float = 0.5
    #: Share of the recent crowd one address or subnet may ask for at the base price.
    share: float = 0.005
    #: Joins per second the operator expects; faster growth raises every challenge.
    expected_joins_per_s: float = 200.0
    #: At most 2^3 = 8 times the work for a surge of the whole line.
    max_surge_level: float = 3.0


@dataclass(frozen=True, slots=True)
class Pressure:
    """Decayed counts of challenges asked for (this one included), and the line's growth."""

    address: float
    subnet: float
    #: All addresses, for the event: the recent crowd.
    crowd: float
    #: Joins per second, smoothed.
    join_rate: float


def difficulty(pressure: Pressure, policy: Policy) -> int:
    """The ``maxnumber`` of the next challenge under ``pressure``.

    Never below ``policy.base`` nor above ``policy.max_number``; never falls when the
    address's, the subnet's or the line's pressure rises.
    """
    crowd = max(0.0, pressure.crowd) * policy.share
    excess = max(
        0.0,
        (pressure.address - max(policy.address_free, crowd)) / policy.address_step,
        (pressure.subnet - max(policy.subnet_free, crowd)) / policy.subnet_step,
    )
    surge = 0.0
    if pressure.join_rate > policy.expected_joins_per_s:
        surge = min(
            policy.max_surge_level, math.log2(pressure.join_rate / policy.expected_joins_per_s)
        )
    level = excess + surge
    # Beyond this level the product exceeds any bound: compare exponents, not huge floats.
    if level >= math.log2(policy.max_number / policy.base):
        return policy.max_number
    return max(policy.base, min(policy.max_number, round(policy.base * math.pow(2.0, level))))


def networks(subject: str) -> tuple[str, str]:
    """The address and subnet counters of a client subject (``client_subject``'s answer).

    IPv4 ``a.b.c.d`` is counted as itself and its /24; an IPv6 /64 as itself and its /48.
    Anything else (a test client's name) is its own subnet.
    """
    v4_subnet = clientaddr.subnet_of_v4(subject)
    if v4_subnet is not None:  # the common case, without ipaddress objects (~6 us)
        return f"a:{subject}", f"n:{v4_subnet}"
    text = subject.removesuffix("/64")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return f"a:{subject}", f"n:{subject}"
    prefix = 24 if address.version == 4 else 48
    net = ipaddress.ip_network((address, prefix), strict=False)
    return f"a:{subject}", f"n:{net}"


# --- identity caps -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caps:
    """Hard caps on live places (fans waiting in line) per address and subnet in one event.

    The backstop, not the brake: each further identity from an address or subnet already
    costs a harder challenge (:class:`Difficulty`), which is what slows a farm down. A cap
    counts the places of an address that are live right now (``join.lua`` with
    ``live.lua``): a place stops counting when its fan leaves, is dropped as abandoned or is
    admitted, so a shared address that reaches a cap waits for the line to move (429 with
    ``Retry-After: retry_after_s``) and is never shut out of the sale.

    The numbers: a carrier-grade NAT puts some tens of subscribers behind one IPv4 address
    and a few thousand behind a /24, and a campus or office a few hundred to a few thousand
    people; a hot sale draws a share of them at once. 256 waiting places per address and
    1,024 per /24 stay far above what such a shared address puts in one line at the same
    time (an office of 256 people all in one queue), while capping what a farm that pays
    every challenge can hold in line at once. IPv6 uses the same numbers for a /64 (one
    subscriber, or one office LAN) and a /48 (one site).
    """

    address: int = 256
    subnet: int = 1024
    retry_after_s: int = 30


CAPS = Caps()


# --- challenges ----------------------------------------------------------------------------


class ChallengeBody(msgspec.Struct, frozen=True):
    """``POST /v1/events/{event_id}/challenge``: an ALTCHA challenge (v1 format)."""

    algorithm: str
    #: sha256(salt + number) in hex: find ``number``.
    challenge: str
    #: ``number`` is at most this.
    maxnumber: int
    #: Signed input: ``<nonce>?expires=...&e=<event>&a=<address>&``; hash it as is.
    salt: str
    signature: str
    event_id: str
    #: Unix seconds after which a solution is refused (410 challenge_expired).
    expires_at: int
    #: Where to send the solution: the join's ``X-Challenge-Solution`` header.
    header: str = HEADER


class _Solution(msgspec.Struct, frozen=True):
    algorithm: str
    challenge: str
    number: int
    salt: str
    signature: str


_decode_solution = msgspec.json.Decoder(_Solution)


@dataclass(frozen=True, slots=True)
class Verified:
    """A valid solution: its id (the challenge hash) and how long it stays usable."""

    id: str
    ttl_ms: int


def required(event_id: str) -> Forbidden:
    """The 403 of a join that needs a solution and has none: it says how to get one."""
    return Forbidden(
        "solve a challenge first: POST the challenge URL, solve it, and send the solution"
        f" in the {HEADER} header of the join",
        code="challenge_required",
        details={
            "challenge_url": f"/v1/events/{event_id}/challenge",
            "method": "POST",
            "header": HEADER,
            "format": "altcha",
        },
    )


def replayed() -> Forbidden:
    """The 403 of a solution that already paid for a place."""
    return Forbidden(
        "this challenge has been used already: get a new one",
        code="challenge_replayed",
    )


def _invalid(message: str) -> Forbidden:
    return Forbidden(message, code="challenge_invalid")


class Challenges:
    """Issues and verifies the challenges of one process; built once at start-up."""

    def __init__(
        self,
        secret: bytes,
        *,
        policy: Policy | None = None,
        enabled: bool = True,
        for_users: bool = False,
    ) -> None:
        self._secret = secret
        self.policy = policy or Policy()
        #: ``WAITROOM_CHALLENGE``: joins need a solution.
        self.enabled = enabled
        #: ``WAITROOM_CHALLENGE_FOR_USERS``: host-site users need one too.
        self.for_users = for_users
        #: The key of place receipts (:mod:`waitroom.line.receipts`), derived from the same
        #: shared secret: every node verifies what any node signed.
        self.receipt_key = receipts.receipt_key(secret)

    @classmethod
    def from_settings(cls, settings: Settings) -> Challenges:
        """The challenges ``settings`` configure (secret from its file, or generated)."""
        policy = Policy(
            base=settings.challenge_base,
            max_number=settings.challenge_base * 4096,
            expected_joins_per_s=settings.challenge_expected_joins_per_s,
        )
        return cls(
            load_challenge_secret(settings),
            policy=policy,
            enabled=settings.challenge,
            for_users=settings.challenge_for_users,
        )

    def needed(self, kind: str) -> bool:
        """Whether a fan of ``kind`` ("visitor" or "user") must pay for a new place."""
        return self.enabled and (kind != "user" or self.for_users)

    def issue(
        self, event_id: str, subject: str, max_number: int, now: float, *, number: int | None = None
    ) -> ChallengeBody:
        """A challenge bound to ``event_id`` and ``subject``, expiring :data:`TTL_S` from now."""
        expires = int(now) + TTL_S
        made = altcha.create_challenge(
            altcha.ChallengeOptions(
                algorithm=_ALGORITHM,
                max_number=max_number,
                hmac_key=self._secret,
                number=number,
                expires=datetime.fromtimestamp(expires, UTC),
                params={"e": event_id, "a": subject},
            )
        )
        return ChallengeBody(
            algorithm=made.algorithm,
            challenge=made.challenge,
            maxnumber=made.max_number,
            salt=made.salt,
            signature=made.signature,
            event_id=event_id,
            expires_at=expires,
        )

    def verify(self, solution: str, event_id: str, subject: str, now: float) -> Verified:
        """Check a solution for a join of ``event_id`` from ``subject`` at ``now``.

        403 ``challenge_invalid`` (malformed, forged or wrong number), 410
        ``challenge_expired``, 403 ``challenge_wrong_event`` / ``challenge_wrong_address``.
        Whether it was used before is for the join script to say (it records it).
        """
        if not solution or len(solution) > MAX_SOLUTION_CHARS:
            raise _invalid(f"the {HEADER} header is empty or too long")
        try:
            data = _decode_solution.decode(base64.b64decode(solution, validate=True))
        except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
            raise _invalid(f"the {HEADER} header is not a base64 ALTCHA payload") from None
        if data.algorithm != _ALGORITHM or not 0 <= data.number <= self.policy.max_number:
            raise _invalid("the solution does not solve its challenge")
        payload = altcha.Payload(_ALGORITHM, data.challenge, data.number, data.salt, data.signature)
        ok, _ = altcha.verify_solution(payload, self._secret, check_expires=False)
        if not ok:
            raise _invalid("the solution does not solve its challenge")
        params = urllib.parse.parse_qs(data.salt.partition("?")[2])
        try:
            expires = int(params["expires"][0])
            bound_event, bound_subject = params["e"][0], params["a"][0]
        except (KeyError, IndexError, ValueError):
            raise _invalid("the challenge was not issued by this waiting room") from None
        if now >= expires:
            raise Gone(
                "the challenge has expired: get a new one",
                code="challenge_expired",
                details={"expired_at": expires},
            )
        if bound_event != event_id:
            raise Forbidden(
                "the challenge was issued for another event",
                code="challenge_wrong_event",
                details={"event_id": event_id},
            )
        if bound_subject != subject:
            raise Forbidden(
                "the challenge was issued to another client address: get a new one",
                code="challenge_wrong_address",
            )
        return Verified(data.challenge, max(1, math.ceil((expires - now) * 1000)))


def solve(body: ChallengeBody | dict[str, Any]) -> str:
    """Solve a challenge natively and return the ``X-Challenge-Solution`` value.

    For tests and simulated fans; a browser does the same in ``static/pow-worker.js``.
    """
    data = body if isinstance(body, dict) else msgspec.structs.asdict(body)
    found = altcha.solve_challenge(
        data["challenge"], data["salt"], data["algorithm"], int(data["maxnumber"]), 0
    )
    if found is None:
        raise ValueError("no number solves this challenge")
    payload = altcha.Payload(
        data["algorithm"], data["challenge"], found.number, data["salt"], data["signature"]
    )
    return payload.to_base64()


def load_challenge_secret(settings: Settings) -> bytes:
    """The HMAC key of challenges: ``WAITROOM_CHALLENGE_SECRET_FILE``, else generated once
    into ``<run_dir>/challenge-secret`` (race-safe: see :mod:`waitroom.core.keyfiles`)."""
    variable = "WAITROOM_CHALLENGE_SECRET_FILE"
    path = Path(settings.challenge_secret_file or Path(settings.run_dir) / _SECRET_NAME)
    if settings.challenge_secret_file is None:
        keyfiles.refuse_in_production(settings, variable)
        keyfiles.generated(
            path,
            lambda: (secrets.token_hex(32) + "\n").encode(),
            hint=f"set {variable} in production so that every host shares one",
        )
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise SettingsError(
            f"{variable}: cannot read {path}: {exc.strerror}", variable=variable
        ) from None
    if len(data) < _MIN_SECRET_BYTES:
        raise SettingsError(
            f"{variable}: {path} holds {len(data)} bytes; a secret needs at least"
            f" {_MIN_SECRET_BYTES}",
            variable=variable,
        )
    return data
