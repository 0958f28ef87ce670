"""The shared-memory region registry on real /dev/shm objects: Triton's semantics, and
every unsafe reference refused before a byte outside a region is touched."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from moe_router.doors.shm_regions import DEFAULT_ROOT, SharedMemoryRegistry
from moe_router.errors import AlreadyExistsError, NotFoundError, OverloadedError, ValidationError

pytestmark = pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="needs /dev/shm")


@pytest.fixture
def shm_object() -> Iterator[Callable[[int], str]]:
    """Make /dev/shm objects of a given size (filled with 0, 1, 2, ... mod 256); returns
    the key of each, removes them afterwards."""
    made: list[Path] = []

    def make(size: int) -> str:
        key = f"/moe-router-test-{uuid.uuid4().hex[:12]}"
        path = DEFAULT_ROOT / key[1:]
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.write(fd, bytes(i % 256 for i in range(size)))
        finally:
            os.close(fd)
        made.append(path)
        return key

    yield make
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    regions = SharedMemoryRegistry()
    yield regions
    regions.close()


def test_a_view_reads_the_callers_bytes_in_place(registry, shm_object):
    key = shm_object(64)
    status = registry.register("in", key, 16, 32)
    assert (status.name, status.key, status.offset, status.byte_size) == ("in", key, 16, 32)
    view = registry.view("in", 4, 8)  # offset counts from the region's start
    assert bytes(view) == bytes(range(20, 28))
    with open(DEFAULT_ROOT / key[1:], "r+b") as f:  # the caller writes after registering
        f.seek(20)
        f.write(b"\xff" * 8)
    assert bytes(view) == b"\xff" * 8  # same pages: no copy was made


def test_writes_land_in_the_object(registry, shm_object):
    key = shm_object(32)
    registry.register("out", key, 8, 16)
    values = np.arange(4, dtype=np.int32)
    assert registry.write("out", 0, values.tobytes()) == 16
    data = (DEFAULT_ROOT / key[1:]).read_bytes()
    np.testing.assert_array_equal(np.frombuffer(data[8:24], dtype=np.int32), values)
    assert data[:8] == bytes(range(8)) and data[24:] == bytes(range(24, 32))


def test_a_taken_name_is_already_exists_but_another_owner_has_its_own(registry, shm_object):
    key = shm_object(16)
    registry.register("in", key, 0, 16)
    with pytest.raises(AlreadyExistsError, match="'in' is already registered"):
        registry.register("in", key, 0, 8)
    registry.register("in", key, 0, 8, owner="key-b")
    assert [s.byte_size for s in registry.status(owner="key-b")] == [8]
    assert [s.byte_size for s in registry.status()] == [16]


def test_one_owner_never_sees_nor_removes_anothers_region(registry, shm_object):
    registry.register("mine", shm_object(16), 0, 16, owner="a")
    with pytest.raises(ValidationError, match="not registered"):
        registry.view("mine", 0, 4, owner="b")
    with pytest.raises(NotFoundError):
        registry.status("mine", owner="b")
    assert registry.status(owner="b") == []
    assert registry.unregister(owner="b") == []
    assert registry.unregister("mine", owner="b") == []
    assert [s.name for s in registry.status(owner="a")] == ["mine"]


def test_a_region_past_the_end_of_its_object_is_refused(registry, shm_object):
    key = shm_object(16)
    with pytest.raises(ValidationError, match=r"offset 8 \+ byte_size 9 runs past the end"):
        registry.register("in", key, 8, 9)
    with pytest.raises(ValidationError, match="byte_size > 0"):
        registry.register("in", key, 0, 0)
    assert len(registry) == 0


@pytest.mark.parametrize(("offset", "size"), [(0, 17), (16, 1), (-1, 2), (10, 7)])
def test_a_reference_outside_the_region_is_refused(registry, shm_object, offset, size):
    registry.register("in", shm_object(64), 8, 16)
    with pytest.raises(ValidationError, match="outside the region"):
        registry.view("in", offset, size)


def test_an_unregistered_region_is_refused_and_unregister_is_idempotent(registry, shm_object):
    registry.register("a", shm_object(8), 0, 8)
    registry.register("b", shm_object(8), 0, 8)
    assert registry.unregister("nobody") == []
    assert registry.unregister("a") == ["a"]
    with pytest.raises(ValidationError, match="'a' is not registered"):
        registry.view("a", 0, 1)
    assert registry.unregister() == ["b"]  # empty name: every region of the caller
    assert len(registry) == 0


def test_a_shrunk_object_answers_resized_instead_of_sigbus(registry, shm_object):
    key = shm_object(8192)
    registry.register("in", key, 4096, 4096)
    os.truncate(DEFAULT_ROOT / key[1:], 4096)  # the caller shrinks it after registering
    with pytest.raises(ValidationError, match="was resized to 4096 bytes"):
        registry.view("in", 0, 16)
    os.truncate(DEFAULT_ROOT / key[1:], 8192)  # grown back: usable again
    assert bytes(registry.view("in", 0, 4)) == b"\0\0\0\0"


def test_status_by_name_and_of_an_unknown_name(registry, shm_object):
    registry.register("z", shm_object(8), 0, 8)
    registry.register("a", shm_object(8), 2, 4)
    assert [s.name for s in registry.status()] == ["a", "z"]
    assert registry.status("a")[0].offset == 2
    with pytest.raises(NotFoundError, match="no shared memory region 'q'"):
        registry.status("q")


@pytest.mark.parametrize(
    "key", ["", "/", "../etc/passwd", "/a/b", "/..", "/x\0y", "/" + "k" * 256]
)
def test_keys_that_would_leave_dev_shm_are_refused(registry, key):
    with pytest.raises(ValidationError, match="shared memory key"):
        registry.register("in", key, 0, 1)


def test_a_missing_object_names_what_to_do(registry):
    with pytest.raises(ValidationError, match="no such shared memory object"):
        registry.register("in", f"/moe-router-absent-{uuid.uuid4().hex}", 0, 1)


def test_symlinks_and_other_users_files_are_refused(shm_object, tmp_path):
    key = shm_object(16)
    link = DEFAULT_ROOT / f"moe-router-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(DEFAULT_ROOT / key[1:])
    try:
        with pytest.raises(ValidationError, match="symbolic link"):
            SharedMemoryRegistry().register("in", "/" + link.name, 0, 1)
    finally:
        link.unlink()
    stranger = SharedMemoryRegistry(owner_uid=os.geteuid() + 1)
    with pytest.raises(ValidationError, match="owned by uid"):
        stranger.register("in", key, 0, 1)
    assert len(stranger) == 0


def test_a_region_unregistered_mid_call_stays_readable_until_the_view_goes(
    registry, shm_object
):
    registry.register("in", shm_object(16), 0, 16)
    view = registry.view("in", 0, 16)
    registry.unregister("in")
    assert bytes(view[:4]) == bytes(range(4))  # the in-flight call still reads its bytes
    view.release()


def test_the_number_of_regions_is_bounded(shm_object):
    regions = SharedMemoryRegistry(max_regions=2)
    key = shm_object(8)
    regions.register("a", key, 0, 8)
    regions.register("b", key, 0, 8)
    with pytest.raises(OverloadedError, match="unregister some first"):
        regions.register("c", key, 0, 8)
    regions.close()
    assert len(regions) == 0
