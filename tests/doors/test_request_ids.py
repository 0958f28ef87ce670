"""Request ids made for calls that bring none: 16 hex digits, unique within a process
and across a fork (the child draws its own prefix)."""

from __future__ import annotations

import os
import string

from moe_router.doors.rpc_errors import new_request_id


def test_ids_are_16_hex_digits_and_unique() -> None:
    ids = [new_request_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and set(i) <= set(string.hexdigits.lower()) for i in ids)


def test_a_forked_child_draws_another_prefix() -> None:
    parent = new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child[:8] != parent[:8]
