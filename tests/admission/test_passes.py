"""Queue passes: signing, the JWKS, and the pass gate under attack (each refusal has its code)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from starlette.requests import Request
from starlette.responses import Response

from admission.loop import SIGN_CHUNK, sign_passes
from admission.passes import (
    FAST_CHECKS,
    LEEWAY_S,
    PassClaims,
    PassGate,
    PassKeys,
    load_or_generate,
    new_jti,
    private_pem,
    thumbprint,
)
from tests.admission.support import create_event, join, me, wait_for
from tests.harness import ADMIN_TOKEN, ServerThread, async_redis, running
from tests.queue_support import fan_headers
from waitroom.checkout_api import require_pass
from waitroom.core.errors import Forbidden, Gone, WaitroomError
from waitroom.core.http import JSONResponse
from waitroom.core.keys import Keys
from waitroom.core.openapi import Operation
from waitroom.core.settings import Settings
from waitroom.line.ratelimit import Limit
from waitroom.services import services

NOW = 1_800_000_000


def public_pem(key: Ed25519PublicKey) -> bytes:
    """``key`` as a SubjectPublicKeyInfo PEM (what WAITROOM_PASS_VERIFY_KEYS files hold)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**overrides: Any) -> PassClaims:
    values: dict[str, Any] = {
        "iss": "waitroom",
        "sub": "v_fan",
        "evt": "evt-1",
        "jti": new_jti(),
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 900,
        "seq": 1,
    }
    values.update(overrides)
    return PassClaims(**values)


def verify(keys: PassKeys, token: str, *, now: float = NOW + 1, **kw: str) -> PassClaims:
    args = {"issuer": "waitroom", "event_id": "evt-1", "fan_id": "v_fan", **kw}
    return keys.verify(token, now=now, **args)


def code_of(keys: PassKeys, token: str, **kw: Any) -> str:
    from waitroom.core.errors import WaitroomError

    try:
        verify(keys, token, **kw)
    except WaitroomError as exc:
        return f"{exc.status} {exc.code}"
    return "ok"


# --- pure ---------------------------------------------------------------------------------


def test_a_pass_carries_every_claim_and_a_header_naming_its_key() -> None:
    keys = PassKeys(Ed25519PrivateKey.generate())
    token = keys.sign(claims(seq=7))
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": keys.kid, "typ": "JWT"}
    assert verify(keys, token).seq == 7
    # PyJWT, as an integrator would use it, with the key from our JWKS.
    jwk = msgspec.to_builtins(keys.jwks().keys[0])
    decoded = jwt.decode(
        token,
        jwt.PyJWK(jwk).key,
        algorithms=["EdDSA"],
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert set(decoded) == {"iss", "sub", "evt", "jti", "iat", "nbf", "exp", "seq"}


def test_the_kid_is_the_rfc_7638_thumbprint() -> None:
    # RFC 8037 appendix A.3: the thumbprint of its Ed25519 example key.
    x = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(x)
    assert thumbprint(key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_times_have_a_small_leeway_and_no_more() -> None:
    keys = PassKeys(Ed25519PrivateKey.generate())
    token = keys.sign(claims())
    assert code_of(keys, token, now=NOW + 900 + LEEWAY_S - 1) == "ok"
    assert code_of(keys, token, now=NOW + 900 + LEEWAY_S) == "410 pass_expired"
    assert code_of(keys, token, now=NOW - LEEWAY_S) == "ok"
    assert code_of(keys, token, now=NOW - LEEWAY_S - 1) == "403 pass_invalid"


def test_junk_is_invalid_not_a_crash() -> None:
    keys = PassKeys(Ed25519PrivateKey.generate())
    for junk in ("", "é.é.é", "\x00.\x00.\x00", "e30.e30.", "W10.W10.W10", "bnVsbA.bnVsbA.AA"):
        assert code_of(keys, junk) == "403 pass_invalid", junk


def test_rotation_keeps_old_passes_valid_and_publishes_both_keys(tmp_path: Path) -> None:
    old = Ed25519PrivateKey.generate()
    new = Ed25519PrivateKey.generate()
    (tmp_path / "old.pub").write_bytes(public_pem(old.public_key()))
    (tmp_path / "new.pem").write_bytes(private_pem(new))
    settings = Settings(
        pass_signing_key=str(tmp_path / "new.pem"),
        pass_verify_keys=(str(tmp_path / "old.pub"),),
        run_dir=str(tmp_path),
    )
    keys = PassKeys.from_settings(settings)
    old_pass = PassKeys(old).sign(claims())
    assert code_of(keys, old_pass) == "ok"
    assert {k.kid for k in keys.jwks().keys} == {thumbprint(old.public_key()), keys.kid}
    assert jwt.get_unverified_header(keys.sign(claims()))["kid"] == thumbprint(new.public_key())


def test_a_bad_key_file_is_a_one_line_settings_error(tmp_path: Path) -> None:
    from waitroom.core.errors import SettingsError

    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(SettingsError, match="WAITROOM_PASS_SIGNING_KEY"):
        PassKeys.from_settings(Settings(pass_signing_key=str(tmp_path / "bad.pem")))
    with pytest.raises(SettingsError, match="cannot read"):
        PassKeys.from_settings(Settings(pass_signing_key=str(tmp_path / "missing.pem")))


def test_processes_starting_at_once_generate_one_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "pass-signing-key.pem"
    found: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        found.append(thumbprint(load_or_generate(path).public_key()))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no candidates left over


# --- the gate over HTTP, against attacks --------------------------------------------------


async def gate_probe(request: Request) -> Response:
    """A stand-in checkout route: identity (or ``?fan=`` to probe the gate alone), then the
    pass gate."""
    fan_id = request.query_params.get("fan")
    if fan_id is None:
        identity = services(request).identities.resolve(request, time.time())
        assert identity is not None
        fan_id = identity.fan_id
    checked = await require_pass(request, request.path_params["event_id"], fan_id)
    return JSONResponse(checked)


@pytest.fixture(scope="module")
def gate_server(settings: Settings) -> Iterator[ServerThread]:
    probe = Operation("GET", "/test/events/{event_id}/gate", gate_probe, "pass gate probe")
    with running(settings, extra_operations=[probe]) as srv:
        yield srv


@pytest.fixture
def http(gate_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gate_server.url, timeout=10) as c:
        yield c


@pytest.fixture
def gate_admin(gate_server: ServerThread) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=gate_server.url, timeout=10, headers=headers) as c:
        yield c


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_jwt(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)]
    )


def test_the_pass_gate_refuses_every_attack_with_its_code(
    http: httpx.Client, gate_admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(gate_admin, rate=50)
    other_event = create_event(gate_admin, rate=50)
    fan, token = join(http, event_id)
    other_fan, other_token = join(http, event_id)
    body = wait_for(lambda: (b := me(http, event_id, token))["status"] == "admitted" and b)
    good = body["queue_pass"]
    ours = PassKeys.from_settings(settings)  # the key file the server generated
    real = PassKeys(ours.signing).verify(
        good, issuer=settings.pass_issuer, event_id=event_id, fan_id=fan, now=time.time()
    )
    assert real.seq >= 1 and real.exp - real.iat == 900

    def status(
        queue_pass: str | None,
        *,
        event: str = event_id,
        as_token: str = token,
        header: str = "X-Queue-Pass",
    ) -> str:
        headers = fan_headers(as_token)
        url = f"/test/events/{event}/gate"
        if queue_pass is not None:
            if header == "Authorization":
                # The gate alone: the pass where the identity goes is not a pass.
                headers = {"Authorization": f"Bearer {queue_pass}"}
                url += f"?fan={fan}"
            else:
                headers[header] = queue_pass
        response = http.get(url, headers=headers)
        if response.status_code == 200:
            return "200 ok"
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}"

    now = int(time.time())
    base = msgspec.to_builtins(real)

    def forged(**changes: Any) -> str:
        return ours.sign(msgspec.convert({**base, "jti": new_jti(), **changes}, PassClaims))

    stranger = PassKeys(Ed25519PrivateKey.generate())
    header = jwt.get_unverified_header(good)
    head, payload, signature = good.split(".")
    tampered_payload = _b64(json.dumps({**base, "seq": 1, "sub": fan, "exp": now + 99999}).encode())
    public = public_pem(ours.signing.public_key())

    assert status(good) == "200 ok"
    assert status(None) == "403 pass_missing"
    # A token in the wrong header is missing, not accepted.
    assert status(good, header="Authorization") == "403 pass_missing"
    assert status(good, header="X-Pass") == "403 pass_missing"
    # ...and behind the identity check of a real route, a pass is no identity token either.
    as_identity = http.get(
        f"/test/events/{event_id}/gate", headers={"Authorization": f"Bearer {good}"}
    )
    assert as_identity.status_code == 401
    # Forged signature: the claims changed under our signature, or a signature flipped.
    assert status(f"{head}.{tampered_payload}.{signature}") == "403 pass_invalid"
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    assert status(f"{head}.{payload}.{flipped}") == "403 pass_invalid"
    # A key we do not trust: its own kid, or pretending to be ours.
    assert status(stranger.sign(msgspec.convert(base, PassClaims))) == "403 pass_invalid"
    impostor = jwt.encode(base, stranger.signing, algorithm="EdDSA", headers={"kid": ours.kid})
    assert status(impostor) == "403 pass_invalid"
    # alg none, with and without our kid.
    assert status(_raw_jwt({"alg": "none", "kid": ours.kid}, base)) == "403 pass_invalid"
    assert status(_raw_jwt({"alg": "none"}, base)) == "403 pass_invalid"
    # HS256 keyed with our public key (the classic algorithm confusion).
    hs_input = f"{_b64(json.dumps({'alg': 'HS256', 'kid': ours.kid}).encode())}.{payload}"
    import hashlib
    import hmac

    for secret in (public, ours.signing.public_key().public_bytes_raw()):
        mac = hmac.new(secret, hs_input.encode(), hashlib.sha256).digest()
        assert status(f"{hs_input}.{_b64(mac)}") == "403 pass_invalid"
    # Times.
    assert status(forged(exp=now - 60, iat=now - 960, nbf=now - 960)) == "410 pass_expired"
    assert status(forged(nbf=now + 600, iat=now + 600, exp=now + 1500)) == "403 pass_invalid"
    # Bound to its event and its fan.
    assert status(good, event=other_event) == "403 pass_wrong_event"
    assert status(good, as_token=other_token) == "403 pass_wrong_fan"
    # A pass of ours for the other fan, once the loop has admitted that fan (a pass that
    # neither Redis nor PostgreSQL knows is never accepted: see admission.recovery).
    wait_for(lambda: me(http, event_id, other_token)["status"] == "admitted")
    assert status(forged(sub=other_fan), as_token=other_token) == "200 ok"  # bound, not more
    assert status(forged(iss="someone-else")) == "403 pass_invalid"
    wrong_type = {**base, "jti": new_jti(), "seq": "1"}  # a claim of the wrong type
    assert (
        status(jwt.encode(wrong_type, ours.signing, algorithm="EdDSA", headers={"kid": ours.kid}))
        == "403 pass_invalid"
    )
    missing_claim = {k: v for k, v in base.items() if k != "evt"}
    assert (
        status(
            jwt.encode(missing_claim, ours.signing, algorithm="EdDSA", headers={"kid": ours.kid})
        )
        == "403 pass_invalid"
    )
    # Garbage and truncated tokens.
    for junk in (
        "garbage",
        "a.b.c",
        "....",
        good[: len(good) // 2],
        good[:-5],
        good + "x",
        "x" * 5000,
        f"{head}.{payload}",
    ):
        assert status(junk) == "403 pass_invalid", junk
    assert header["alg"] == "EdDSA"

    # Revoked, and replayed after revocation.
    revoked = gate_admin.post(f"/v1/admin/passes/{real.jti}/revoke")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["fan_id"] == fan
    assert status(good) == "403 pass_revoked"
    assert status(good) == "403 pass_revoked"
    again = gate_admin.post(f"/v1/admin/passes/{real.jti}/revoke")
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert gate_admin.post("/v1/admin/passes/no-such-pass/revoke").json()["error"]["code"] == (
        "pass_not_found"
    )
    metrics = http.get("/metrics").text
    for outcome in (
        "ok",
        "pass_missing",
        "pass_invalid",
        "pass_revoked",
        "pass_expired",
        "pass_wrong_event",
        "pass_wrong_fan",
    ):
        assert f'waitroom_pass_verifications_total{{outcome="{outcome}"}}' in metrics


def test_the_jwks_publishes_the_key_that_signs_passes(
    http: httpx.Client, settings: Settings
) -> None:
    response = http.get("/.well-known/jwks.json")
    assert response.status_code == 200
    (key,) = response.json()["keys"]
    ours = PassKeys.from_settings(settings)
    assert key == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64(ours.signing.public_key().public_bytes_raw()),
        "kid": ours.kid,
        "alg": "EdDSA",
        "use": "sig",
    }


# --- the gate's membership check (issue 14, ADR 0011) -------------------------------------


def test_the_gate_takes_the_pass_the_event_issued_without_a_signature_and_checks_the_rest(
    settings: Settings,
) -> None:
    """The pass stored for the fan in the room's ``admitted`` is accepted by equality: this
    gate cannot even verify its signature (it trusts none of the signing key's public keys).
    Its claims are still checked; any other pass goes through the signature and is refused."""
    issuer = PassKeys(Ed25519PrivateKey.generate())
    blind = PassKeys(Ed25519PrivateKey.generate())  # verifies nothing the issuer signs
    keys = Keys(f"{settings.redis_prefix}-gate-{new_jti()}")
    event_id, fan_id = "gate-evt", "fan-1"
    now = int(time.time())

    def issue(**changes: Any) -> str:
        claims = PassClaims("waitroom", fan_id, event_id, new_jti(), now, now, now + 600, 1)
        return issuer.sign(msgspec.structs.replace(claims, **changes))

    async def check(token: str, stored: str | None) -> str:
        redis = async_redis(settings.redis_url)
        try:
            admitted = keys.event(event_id).admitted
            if stored is not None:
                await redis.hset(admitted, fan_id, stored)
            gate = PassGate(blind, redis, keys, "waitroom")
            before = FAST_CHECKS._value.get()
            try:
                await gate.check(token, event_id=event_id, fan_id=fan_id, now=time.time())
            except (Forbidden, Gone) as exc:
                return f"{exc.status} {exc.code}"
            return "fast" if FAST_CHECKS._value.get() == before + 1 else "verified"
        finally:
            await redis.delete(keys.event(event_id).admitted)
            await redis.aclose()

    good = issue()
    assert asyncio.run(check(good, stored=good)) == "fast"
    # Not the stored pass: the signature decides, and this gate trusts no key of the issuer.
    assert asyncio.run(check(issue(), stored=good)) == "403 pass_invalid"
    assert asyncio.run(check(good, stored=None)) == "403 pass_invalid"
    # The stored pass, but no longer (or not yet) good: its claims are checked all the same.
    expired = issue(iat=now - 1000, nbf=now - 1000, exp=now - 100)
    assert asyncio.run(check(expired, stored=expired)) == "410 pass_expired"
    early = issue(nbf=now + 600)
    assert asyncio.run(check(early, stored=early)) == "403 pass_invalid"


def test_a_checkout_write_is_charged_once_the_pass_is_known_good(settings: Settings) -> None:
    """The stored pass is charged in the gate's one round trip, a pass checked by its
    signature after the check, a forged one never (its bucket is not even created)."""
    issuer = PassKeys(Ed25519PrivateKey.generate())
    forger = PassKeys(Ed25519PrivateKey.generate())
    keys = Keys(f"{settings.redis_prefix}-charge-{new_jti()}")
    event_id, fan_id = "charge-evt", "fan-1"
    ek = keys.event(event_id)
    limit = Limit(rate=0.001, burst=2)  # two writes, then nothing for a long time
    now = int(time.time())

    def issue(by: PassKeys = issuer) -> tuple[str, str]:
        jti = new_jti()
        return by.sign(PassClaims("waitroom", fan_id, event_id, jti, now, now, now + 600, 1)), jti

    async def writes(token: str, stored: str | None, times: int) -> list[str]:
        redis = async_redis(settings.redis_url)
        try:
            if stored is not None:
                await redis.hset(ek.admitted, fan_id, stored)
            gate = PassGate(issuer, redis, keys, "waitroom")
            answers = []
            for _ in range(times):
                try:
                    await gate.check(
                        token, event_id=event_id, fan_id=fan_id, now=time.time(), charge=limit
                    )
                    answers.append("ok")
                except WaitroomError as exc:
                    answers.append(f"{exc.status} {exc.code}")
            return answers
        finally:
            await redis.delete(ek.admitted)
            await redis.aclose()

    stored, _ = issue()
    assert asyncio.run(writes(stored, stored, 3)) == ["ok", "ok", "429 checkout_rate_limited"]
    signed, _ = issue()  # good, but not the stored one: the signature decides, then the bucket
    assert asyncio.run(writes(signed, stored, 3)) == ["ok", "ok", "429 checkout_rate_limited"]
    forged, forged_jti = issue(forger)
    assert asyncio.run(writes(forged, stored, 3)) == ["403 pass_invalid"] * 3

    async def bucket_exists(jti: str) -> int:
        redis = async_redis(settings.redis_url)
        try:
            return int(await redis.exists(ek.checkout_bucket(jti)))
        finally:
            await redis.aclose()

    assert asyncio.run(bucket_exists(forged_jti)) == 0


@pytest.mark.anyio
async def test_a_large_tick_signs_its_passes_a_chunk_per_turn_of_the_event_loop() -> None:
    """At 20,000 admissions/s a tick catching up signs thousands of passes: in one go that
    held the leader's event loop (and whatever else it serves) for 100-270 ms. Every
    :data:`SIGN_CHUNK` the loop gets a turn, and every pass is still the one for its claims."""
    keys = PassKeys(Ed25519PrivateKey.generate())
    now = int(time.time())
    claims = [
        PassClaims(
            iss="waitroom",
            sub=f"fan{i}",
            evt="evt",
            jti=f"j{i}",
            iat=now,
            nbf=now,
            exp=now + 600,
            seq=i + 1,
        )
        for i in range(4 * SIGN_CHUNK + 10)
    ]
    turns = 0
    done = False

    async def count_turns() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    before = turns
    passes = await sign_passes(keys, claims)
    during = turns - before
    done = True
    await counter
    assert during >= 4, during  # a turn between each two chunks of 256
    assert len(passes) == len(claims)
    for token, expected in zip(passes, claims, strict=True):
        got = keys.verify(token, issuer="waitroom", event_id="evt", fan_id=expected.sub, now=now)
        assert got == expected
