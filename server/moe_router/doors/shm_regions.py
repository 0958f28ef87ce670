"""System shared-memory regions with Triton's semantics, for every door that carries
tensors in ``/dev/shm``.

A caller creates a POSIX shared-memory object (``shm_open``: the file ``/dev/shm/<key>``),
registers a region of it under a name it picks (key, offset, byte size), then names the
region in its requests instead of sending the bytes: the server reads the input where
it lies (a view of the mapped file, no copy) and writes each answer into the output
region the request names.

The registry knows nothing of gRPC or of any protocol. The Open Inference Protocol door
(``oip_service``) calls it from its SystemSharedMemoryRegister / Status / Unregister
handlers and from ModelInfer; the co-located door of the performance issue takes the
same object, so a region registered through either door is one region. Callers are
told apart by ``owner`` (the API key id; "" when the server has no keys): a caller
never sees, reads, writes or unregisters another caller's regions, and names are unique
per owner (Triton has one namespace; with one caller the two agree).

Triton's rules, kept:

- a name already registered is refused (:class:`AlreadyExistsError`, ALREADY_EXISTS);
- a region must lie inside its object when it is registered;
- a reference's offset counts from the start of the region, not of the object;
- Status of an unknown name is NOT_FOUND; Unregister of an unknown name does nothing, and
  an empty name unregisters every region of the caller;
- a region unregistered while a call still reads it stays mapped until that call ends
  (the views keep the mapping alive; it is unmapped when the last one goes).

Safety. Every refusal below is a ``ValidationError`` (INVALID_ARGUMENT) and no byte
outside a region is ever read or written:

- a key names a file directly in the registry's root (``/dev/shm``): one path component
  after the leading slashes, never ``..``; the file is opened with ``O_NOFOLLOW`` (no
  symlink) and must be a regular file owned by the server's own user. Touching a mapped
  page past the end of a file raises SIGBUS, which no Python code can catch; requiring
  our own user means only a process that could kill the server anyway can shrink the
  file under it.
- each reference is checked before a view is handed out: a region registered by this
  owner, ``offset + byte_size`` inside it, and the object still as long as the region
  needs (``fstat`` on the descriptor kept since registration): a shrunk object answers
  "resized" instead of a view of pages that are gone.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from moe_router.errors import AlreadyExistsError, NotFoundError, OverloadedError, ValidationError

__all__ = ["DEFAULT_ROOT", "MAX_REGIONS", "RegionStatus", "SharedMemoryRegistry"]

DEFAULT_ROOT = Path("/dev/shm")
MAX_REGIONS = 1024  # registered at once, all owners: each holds a descriptor and a mapping
_MAX_KEY = 255  # NAME_MAX


@dataclass(frozen=True)
class RegionStatus:
    """A registered region as Status reports it: bytes [offset, offset + byte_size) of
    the object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class _Region:
    status: RegionStatus
    owner: str
    fd: int
    mapping: mmap.mmap  # bytes [0, offset + byte_size) of the object
    sealed: bool = False  # sealed against shrinking (checked at registration): no fstat


class SharedMemoryRegistry:
    """Regions registered by callers, each mapped once, read and written through views.

    Thread-safe: the gRPC event loop registers and reads; a co-located door's threads
    may do the same concurrently. ``owner_uid`` is the user a region's file must belong
    to (the server's own by default; None accepts any, for tests only).
    """

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        *,
        owner_uid: int | None = os.geteuid(),
        max_regions: int = MAX_REGIONS,
    ) -> None:
        self.root = Path(root)
        self._owner_uid = owner_uid
        self._max_regions = max_regions
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], _Region] = {}
        self._generation = 0

    # ------------------------------------------------------------------ register
    def register(
        self, name: str, key: str, offset: int, byte_size: int, *, owner: str = ""
    ) -> RegionStatus:
        """Map bytes [offset, offset + byte_size) of the object ``key`` under ``name``."""
        _check_span(name, offset, byte_size)
        path = self._path(key)
        with self._lock:
            self._check_free(name, owner)
            fd = self._open(path, key)
            return self._add(name, key, fd, offset, byte_size, owner)

    def register_descriptor(
        self, name: str, fd: int, byte_size: int, *, owner: str = "", label: str = ""
    ) -> RegionStatus:
        """Map bytes [0, byte_size) of an open file handed over by its descriptor (the
        co-located door receives it with SCM_RIGHTS) under ``name``; the registry owns
        ``fd`` from here on, and closes it on refusal too.

        The file must be one that can never shrink: a memfd sealed with
        ``F_SEAL_SHRINK`` (and owned by the server's user, as for keys), so no page of
        the mapping can vanish under a reader. Nothing of it is in the root: the region
        is gone when its last descriptor and mapping are. Status shows the key
        ``fd:<label>``.
        """
        try:
            _check_span(name, 0, byte_size)
            refusal = self._refusal(os.fstat(fd))
            if refusal is None and not _sealed_against_shrinking(fd):
                refusal = ("not sealed against shrinking; create it with "
                           "memfd_create(MFD_ALLOW_SEALING) and add F_SEAL_SHRINK")
            if refusal is not None:
                raise ValidationError(f"shared memory region '{name}': the descriptor is "
                                      f"{refusal}")
            self._lock.acquire()
        except BaseException:
            _close_quietly(fd)
            raise
        try:
            try:
                self._check_free(name, owner)
            except BaseException:
                _close_quietly(fd)
                raise
            return self._add(name, f"fd:{label}", fd, 0, byte_size, owner,  # closes on refusal
                             sealed=True)
        finally:
            self._lock.release()

    def _check_free(self, name: str, owner: str) -> None:
        """Refuse a taken name or a full registry (called under the lock)."""
        if (owner, name) in self._regions:
            raise AlreadyExistsError(
                f"shared memory region '{name}' is already registered; unregister it "
                "first or pick another name"
            )
        if len(self._regions) >= self._max_regions:
            raise OverloadedError(
                f"{len(self._regions)} shared memory regions are registered, the most "
                "this server keeps; unregister some first",
                reason="TOO_MANY_REGIONS",
            )

    def _add(
        self, name: str, key: str, fd: int, offset: int, byte_size: int, owner: str,
        sealed: bool = False,
    ) -> RegionStatus:
        """Map the region and keep it (under the lock); closes ``fd`` on refusal."""
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise ValidationError(
                    f"shared memory region '{name}': offset {offset} + byte_size "
                    f"{byte_size} runs past the end of '{key}' ({size} bytes)"
                )
            mapping = mmap.mmap(fd, offset + byte_size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        status = RegionStatus(name, key, offset, byte_size)
        self._regions[(owner, name)] = _Region(status, owner, fd, mapping, sealed)
        self._generation += 1
        return status

    def _path(self, key: str) -> Path:
        """The file of ``key`` in the root, refusing anything that would leave it."""
        bare = key.lstrip("/")
        if (
            not bare
            or "/" in bare
            or "\0" in bare
            or bare in (".", "..")
            or len(bare) > _MAX_KEY
        ):
            raise ValidationError(
                f"shared memory key {key[:300]!r}: expected one name of up to {_MAX_KEY} "
                f"characters, as shm_open takes it ('/my_region' for {self.root}/my_region)"
            )
        return self.root / bare

    def _open(self, path: Path, key: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                why = "no such shared memory object; create it first (shm_open)"
            elif exc.errno == errno.ELOOP:
                why = "it is a symbolic link; register the object itself"
            else:
                why = exc.strerror or "cannot open it"
            raise ValidationError(f"shared memory key '{key}' ({path}): {why}") from exc
        refusal = self._refusal(os.fstat(fd))
        if refusal is not None:
            os.close(fd)
            raise ValidationError(f"shared memory key '{key}' ({path}): {refusal}")
        return fd

    def _refusal(self, info: os.stat_result) -> str | None:
        """Why a region's file must not be mapped (not regular, another user's), or None."""
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if self._owner_uid is not None and info.st_uid != self._owner_uid:
            return f"owned by uid {info.st_uid}, not by the server's user ({self._owner_uid})"
        return None

    # ------------------------------------------------------------------ status, unregister
    def status(self, name: str = "", *, owner: str = "") -> list[RegionStatus]:
        """Every region of ``owner`` by name, or the one named (NotFoundError if unknown)."""
        with self._lock:
            if name:
                region = self._regions.get((owner, name))
                if region is None:
                    raise NotFoundError(f"no shared memory region '{name}' is registered")
                return [region.status]
            return sorted(
                (r.status for (o, _), r in self._regions.items() if o == owner),
                key=lambda s: s.name,
            )

    def unregister(self, name: str = "", *, owner: str = "") -> list[str]:
        """Unregister the region named (nothing when unknown) or, with "", all of
        ``owner``'s; returns the names removed."""
        with self._lock:
            keys = (
                [(owner, name)] if name else [k for k in self._regions if k[0] == owner]
            )
            removed = [self._regions.pop(k) for k in keys if k in self._regions]
            self._generation += 1
        for region in removed:
            _release(region)
        return sorted(r.status.name for r in removed)

    def close(self) -> None:
        """Unregister every region of every owner (server shutdown)."""
        with self._lock:
            removed = list(self._regions.values())
            self._regions.clear()
            self._generation += 1
        for region in removed:
            _release(region)

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)

    # ------------------------------------------------------------------ data
    @property
    def generation(self) -> int:
        """A number that changes whenever a region is registered or unregistered: a view
        that :meth:`checked_view` called lasting stays valid while it is the same."""
        return self._generation

    def view(self, name: str, offset: int, byte_size: int, *, owner: str = "") -> memoryview:
        """A writable view of bytes [offset, offset + byte_size) of region ``name``
        (offset from the region's start); the mapping stays alive while the view does."""
        return self.checked_view(name, offset, byte_size, owner=owner)[0]

    def checked_view(
        self, name: str, offset: int, byte_size: int, *, owner: str = ""
    ) -> tuple[memoryview, bool]:
        """:meth:`view`, and whether the view lasts: the region is a sealed memfd, which
        can never shrink, so the view may be used again without these checks for as
        long as :attr:`generation` is the same. A file by key may shrink any time and is
        checked on every view.

        Checked and made under the lock: Unregister removes a region under it before
        closing the descriptor, so the fstat below never sees a closed (or reused) one.
        """
        with self._lock:
            region = self._regions.get((owner, name))
            if region is None:
                raise ValidationError(
                    f"shared memory region '{name}' is not registered; register it with "
                    "SystemSharedMemoryRegister first"
                )
            status = region.status
            if offset < 0 or byte_size < 0 or offset + byte_size > status.byte_size:
                raise ValidationError(
                    f"shared memory region '{name}': bytes [{offset}, {offset + byte_size}) "
                    f"are outside the region ({status.byte_size} bytes)"
                )
            # A sealed memfd can never shrink: only a file by key is checked on every view
            # (2 us a call; a ROUTE takes three views).
            size = status.offset + status.byte_size if region.sealed else os.fstat(
                region.fd).st_size
            if size < status.offset + status.byte_size:
                raise ValidationError(
                    f"shared memory region '{name}': '{status.key}' was resized to {size} "
                    f"bytes after it was registered ({status.offset} + {status.byte_size} "
                    "needed); unregister it and register it again"
                )
            start = status.offset + offset
            return memoryview(region.mapping)[start : start + byte_size], region.sealed

    def write(self, name: str, offset: int, data: bytes | memoryview, *, owner: str = "") -> int:
        """Copy ``data`` into region ``name`` at ``offset``; returns the bytes written."""
        payload = memoryview(data).cast("B")
        self.view(name, offset, payload.nbytes, owner=owner)[:] = payload
        return payload.nbytes


def _release(region: _Region) -> None:
    """Close a region's descriptor and mapping (the mapping lives on while views do)."""
    try:
        os.close(region.fd)
    except OSError:
        pass
    try:
        region.mapping.close()
    except BufferError:  # a call still holds a view: unmapped when the last view goes
        pass


def _check_span(name: str, offset: int, byte_size: int) -> None:
    if not name:
        raise ValidationError("shared memory region name: required, a non-empty string")
    if offset < 0 or byte_size <= 0:
        raise ValidationError(
            f"shared memory region '{name}': offset {offset} and byte_size {byte_size}; "
            "expected offset >= 0 and byte_size > 0"
        )


def _sealed_against_shrinking(fd: int) -> bool:
    """Whether the file of ``fd`` carries F_SEAL_SHRINK (False where seals do not exist)."""
    seals = getattr(fcntl, "F_GET_SEALS", None)
    if seals is None:
        return False
    try:
        return bool(fcntl.fcntl(fd, seals) & fcntl.F_SEAL_SHRINK)
    except OSError:  # not a memfd (or a file system without seals)
        return False


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
