"""Generated secret files: the one place that creates them (development keys under ``.run/``).

In production every secret comes from a file named in settings (``WAITROOM_ENV=production``
refuses to generate one: :func:`refuse_in_production`); in development the process
generates what is missing under ``WAITROOM_RUN_DIR`` (the queue-pass signing key, the
visitor-token secret), so ``waitroom serve`` runs with no set-up. Every process of a host
must then read the same file, so creation is race-safe: each process writes its candidate to
a private temporary file (mode 0600) and hard-links it into place; a link never replaces an
existing file, so exactly one candidate wins and every process reads that one back.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from waitroom.core.errors import SettingsError
from waitroom.core.settings import Settings

log = logging.getLogger("waitroom.keyfiles")


def refuse_in_production(settings: Settings, variable: str) -> None:
    """``SettingsError`` naming ``variable`` when ``settings`` are production's.

    Called before a secret would be generated: a generated secret exists on one host only,
    so with several nodes each would sign passes or visitors the others refuse, and a
    rebuilt container would forget every fan's identity.
    """
    if settings.production:
        raise SettingsError(
            f"{variable}: must be set when WAITROOM_ENV=production"
            " (generated secrets are not shared between nodes)",
            variable=variable,
        )


def generated(path: Path, make: Callable[[], bytes], *, hint: str) -> bool:
    """Create ``path`` with ``make()`` unless it exists; True when this call created it.

    ``hint`` is logged when a file is generated: what to configure in production instead.
    """
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(make())
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(candidate, path)
        except FileExistsError:
            return False  # another process got there first: its file is the one
    finally:
        candidate.unlink(missing_ok=True)
    log.warning(f"generated {path.name}; {hint}", extra={"path": str(path)})
    return True
