"""Redis loses an event's data mid-sale: PostgreSQL's record of the passes rebuilds it.

The whole stack over real HTTP (server with admission loops, payment workers, mock provider).
The event's keys and its passes' markers are deleted from Redis, as a restart without
persistence would lose them; then spent and revoked passes must still be refused, an admitted
fan who joins again must get the same pass back (not a second one), the passes still shopping
must count against ``max_active`` again, and new passes must be numbered after the old ones.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import httpx
import pytest

from admission.passes import read_claims
from tests.admission.support import create_event, me, wait_for
from tests.checkout.test_checkout import Fan
from tests.harness import run_cli, sync_redis
from tests.queue_support import fan_headers, new_ip
from tests.test_errors import assert_error
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings


def wipe_event(settings: Settings, event_id: str, jtis: list[str]) -> int:
    """Delete the event's keys, its passes' markers among them (they carry the event's hash
    tag), as Redis restarted empty would. ``jtis``: the passes (their markers go with the
    event's keys)."""
    keys = Keys(settings.redis_prefix)
    with sync_redis(settings.redis_url) as sync:
        names = list(sync.scan_iter(match=f"{keys.event(event_id).base}:*", count=1000))
        return int(sync.delete(*names)) if names else 0


def admission(admin: httpx.Client, event_id: str, **patch: Any) -> None:
    response = admin.patch(f"/v1/admin/events/{event_id}/admission", json=patch)
    assert response.status_code == 200, response.text


def jti(queue_pass: str) -> str:
    claims = read_claims(queue_pass)
    assert claims is not None
    return claims.jti


def seq(queue_pass: str) -> int:
    claims = read_claims(queue_pass)
    assert claims is not None
    return claims.seq


def test_spent_revoked_and_active_passes_survive_redis_losing_the_event(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, quantity=10, max_active=4, prefix="rl")
    paying, revoked, holding, idle = (Fan(client, event_id) for _ in range(4))
    for fan in (paying, revoked, holding, idle):
        fan.wait_for_pass()
    admission(admin, event_id, paused=True)
    waiting = Fan(client, event_id)

    # One pays (its pass is spent), one is revoked, one holds tickets, one only looks.
    hold = paying.reserve().json()
    assert paying.confirm(hold["id"]).status_code == 202
    paying.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    wait_for(lambda: paying.reserve().status_code == 403, timeout=5)
    assert admin.post(f"/v1/admin/passes/{jti(revoked.queue_pass)}/revoke").status_code == 200
    assert holding.reserve().status_code == 201
    passes = [f.queue_pass for f in (paying, revoked, holding, idle)]
    assert sorted(seq(p) for p in passes) == [1, 2, 3, 4]
    time.sleep(0.3)  # the leader records its passes in PostgreSQL off the tick's path

    assert wipe_event(settings, event_id, [jti(p) for p in passes]) > 0

    # Refused as before, whether the gate asks PostgreSQL or the rebuilt room answers.
    assert_error(paying.reserve(), 403, "pass_spent")
    assert_error(revoked.reserve(), 403, "pass_revoked")
    # An admitted fan who joins again gets the same pass, not a place and a second pass.
    again = client.post(f"/v1/events/{event_id}/queue", headers=fan_headers(idle.token))
    assert again.status_code == 200, again.text
    assert (again.json()["status"], again.json()["queue_pass"]) == ("admitted", idle.queue_pass)
    # The two passes still shopping count against max_active again (the paid and the revoked
    # one do not), and the idle fan can still reserve.
    keys = Keys(settings.redis_prefix).event(event_id)
    with sync_redis(settings.redis_url) as sync:
        active = {m.decode() for m in sync.zrange(keys.active, 0, -1)}
        assert active == {jti(holding.queue_pass), jti(idle.queue_pass)}
        assert sync.hget(keys.meta, "admitted_total") == b"4"
    assert idle.reserve().status_code == 201

    # The passes issued from now on go on after number 4 (the waiting fan's place is the
    # receipts' business: see the next test).
    fresh = Fan(client, event_id)
    admission(admin, event_id, paused=False, max_active=10)
    late = fresh.wait_for_pass()
    assert seq(late) >= 5
    del waiting


def test_pass_numbers_in_postgresql_stay_unique_after_the_rebuild(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=100, quantity=10, prefix="rn")
    first = [Fan(client, event_id) for _ in range(3)]
    for fan in first:
        fan.wait_for_pass()
    time.sleep(0.3)
    wipe_event(settings, event_id, [jti(f.queue_pass) for f in first])
    second = [Fan(client, event_id) for _ in range(3)]
    for fan in second:
        fan.wait_for_pass()
    assert sorted(seq(f.queue_pass) for f in first + second) == [1, 2, 3, 4, 5, 6]

    def recorded() -> list[int] | None:
        numbers = asyncio.run(_recorded_numbers(settings, event_id))
        return numbers if len(numbers) == 6 else None

    assert wait_for(recorded, 5) == [1, 2, 3, 4, 5, 6]


async def _recorded_numbers(settings: Settings, event_id: str) -> list[int]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT seq FROM queue_passes WHERE event_id = $1 ORDER BY seq", event_id
        )
        return [int(r["seq"]) for r in rows]
    finally:
        await conn.close()


def _join(client: httpx.Client, event_id: str, token: str | None = None, **headers: str) -> Any:
    """A join over HTTP (a new visitor without ``token``); the response."""
    client.cookies.clear()
    sent = {"X-Forwarded-For": new_ip(), **headers}
    if token is not None:
        sent.update(fan_headers(token))
    response = client.post(f"/v1/events/{event_id}/queue", headers=sent)
    client.cookies.clear()
    return response


def test_fans_put_back_by_their_receipts_keep_their_order_ahead_of_newcomers(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, paused=True, prefix="rr")
    fans = []
    for _ in range(4):
        joined = _join(client, event_id)
        assert joined.status_code == 201, joined.text
        body = joined.json()
        assert body["place_receipt"]
        fans.append((body["visitor_token"], body["place_receipt"], body["position"]))
    assert [p for _, _, p in fans] == [1, 2, 3, 4]
    (a, a_receipt, _), (b, b_receipt, _), (c, c_receipt, _), (gone, gone_receipt, _) = fans
    # While the line is intact a receipt restores nothing: in line, it is the same place...
    again = _join(client, event_id, a, **{"X-Place-Receipt": a_receipt})
    assert (again.status_code, again.json()["position"]) == (200, 1)
    # ...and a fan who left cannot use it to jump back in.
    left = client.request("DELETE", f"/v1/events/{event_id}/queue/me", headers=fan_headers(gone))
    assert left.status_code == 200, left.text
    assert_error(
        _join(client, event_id, gone, **{"X-Place-Receipt": gone_receipt}),
        410,
        "receipt_not_restorable",
    )
    # A receipt names its fan and its place: not another fan's, not a better place.
    assert_error(
        _join(client, event_id, c, **{"X-Place-Receipt": b_receipt}), 403, "receipt_invalid"
    )
    place, mac = a_receipt.split(".")
    forged = f"{int(place) - 1}.{mac}"
    assert_error(_join(client, event_id, c, **{"X-Place-Receipt": forged}), 403, "receipt_invalid")

    wipe_event(settings, event_id, [])
    # A newcomer arrives first after the loss, then the three fans come back in another order.
    newcomer = _join(client, event_id)
    assert newcomer.status_code == 201, newcomer.text
    for token, receipt in ((c, c_receipt), (a, a_receipt), (b, b_receipt)):
        back = _join(client, event_id, token, **{"X-Place-Receipt": receipt})
        assert back.status_code == 201, back.text
    positions = [me(client, event_id, t)["position"] for t in (a, b, c)]
    assert positions == [1, 2, 3]
    assert me(client, event_id, newcomer.json()["visitor_token"])["position"] == 4


def test_an_operator_restores_the_passes_of_a_room_that_lost_part_of_its_state(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, quantity=10, prefix="ro")
    fans = [Fan(client, event_id) for _ in range(2)]
    for fan in fans:
        fan.wait_for_pass()
    revoked = jti(fans[1].queue_pass)
    assert admin.post(f"/v1/admin/passes/{revoked}/revoke").status_code == 200
    time.sleep(0.3)
    # A partial loss: the room's meta survives, its active passes and a marker do not.
    keys = Keys(settings.redis_prefix)
    with sync_redis(settings.redis_url) as sync:
        sync.delete(keys.event(event_id).active, keys.event(event_id).revoked_pass(revoked))

    done = run_cli(settings, "room", "restore", event_id, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["passes"], report["active"], report["revoked"], report["last_seq"]) == (
        2,
        1,
        1,
        2,
    )
    with sync_redis(settings.redis_url) as sync:
        assert sync.zrange(keys.event(event_id).active, 0, -1) == [jti(fans[0].queue_pass).encode()]
    assert_error(fans[1].reserve(), 403, "pass_revoked")
    unknown = run_cli(settings, "room", "restore", "evt-nosuchevent")
    assert unknown.returncode != 0 and "no event 'evt-nosuchevent'" in unknown.stderr


def test_after_redis_restarts_the_workers_put_back_what_its_last_second_lost(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    """Redis back from its append-only file keeps its rooms but may lose its last second:
    here the paid pass's spent marker, the revoked pass's marker and the freed slot of the
    paid pass, and the stream messages of that second. The workers notice the restart (the
    incarnation kept in Redis is not the running one's) and put it all back from PostgreSQL,
    so the gate itself refuses both passes again, and the outbox's last messages are
    published again under their ids."""
    event_id = create_event(admin, rate=50, quantity=10, max_active=4, prefix="rr")
    paying, revoked, idle = (Fan(client, event_id) for _ in range(3))
    for fan in (paying, revoked, idle):
        fan.wait_for_pass()
    hold = paying.reserve().json()
    assert paying.confirm(hold["id"]).status_code == 202
    paying.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    wait_for(lambda: paying.reserve().status_code == 403, timeout=5)
    assert admin.post(f"/v1/admin/passes/{jti(revoked.queue_pass)}/revoke").status_code == 200
    time.sleep(0.3)  # the leader records its passes in PostgreSQL off the tick's path

    keys = Keys(settings.redis_prefix)
    ek = keys.event(event_id)
    spent, gone = jti(paying.queue_pass), jti(revoked.queue_pass)
    with sync_redis(settings.redis_url) as sync:
        # The workers reconciled this Redis when they started.
        running = wait_for(lambda: sync.get(keys.redis_incarnation), timeout=5)
        sent = [m for _, m in sync.xrange(keys.outbox) if m[b"topic"] == b"pass.spent"]
        spent_ids = {m[b"id"] for m in sent if json.loads(m[b"payload"])["jti"] == spent}
        assert len(spent_ids) == 1
        # What the lost second held, gone; and the incarnation of the Redis before the restart
        # (another slot than the event's on a cluster: no transaction across them).
        with sync.pipeline(transaction=False) as pipe:
            pipe.delete(ek.spent_pass(spent))
            pipe.delete(ek.revoked_pass(gone))
            pipe.zadd(ek.active, {spent: time.time() + 600})
            pipe.set(keys.redis_incarnation, "the-redis-before")
            pipe.execute()

        wait_for(lambda: sync.get(keys.redis_incarnation) == running, timeout=5)
        assert sync.exists(ek.spent_pass(spent)) and sync.exists(ek.revoked_pass(gone))
        assert spent not in {m.decode() for m in sync.zrange(ek.active, 0, -1)}

        def published_again() -> bool:
            again = [m for _, m in sync.xrange(keys.outbox) if m[b"id"] in spent_ids]
            return len(again) >= 2

        wait_for(published_again, timeout=5)
    # The gate refuses both itself (the ledger would answer pass_used for the paid one).
    assert_error(paying.reserve(), 403, "pass_spent")
    assert_error(revoked.reserve(), 403, "pass_revoked")
    assert idle.reserve().status_code == 201


@pytest.mark.parametrize("new_leader", [False, True], ids=["same_leader", "new_leader"])
def test_a_fan_whose_admission_redis_lost_is_not_admitted_twice(
    client: httpx.Client, admin: httpx.Client, settings: Settings, new_leader: bool
) -> None:
    # A Redis back from its append-only file has lost its last second: here, the second in
    # which the first fan left the line for its pass (the pass itself is in PostgreSQL).
    # With a new leader: the restart also cost the loop its lease, and the new tenure's
    # first tick, which drops the records of passes numbered above the room's total as never
    # issued, must not take the lost pass for one (the room is rebuilt first).
    event_id = create_event(admin, rate=50, quantity=10, max_active=2, prefix="rl")
    first = Fan(client, event_id)
    first_pass = first.wait_for_pass()
    admission(admin, event_id, paused=True)
    waiting = Fan(client, event_id)
    time.sleep(0.3)  # the leader records its passes in PostgreSQL off the tick's path
    keys = Keys(settings.redis_prefix).event(event_id)
    with sync_redis(settings.redis_url) as sync:
        head = float(sync.zrange(keys.queue, 0, 0, withscores=True)[0][1])
        sync.zadd(keys.queue, {first.fan_id: head - 1})  # back at the head of the line
        sync.zadd(keys.seen, {first.fan_id: time.time()})
        sync.hdel(keys.admitted, first.fan_id)
        sync.zrem(keys.active, jti(first_pass))
        sync.hincrby(keys.meta, "admitted_total", -1)
        sync.delete(keys.incarnation)  # as a restarted Redis's run id would not match it
        if new_leader:
            sync.delete(keys.leader)
    if new_leader:
        time.sleep(1.5)  # the lease is taken again and the new tenure ticks (paused)

    admission(admin, event_id, paused=False)
    waiting_pass = waiting.wait_for_pass()
    assert seq(waiting_pass) == 2, read_claims(waiting_pass)

    async def passes_of_first() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM queue_passes WHERE event_id = $1 AND fan_id = $2",
                    event_id,
                    first.fan_id,
                )
            )
        finally:
            await conn.close()

    assert asyncio.run(passes_of_first()) == 1
    again = client.post(f"/v1/events/{event_id}/queue", headers=fan_headers(first.token))
    assert (again.json()["status"], again.json()["queue_pass"]) == ("admitted", first_pass)
    with sync_redis(settings.redis_url) as sync:
        assert sync.zscore(keys.queue, first.fan_id) is None
        assert sync.zcard(keys.active) == 2
