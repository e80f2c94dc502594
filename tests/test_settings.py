"""Settings come from WAITROOM_* variables; a bad one stops the process with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from waitroom.core.errors import SettingsError
from waitroom.core.settings import Settings, load_settings


def test_no_variables_give_the_documented_defaults() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.max_body_bytes == 64 * 1024


def test_variables_override_the_defaults() -> None:
    settings = load_settings(
        {
            "WAITROOM_PORT": "9001",
            "WAITROOM_REDIS_URL": "redis://example:6380/2",
            "WAITROOM_LOG_LEVEL": "DEBUG",
            "WAITROOM_PASS_VERIFY_KEYS": "a.pem, b.pem",
            "PATH": "/bin",
        }
    )
    assert settings.port == 9001
    assert settings.redis_url == "redis://example:6380/2"
    assert settings.log_level == "debug"
    assert settings.pass_verify_keys == ("a.pem", "b.pem")


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WAITROOM_PORT", "eighty"),
        ("WAITROOM_PORT", "70000"),
        ("WAITROOM_REDIS_URL", "http://127.0.0.1"),
        ("WAITROOM_DATABASE_URL", "mysql://x/y"),
        ("WAITROOM_LOG_LEVEL", "loud"),
        ("WAITROOM_MAX_BODY_BYTES", "-5"),
        ("WAITROOM_DEPENDENCY_TIMEOUT_S", "0"),
        ("WAITROOM_REDIS_PREFIX", "has space"),
        ("WAITROOM_ADMIN_TOKEN", "   "),
        ("WAITROOM_USER_JWT_ALGORITHM", "none"),
        ("WAITROOM_REDIS_URLL", "redis://x"),
        ("WAITROOM_ALLOWED_ORIGINS", "tickets.example.com"),
        ("WAITROOM_ALLOWED_ORIGINS", "https://tickets.example.com/waiting"),
        ("WAITROOM_ALLOWED_ORIGINS", "https://a.example, *"),
        ("WAITROOM_ALLOWED_ORIGINS", " , "),
        ("WAITROOM_WS_MAX_PER_FAN", "0"),
        ("WAITROOM_WS_MAX_PER_ADDRESS", "none"),
        ("WAITROOM_AGENT_PORT", "0"),
        ("WAITROOM_OWNER_LINE_WEIGHT", "0"),  # 0 on every node would refuse every fan
        ("WAITROOM_OWNER_LINE_WEIGHT", "101"),
        ("WAITROOM_WARM_INVENTORY", "sometimes"),
    ],
)
def test_a_bad_value_names_its_variable_in_one_line(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({name: value})
    assert caught.value.variable == name
    assert str(caught.value).startswith(name + ":")
    assert "\n" not in str(caught.value)


def test_allowed_origins_are_read_in_the_form_browsers_send() -> None:
    settings = load_settings(
        {"WAITROOM_ALLOWED_ORIGINS": "HTTPS://Tickets.Example.com:443/, http://[::1]:8000"}
    )
    assert settings.allowed_origins == ("https://tickets.example.com", "http://[::1]:8000")
    assert load_settings({"WAITROOM_ALLOWED_ORIGINS": "*"}).allowed_origins == ("*",)
    defaults = load_settings({})
    assert (defaults.allowed_origins, defaults.ws_max_per_fan, defaults.ws_max_per_address) == (
        (),
        3,
        200,
    )


def test_pool_minimum_above_maximum_is_refused() -> None:
    with pytest.raises(SettingsError, match="WAITROOM_DB_POOL_MIN"):
        load_settings({"WAITROOM_DB_POOL_MIN": "20", "WAITROOM_DB_POOL_MAX": "10"})


def test_the_console_script_stops_on_a_bad_value_without_a_traceback() -> None:
    exe = Path(sys.executable).with_name("waitroom")
    done = subprocess.run(
        [str(exe), "event", "list"],
        env={"WAITROOM_PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "waitroom: WAITROOM_PORT: expected an integer from 0 to 65535, got 'not-a-port'"
    ]
    assert "Traceback" not in done.stderr


def test_door_staff_tokens_are_named_pairs_held_to_the_admin_tokens_rules() -> None:
    strong = "f3a9c1d27e6b4a08f3a9c1d27e6b4a08"
    settings = load_settings({"WAITROOM_STAFF_TOKENS": f"north:{strong}, south:{strong[::-1]}"})
    assert settings.staff_tokens == (f"north:{strong}", f"south:{strong[::-1]}")
    with pytest.raises(SettingsError, match="WAITROOM_STAFF_TOKENS"):
        load_settings({"WAITROOM_STAFF_TOKENS": "no-name-here"})
    with pytest.raises(SettingsError, match="WAITROOM_STAFF_TOKENS: 'north' is named twice"):
        load_settings({"WAITROOM_STAFF_TOKENS": f"north:{strong},north:{strong[::-1]}"})
    # An operator's token is not also a door's: the record must say which it was.
    with pytest.raises(SettingsError, match="WAITROOM_STAFF_TOKENS"):
        load_settings({"WAITROOM_ADMIN_TOKEN": strong, "WAITROOM_STAFF_TOKENS": f"n:{strong}"})
    # Weak tokens are refused beyond loopback, as operators' are.
    with pytest.raises(SettingsError, match="WAITROOM_STAFF_TOKENS: staff 'north'"):
        load_settings({"WAITROOM_HOST": "0.0.0.0", "WAITROOM_STAFF_TOKENS": "north:short"})
