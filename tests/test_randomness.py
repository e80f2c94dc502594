"""Buffered random ids: distinct, the requested size, and never shared with a forked child."""

from __future__ import annotations

import os
import re

import pytest

from admission.passes import new_jti
from waitroom.core import randomness
from workers.payments import TICKET_CODE_BYTES


def test_ids_have_the_requested_size_and_never_repeat_across_many_blocks() -> None:
    ids = [randomness.token_hex(16) for _ in range(20_000)]  # ~80 blocks of 4 KiB
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(randomness.token_bytes(randomness.BLOCK + 1)) == randomness.BLOCK + 1
    with pytest.raises(ValueError):
        randomness.token_bytes(0)


def test_a_forked_child_does_not_hand_out_its_parents_next_bytes() -> None:
    randomness.token_hex(16)  # the parent has bytes read ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, randomness.token_hex(16).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert randomness.token_hex(16) != child


def test_url_safe_ids_never_begin_with_a_dash() -> None:
    # One draw in 64 begins with "-": 20,000 draws all but surely include some to redraw.
    ids = [randomness.token_urlsafe(16) for _ in range(20_000)]
    assert all(len(i) == 22 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    # "-" still appears elsewhere: the alphabet is base64url's, not one without the dash.
    assert any("-" in i for i in ids)
    # As pass ids and ticket codes are made.
    assert not [j for j in (new_jti() for _ in range(5_000)) if j.startswith("-")]
    assert len(randomness.token_urlsafe(TICKET_CODE_BYTES)) == 24
