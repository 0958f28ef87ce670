"""The co-located door's socket path, made safe before the door binds it: a directory
only the server's user can write (or, the default one, enter), and no live server on
the path (a stale socket left by a server that died is removed)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from moe_router.errors import RouterConfigurationError

__all__ = ["prepare_socket_path"]


def prepare_socket_path(path: Path, *, default_directory: bool) -> None:
    """Make ``path`` bindable and safe: its directory the server user's own (created 0700
    when it is the default one), and no live server on it; a stale socket is removed."""
    directory = path.parent
    uid = os.geteuid()
    if default_directory:
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
    try:
        info = directory.lstat()
    except FileNotFoundError as exc:
        raise RouterConfigurationError(
            f"colocated.socket_path: directory {directory} does not exist; create it (owned "
            "by the server's user, not writable by others) or change the path"
        ) from exc
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a directory"
        raise RouterConfigurationError(
            f"colocated.socket_path: {directory} must be a directory of uid {uid} (the "
            f"server's user), found {kind} of uid {info.st_uid}"
        )
    if mode & (0o077 if default_directory else 0o022):
        raise RouterConfigurationError(
            f"colocated.socket_path: {directory} has mode {mode:o}; other users must not "
            f"{'enter' if default_directory else 'write'} it "
            f"(chmod {'700' if default_directory else 'go-w'} {directory})"
        )
    try:
        existing = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise RouterConfigurationError(
            f"colocated.socket_path: {path} exists and is not a socket; remove it or choose "
            "another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by a server that died: nobody answers on it
        return
    finally:
        probe.close()
    raise OSError(
        f"colocated.socket_path: another server listens on {path}; stop it or choose "
        "another path (colocated.socket_path)"
    )
