"""Regions handed over by file descriptor (the co-located door's memfds): only files that
can never shrink are mapped, the registry owns the descriptor either way, and the region
is one of the registry's like any keyed one."""

from __future__ import annotations

import os
import sys

import pytest
from colocated_raw import sealed_memfd

from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.errors import AlreadyExistsError, ValidationError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="memfd is Linux-only")


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_sealed_memfd_is_a_region_read_and_written_through_views() -> None:
    registry = SharedMemoryRegistry()
    fd, mapping = sealed_memfd(8192)
    status = registry.register_descriptor("in", fd, 8192, owner="k1", label="pid1")
    assert (status.name, status.key, status.offset, status.byte_size) == ("in", "fd:pid1", 0,
                                                                          8192)
    mapping[100:104] = b"abcd"
    assert bytes(registry.view("in", 100, 4, owner="k1")) == b"abcd"
    registry.write("in", 0, b"xyz", owner="k1")
    assert mapping[:3] == b"xyz"
    with pytest.raises(ValidationError, match="not registered"):
        registry.view("in", 0, 4, owner="k2")
    registry.close()
    assert not is_open(fd)  # the registry owned it


def test_refusals_close_the_descriptor_they_were_handed() -> None:
    registry = SharedMemoryRegistry()
    unsealed, _ = sealed_memfd(4096, seal=False)
    with pytest.raises(ValidationError, match="sealed against shrinking"):
        registry.register_descriptor("a", unsealed, 4096)
    assert not is_open(unsealed)
    fd, _ = sealed_memfd(4096)
    with pytest.raises(ValidationError, match="runs past the end"):
        registry.register_descriptor("b", fd, 8192)
    assert not is_open(fd)
    first, _ = sealed_memfd(4096)
    registry.register_descriptor("c", first, 4096)
    second, _ = sealed_memfd(4096)
    with pytest.raises(AlreadyExistsError):
        registry.register_descriptor("c", second, 4096)
    assert not is_open(second) and is_open(first)
    with open(os.devnull, "rb") as f:  # not a regular file
        dup = os.dup(f.fileno())
    with pytest.raises(ValidationError, match="not a regular file"):
        registry.register_descriptor("d", dup, 1)
    assert not is_open(dup)
    registry.close()
