"""Identities: visitor tokens we sign, host-site user JWTs we verify, and the visitor secret."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from waitroom.core.errors import SettingsError, Unauthorized
from waitroom.core.settings import Settings
from waitroom.line.identity import (
    USER_LEEWAY_S,
    VISITOR_TTL_S,
    Identities,
    load_user_key,
    load_visitor_secret,
)

NOW = 1_800_000_000.0
SECRET = b"s" * 64


def visitors() -> Identities:
    return Identities(visitor_secret=SECRET)


def code_of(identities: Identities, token: str, now: float = NOW) -> str:
    with pytest.raises(Unauthorized) as caught:
        identities.verify(token, now)
    return caught.value.code


def test_a_visitor_token_carries_the_documented_claims() -> None:
    identity = visitors().issue_visitor(NOW)
    header = jwt.get_unverified_header(identity.token)
    claims = jwt.decode(
        identity.token,
        SECRET,
        algorithms=["HS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert header["alg"] == "HS256"
    assert claims == {
        "sub": identity.fan_id,
        "iat": int(NOW),
        "exp": int(NOW) + VISITOR_TTL_S,
        "typ": "visitor",
    }
    assert identity.fan_id.startswith("v_") and len(identity.fan_id) == 34
    assert visitors().verify(identity.token, NOW + 60).fan_id == identity.fan_id


def test_every_visitor_is_new() -> None:
    assert visitors().issue_visitor(NOW).fan_id != visitors().issue_visitor(NOW).fan_id


def test_an_expired_visitor_token_is_refused_as_expired() -> None:
    token = visitors().issue_visitor(NOW).token
    assert code_of(visitors(), token, NOW + VISITOR_TTL_S) == "identity_expired"


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode(
            {"sub": "v_" + "0" * 32, "exp": NOW + 60, "typ": "visitor"},
            b"x" * 64,
            algorithm="HS256",
        ),
        jwt.encode(
            {"sub": "v_" + "0" * 32, "exp": NOW + 60, "typ": "visitor"}, SECRET, algorithm="HS512"
        ),
        jwt.encode(
            {"sub": "v_" + "0" * 32, "exp": NOW + 60, "typ": "visitor"}, "", algorithm="none"
        ),
        jwt.encode({"sub": "v_" + "0" * 32, "exp": NOW + 60}, SECRET, algorithm="HS256"),
        jwt.encode(
            {"sub": "u:admin", "exp": NOW + 60, "typ": "visitor"}, SECRET, algorithm="HS256"
        ),
        jwt.encode({"sub": "v_" + "0" * 32, "typ": "visitor"}, SECRET, algorithm="HS256"),
        jwt.encode(
            {"sub": "v_" + "0" * 32, "exp": "soon", "typ": "visitor"}, SECRET, algorithm="HS256"
        ),
        "not.a.jwt",
        "",
        "x" * 5000,
    ],
    ids=[
        "forged",
        "other-algorithm",
        "alg-none",
        "no-typ",
        "bad-sub",
        "no-exp",
        "exp-not-a-number",
        "garbage",
        "empty",
        "huge",
    ],
)
def test_bad_visitor_tokens_are_refused_as_invalid(token: str) -> None:
    assert code_of(visitors(), token) == "identity_invalid"


# --- host-site users ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_key() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public_pem


def users(public_pem: str) -> Identities:
    return Identities(
        user_key=load_user_key(public_pem, "EdDSA"),
        user_algorithm="EdDSA",
        user_issuer="https://tickets.example",
        user_audience="waitroom",
    )


def user_token(private: Ed25519PrivateKey, **claims: Any) -> str:
    payload = {
        "sub": "alice",
        "iss": "https://tickets.example",
        "aud": "waitroom",
        "exp": NOW + 300,
    }
    payload.update(claims)
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None}, private, algorithm="EdDSA"
    )


def test_a_host_site_token_makes_a_user_fan(host_key: tuple[Ed25519PrivateKey, str]) -> None:
    private, public_pem = host_key
    identity = users(public_pem).verify(user_token(private), NOW)
    assert (identity.fan_id, identity.kind) == ("u:alice", "user")
    # A little clock skew between the host site and us is tolerated.
    assert users(public_pem).verify(user_token(private, exp=NOW - 5), NOW).fan_id == "u:alice"


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"iss": "https://evil.example"}, "identity_invalid"),
        ({"aud": "someone-else"}, "identity_invalid"),
        ({"exp": None}, "identity_invalid"),
        ({"sub": None}, "identity_invalid"),
        ({"sub": "x" * 300}, "identity_invalid"),
        ({"nbf": NOW + 3600}, "identity_invalid"),
        ({"exp": NOW - USER_LEEWAY_S - 1}, "identity_expired"),
    ],
)
def test_host_site_tokens_must_match_every_rule(
    host_key: tuple[Ed25519PrivateKey, str], claims: dict[str, Any], code: str
) -> None:
    private, public_pem = host_key
    assert code_of(users(public_pem), user_token(private, **claims)) == code


def test_the_algorithm_is_pinned_for_host_site_tokens(
    host_key: tuple[Ed25519PrivateKey, str],
) -> None:
    _, public_pem = host_key
    claims = {
        "sub": "mallory",
        "iss": "https://tickets.example",
        "aud": "waitroom",
        "exp": NOW + 60,
    }
    # The classic confusion: HS256 "signed" with the public key as the HMAC secret.
    confused = jwt.api_jws.PyJWS()
    confused._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
    forged = confused.encode(msgspec.json.encode(claims), public_pem.encode(), algorithm="HS256")
    assert code_of(users(public_pem), forged) == "identity_invalid"
    unsigned = jwt.encode(claims, "", algorithm="none")
    assert code_of(users(public_pem), unsigned) == "identity_invalid"
    # Nor is a visitor token of ours a user token.
    assert code_of(users(public_pem), visitors().issue_visitor(NOW).token) == "identity_invalid"


def test_the_public_key_is_read_from_pem_text_or_a_file(
    host_key: tuple[Ed25519PrivateKey, str], tmp_path: Path
) -> None:
    private, public_pem = host_key
    path = tmp_path / "host.pem"
    path.write_text(public_pem)
    from_file = Identities(user_key=load_user_key(str(path), "EdDSA"), user_algorithm="EdDSA")
    assert from_file.verify(user_token(private, iss=None, aud=None), NOW).fan_id == "u:alice"
    assert not from_file.anonymous
    with pytest.raises(SettingsError):
        load_user_key(str(tmp_path / "missing.pem"), "EdDSA")
    with pytest.raises(SettingsError):
        load_user_key("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "EdDSA")


# --- the visitor secret -------------------------------------------------------------------


def test_the_visitor_secret_is_generated_once_private_and_shared(
    settings: Settings, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run" / "nested"
    here = msgspec.structs.replace(settings, run_dir=str(run_dir), visitor_secret_file=None)
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def start_a_worker() -> None:
        barrier.wait()
        results.append(load_visitor_secret(here))

    threads = [threading.Thread(target=start_a_worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1 and len(results[0]) == 64
    secret_file = run_dir / "visitor-secret"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert [p.name for p in run_dir.iterdir()] == ["visitor-secret"]  # no candidates left
    assert load_visitor_secret(here) == results[0]


def test_a_configured_visitor_secret_file_is_used_and_checked(
    settings: Settings, tmp_path: Path
) -> None:
    good = tmp_path / "good"
    good.write_text("k" * 40 + "\n")
    configured = msgspec.structs.replace(settings, visitor_secret_file=str(good))
    assert load_visitor_secret(configured) == b"k" * 40
    short = tmp_path / "short"
    short.write_text("tiny")
    with pytest.raises(SettingsError, match="at least 32"):
        load_visitor_secret(msgspec.structs.replace(settings, visitor_secret_file=str(short)))
    with pytest.raises(SettingsError, match="cannot read"):
        load_visitor_secret(
            msgspec.structs.replace(settings, visitor_secret_file=str(tmp_path / "missing"))
        )
