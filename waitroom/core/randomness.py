"""Unguessable random ids at well under a microsecond each: the kernel's CSPRNG, read in blocks.

``secrets.token_hex`` makes one ``getrandom()`` system call per id, about 9 us of every
anonymous join (the visitor id) on the 2-core box, as much as the join's whole Redis round trip
costs in Python. :func:`token_hex` reads the same source (``os.urandom``) 4 KiB at a time and
hands the bytes out in slices, one system call per 256 ids of 16 bytes. Each byte is handed out
once (under a lock, for callers on threads), and a forked child drops the bytes it inherited,
so a parent and its child never hand out the same id.
"""

from __future__ import annotations

import base64
import os
import threading

#: Bytes read from the kernel at a time.
BLOCK = 4096


class _Pool:
    """Random bytes read ahead, handed out once each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0

    def take(self, nbytes: int) -> bytes:
        with self._lock:
            end = self._offset + nbytes
            if end > len(self._buffer):
                self._buffer = os.urandom(max(BLOCK, nbytes))
                self._offset, end = 0, nbytes
            chunk = self._buffer[self._offset : end]
            self._offset = end
            return chunk

    def drop(self) -> None:
        # In a forked child: the lock may have been held by another thread of the parent.
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.drop)


def token_bytes(nbytes: int) -> bytes:
    """``nbytes`` random bytes from the kernel's CSPRNG (as :func:`secrets.token_bytes`)."""
    if nbytes < 1:
        raise ValueError("nbytes must be at least 1")
    return _pool.take(nbytes)


def token_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as ``2 * nbytes`` hex digits (as :func:`secrets.token_hex`)."""
    return token_bytes(nbytes).hex()


def token_urlsafe(nbytes: int) -> str:
    """``nbytes`` random bytes as unpadded URL-safe base64 (as :func:`secrets.token_urlsafe`)
    that never begins with ``-``.

    Pass ids and ticket codes are typed into the CLI (``waitroom pass revoke JTI``,
    ``waitroom checkin CODE``), where a first ``-`` makes them read as an option; one id in
    64 began with one. Such a draw is drawn again: the first character is then uniform over
    the other 63, which costs under 0.03 of a bit of the id's randomness.
    """
    while True:
        token = base64.urlsafe_b64encode(token_bytes(nbytes)).rstrip(b"=").decode()
        if not token.startswith("-"):
            return token
