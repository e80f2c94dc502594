"""Lua scripts as package data: read once, called by SHA, reloaded when Redis forgot them.

Every script of waitroom is a ``.lua`` file in a package's ``lua`` folder (the line's in
``waitroom/line/lua``, admission's in ``admission/lua``, the lease in ``waitroom/core/lua``).
A line ``--!include NAME.lua`` splices in a shared file of the same folder
(``--!include PACKAGE:NAME.lua``, of another package's). Each subsystem
registers its scripts at start-up (``SCRIPT LOAD``), so the hot path only sends ``EVALSHA``;
a Redis that has forgotten one (a restart, a failover) gets it again on the first
``NOSCRIPT`` reply.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

_INCLUDE = re.compile(r"^--!include (?:([a-z_.]+):)?([a-z_]+\.lua)$", re.MULTILINE)


def _source(package: str, name: str) -> str:
    folder = resources.files(package)
    text = folder.joinpath(name).read_text()

    def splice(match: re.Match[str]) -> str:
        # "--!include NAME.lua" is a file of the same folder; "PACKAGE:NAME.lua" one of
        # another package's (a subsystem sharing the line's helpers, for instance).
        source = resources.files(match.group(1)) if match.group(1) else folder
        return source.joinpath(match.group(2)).read_text()

    return _INCLUDE.sub(splice, text)


class Script:
    """One Lua script of ``package``, called by SHA with a reload when Redis does not know it.

    ``client`` may be redis-py's asyncio client or the pipelined
    :class:`~waitroom.core.redis.Multiplexer`: both speak ``evalsha`` and ``script_load``.
    """

    def __init__(self, package: str, name: str) -> None:
        self.name = name
        self.source = _source(package, name)
        # Redis names scripts by SHA1; this is an identifier, not a security measure.
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, client: Any, keys: Sequence[str], args: Sequence[str | int | float | bytes]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


async def load(client: Any, scripts: Iterable[Script]) -> None:
    """Register ``scripts`` with Redis (``SCRIPT LOAD``), checking Redis hashed them alike."""
    for script in scripts:
        sha = await client.script_load(script.source)
        sha = sha.decode() if isinstance(sha, bytes) else sha
        if sha != script.sha:
            raise RuntimeError(f"Redis hashed {script.name} to {sha}, expected {script.sha}")
