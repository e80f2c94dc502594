"""Buffered random ids: distinct, the requested size, and never shared with a forked child."""

from __future__ import annotations

import os

import pytest

from waitroom.core import randomness


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
