"""The gate asks PostgreSQL about a pass Redis does not know, and the restore's rules (pure)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis.asyncio import Redis

from admission.passes import PassClaims, PassGate, PassKeys
from admission.recovery import classify
from inventory import catalogue
from waitroom.core.errors import Forbidden, Unavailable
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio


def row(**over: Any) -> dict[str, Any]:
    base = {
        "jti": "j",
        "fan_id": "f",
        "seq": 1,
        "token": "t",
        "exp": 2e9,
        "revoked": False,
        "paid": False,
        "settled": False,
        "holding": False,
        "holds": 0,
    }
    return {**base, **over}


def test_which_restored_passes_still_count_against_max_active() -> None:
    assert classify(row()).active  # admitted, nothing reserved yet
    assert classify(row(holding=True, holds=1)).active  # shopping
    assert not classify(row(holds=2)).active  # its holds all released: the cycle is over
    paid = classify(row(paid=True, settled=True, holds=1))
    assert (paid.spent, paid.active) == (True, False)
    # Confirmed, its payment under way: it may not reserve again, and it still shops (the
    # live path frees its slot once the order is paid; the fault test's AOF restart saw a
    # rebuild free six such slots five seconds early).
    paying = classify(row(paid=True, holds=1))
    assert (paying.spent, paying.active) == (True, True)
    revoked = classify(row(revoked=True, holding=True, holds=1))
    assert (revoked.revoked, revoked.active) == (True, False)


async def test_a_pass_redis_does_not_know_is_judged_by_postgresql(
    pool: asyncpg.Pool[Any], redis: Redis, settings: Settings
) -> None:
    event_id = f"rc-{uuid.uuid4().hex[:10]}"
    spec = catalogue.EventCreate(
        id=event_id, name="recovery", ticket_types=[catalogue.TicketTypeSpec("ga", 5, 100, "EUR")]
    )
    await catalogue.create_event(pool, spec, actor="test", now=datetime.now(UTC))
    keys = Keys(settings.redis_prefix)
    pass_keys = PassKeys(Ed25519PrivateKey.generate())
    gate = PassGate(pass_keys, redis, keys, "waitroom", db=pool)
    now = int(time.time())

    def signed(fan: str, number: int) -> tuple[str, str]:
        jti = uuid.uuid4().hex
        claims = PassClaims("waitroom", fan, event_id, jti, now, now, now + 600, number)
        return jti, pass_keys.sign(claims)

    good_jti, good = signed("fan-good", 1)
    bad_jti, bad = signed("fan-bad", 2)
    _, unknown = signed("fan-unknown", 3)
    await pool.execute(
        "INSERT INTO queue_passes (jti, event_id, fan_id, seq, issued_at, expires_at, revoked_at)"
        " VALUES ($1, $2, 'fan-good', 1, now(), now() + interval '10 minutes', NULL),"
        " ($3, $2, 'fan-bad', 2, now(), now() + interval '10 minutes', now())",
        good_jti,
        event_id,
        bad_jti,
    )
    # Redis knows none of them (no room, no markers): PostgreSQL decides.
    claims = await gate.check(good, event_id=event_id, fan_id="fan-good", now=now, unspent=True)
    assert claims.jti == good_jti
    with pytest.raises(Forbidden) as refused:
        await gate.check(bad, event_id=event_id, fan_id="fan-bad", now=now, unspent=True)
    assert refused.value.code == "pass_revoked"
    # Known to neither store (its record is still on its way): try again, never accepted.
    with pytest.raises(Unavailable):
        await gate.check(unknown, event_id=event_id, fan_id="fan-unknown", now=now)
    # Once Redis knows the fan as admitted, Redis answers alone (no marker: accepted).
    await redis.hset(keys.event(event_id).admitted, "fan-bad", bad)
    claims = await gate.check(bad, event_id=event_id, fan_id="fan-bad", now=now)
    assert claims.jti == bad_jti
