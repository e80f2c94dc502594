"""Running outside development: weak admin tokens refused, generated secrets refused, secure
cookies and private metrics by default (settings, the console script, and the secrets' loaders)."""

from __future__ import annotations

import secrets
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from admission.passes import PassKeys, private_pem
from tests.harness import run_cli
from waitroom.core.errors import SettingsError
from waitroom.core.settings import Settings, check_admin_tokens, load_settings
from waitroom.line.identity import Identities, load_visitor_secret

STRONG = secrets.token_hex(24)


def test_the_environment_sets_the_defaults_of_cookies_and_metrics() -> None:
    development = load_settings({})
    assert (development.env, development.secure_cookies, development.public_metrics) == (
        "development",
        False,
        True,
    )
    production = load_settings({"WAITROOM_ENV": "production"})
    assert (production.secure_cookies, production.public_metrics) == (True, False)
    overridden = load_settings(
        {
            "WAITROOM_ENV": "production",
            "WAITROOM_COOKIE_SECURE": "false",
            "WAITROOM_METRICS_PUBLIC": "true",
        }
    )
    assert (overridden.secure_cookies, overridden.public_metrics) == (False, True)
    with pytest.raises(SettingsError, match=r"^WAITROOM_ENV: expected one of development, prod"):
        load_settings({"WAITROOM_ENV": "staging"})


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("short-token", "has 11 characters, fewer than 32"),
        ("demo-admin-token", "is a published example value"),
        ("a" * 40, "fewer than 8 distinct characters"),
        ("replace-me-with-a-long-random-token", "is a published example value"),
    ],
)
def test_a_weak_admin_token_is_refused_on_a_public_listener(token: str, problem: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({"WAITROOM_ADMIN_TOKEN": token, "WAITROOM_HOST": "0.0.0.0"})
    message = str(refused.value)
    assert message.startswith("WAITROOM_ADMIN_TOKEN: the admin token ")
    assert problem in message and "0.0.0.0" in message
    assert "\n" not in message and token not in message.replace("admin token", "")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_a_weak_token_is_fine_for_a_development_server_on_loopback(host: str) -> None:
    settings = load_settings({"WAITROOM_ADMIN_TOKEN": "dev", "WAITROOM_HOST": host})
    assert settings.admin_token == "dev"


def test_production_refuses_a_weak_token_even_on_loopback() -> None:
    with pytest.raises(SettingsError, match="refused in production"):
        load_settings({"WAITROOM_ADMIN_TOKEN": "dev", "WAITROOM_ENV": "production"})
    load_settings({"WAITROOM_ADMIN_TOKEN": STRONG, "WAITROOM_ENV": "production"})


def test_named_operators_are_checked_too_and_must_be_distinct() -> None:
    with pytest.raises(SettingsError, match=r"^WAITROOM_ADMIN_TOKENS: operator 'bob'"):
        load_settings(
            {"WAITROOM_ADMIN_TOKENS": f"alice:{STRONG},bob:weak", "WAITROOM_HOST": "0.0.0.0"}
        )
    with pytest.raises(SettingsError, match="operator 'alice' is named twice"):
        load_settings({"WAITROOM_ADMIN_TOKENS": "alice:x,alice:y"})
    with pytest.raises(SettingsError, match="operator 'admin' is named twice"):
        load_settings({"WAITROOM_ADMIN_TOKENS": "admin:x", "WAITROOM_ADMIN_TOKEN": "y"})
    with pytest.raises(SettingsError, match="same token as another"):
        load_settings({"WAITROOM_ADMIN_TOKENS": "alice:x,bob:x"})
    with pytest.raises(SettingsError, match=r"^WAITROOM_ADMIN_TOKENS: expected"):
        load_settings({"WAITROOM_ADMIN_TOKENS": "no-separator"})
    named = load_settings({"WAITROOM_ADMIN_TOKENS": f"alice:{STRONG}:with:colons"})
    assert named.admin_tokens == (f"alice:{STRONG}:with:colons",)


def test_serve_refuses_a_weak_token_when_told_to_listen_wider(settings: Settings) -> None:
    weak = msgspec.structs.replace(settings, admin_token="short-token")
    done = run_cli(weak, "serve", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("waitroom: WAITROOM_ADMIN_TOKEN: the admin token has 11")
    assert "short-token" not in lines[0]


def test_the_console_script_refuses_a_weak_token_from_the_environment(settings: Settings) -> None:
    done = run_cli(
        settings,
        "event",
        "list",
        env={"WAITROOM_ADMIN_TOKEN": "demo-admin-token", "WAITROOM_HOST": "0.0.0.0"},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "waitroom: WAITROOM_ADMIN_TOKEN: the admin token is a published example value, refused"
        " on a server listening on 0.0.0.0; use a random one (openssl rand -hex 32), or listen"
        " on 127.0.0.1"
    ]


def test_check_admin_tokens_without_any_token_passes() -> None:
    check_admin_tokens(Settings(host="0.0.0.0"), "0.0.0.0")


def test_production_refuses_generated_secrets_naming_the_variable(tmp_path: Path) -> None:
    production = Settings(env="production", run_dir=str(tmp_path))
    with pytest.raises(SettingsError) as refused:
        PassKeys.from_settings(production)
    assert refused.value.variable == "WAITROOM_PASS_SIGNING_KEY"
    assert "must be set when WAITROOM_ENV=production" in str(refused.value)
    with pytest.raises(SettingsError) as refused:
        load_visitor_secret(production)
    assert refused.value.variable == "WAITROOM_VISITOR_SECRET_FILE"
    # Nothing was generated on the way.
    assert list(tmp_path.iterdir()) == []


def test_production_runs_on_configured_secrets(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(private_pem(Ed25519PrivateKey.generate()))
    secret = tmp_path / "visitor-secret"
    secret.write_text(secrets.token_hex(32))
    production = Settings(
        env="production",
        run_dir=str(tmp_path / "run"),
        pass_signing_key=str(key),
        visitor_secret_file=str(secret),
    )
    assert PassKeys.from_settings(production).kid
    assert Identities.from_settings(production).anonymous
    assert not (tmp_path / "run").exists()


def test_serve_in_production_without_secrets_stops_with_one_line(settings: Settings) -> None:
    production = msgspec.structs.replace(settings, env="production")
    done = run_cli(production, "serve", "--port", "0", timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "waitroom: WAITROOM_PASS_SIGNING_KEY: must be set when WAITROOM_ENV=production"
        " (generated secrets are not shared between nodes)"
    ]
