"""Every safety rule of the co-located door, against a real server: API keys (owner and
rate-limit identity shared with gRPC), references of every bad kind answered
INVALID_ARGUMENT, descriptors that could shrink refused, other users kept out, the
socket path's rules at start, and the breaker counting both doors."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from colocated_raw import RawDoor, hidden_ref, sealed_memfd
from inprocess_server import InProcessServer, serve_in_process
from server_process import small_routers, write_config

from moe_router.errors import RouterConfigurationError
from moe_router_client import (
    CoLocatedClient,
    InternalError,
    ResourceExhaustedError,
    RouterClient,
    UnauthenticatedError,
    UnavailableError,
)
from moe_router_client import colocated_wire as wire

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the door is Linux-only")

KEY_A, KEY_B = "colocated-key-alpha", "colocated-key-beta"
X = np.random.default_rng(7).standard_normal((4, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A server that requires one of two API keys and hosts a fault_injection router
    whose failures a file switches on."""
    tmp = tmp_path_factory.mktemp("colocated-keys")
    config = write_config(
        tmp / "config.yaml", small_routers(fault_dir=tmp),
        security={"api_key_required": True},
        breaker={"minimum_number_of_calls": 2, "sliding_window_size": 4,
                 "wait_duration_s": 60.0},
        testing={"enable_fault_injection": True},
    )
    env = {"DYNAMIC_MOE_API_KEYS": f"{KEY_A},{KEY_B}"}
    with serve_in_process(config, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    config = write_config(tmp_path_factory.mktemp("colocated-open") / "config.yaml",
                          small_routers())
    with serve_in_process(config) as running:
        yield running


def door_path(server: InProcessServer) -> Path:
    assert server.running.colocated is not None
    return server.running.colocated.socket_path


def invalid(answer: wire.Message | None) -> str:
    """The message of an INVALID_ARGUMENT answer (fails on anything else)."""
    assert isinstance(answer, wire.Error), answer
    assert answer.code == "INVALID_ARGUMENT", answer
    return answer.message


# ---------------------------------------------------------------------- API keys
def test_a_missing_or_wrong_key_is_unauthenticated(keyed: InProcessServer) -> None:
    for key in (None, "not-a-key"):
        with pytest.raises(UnauthenticatedError):
            CoLocatedClient(keyed.target, api_key=key)
    with CoLocatedClient(keyed.target, api_key=KEY_A, timeout=30) as client:
        assert client.transport == "colocated"
        assert client.route("mixtral", X, skip_cache=True).expert_indices.shape == (4, 2)


def test_nothing_but_hello_before_hello(keyed: InProcessServer) -> None:
    door = RawDoor(door_path(keyed), hello=False)
    answer = door.call(wire.Describe(0, "mixtral"))
    assert isinstance(answer, wire.Error) and answer.code == "UNAUTHENTICATED"
    assert door.sock.recv(100) == b""  # and the server hung up
    door.close()


def test_one_identity_per_connection(keyed: InProcessServer) -> None:
    door = RawDoor(door_path(keyed), KEY_A)
    assert "already accepted" in invalid(door.call(wire.Hello(0, KEY_B, os.getpid())))
    assert isinstance(door.call(wire.Describe(0, "mixtral")), wire.Description)
    door.close()


def test_rate_limit_is_one_bucket_per_key_across_both_doors(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_routers()[:1],
                          security={"api_key_required": True, "rate_limit": 60})  # burst 1
    with serve_in_process(config, env={"DYNAMIC_MOE_API_KEYS": f"{KEY_A},{KEY_B}"}) as server, \
            CoLocatedClient(server.target, api_key=KEY_B, timeout=30) as door, \
            RouterClient(server.target, api_key=KEY_B, timeout=30) as grpc_client, \
            CoLocatedClient(server.target, api_key=KEY_A, timeout=30) as other_key:
        door.route("mixtral", X, skip_cache=True)  # the bucket's one token
        with pytest.raises(ResourceExhaustedError) as over_grpc:
            grpc_client.route("mixtral", X, skip_cache=True)
        with pytest.raises(ResourceExhaustedError) as over_door:
            door.route("mixtral", X, skip_cache=True)
        other_key.route("mixtral", X, skip_cache=True)  # another key, another bucket
    assert over_door.value.reason == over_grpc.value.reason == "RATE_LIMITED"
    assert over_door.value.retry_after_s is not None and over_door.value.retry_after_s > 0


def test_a_region_of_another_key_cannot_be_read_or_written(keyed: InProcessServer) -> None:
    alice, bob = RawDoor(door_path(keyed), KEY_A), RawDoor(door_path(keyed), KEY_A)
    mallory = RawDoor(door_path(keyed), KEY_B)
    mapping = alice.register_memfd("alice-in", 4096)
    mapping[: X.nbytes] = X.tobytes()
    alice.register_memfd("alice-out", 4096)
    mallory.register_memfd("mallory-out", 4096)
    ref = hidden_ref(X, "alice-in")
    # alice's regions, by alice's key, from another connection: one owner, allowed
    ok = bob.route("mixtral", [ref], wire.RegionRef("alice-out", 0, 4096), skip_cache=True)
    assert isinstance(ok, wire.Routed), ok
    # the same names with the other key: not registered for it
    assert "not registered" in invalid(
        mallory.route("mixtral", [ref], wire.RegionRef("mallory-out", 0, 4096)))
    assert "not registered" in invalid(mallory.route(
        "mixtral", [hidden_ref(X)], wire.RegionRef("alice-out", 0, 4096)))
    for door in (alice, bob, mallory):
        door.close()


# ---------------------------------------------------------------------- references
@pytest.fixture
def raw(open_server: InProcessServer) -> Iterator[RawDoor]:
    door = RawDoor(door_path(open_server))
    yield door
    door.close()


def test_references_outside_a_region_are_invalid_and_read_nothing(raw: RawDoor) -> None:
    name = f"in-{uuid.uuid4().hex[:6]}"
    raw.register_memfd(name, 4096)
    raw.register_memfd(name + "-out", 4096)
    out = wire.RegionRef(name + "-out", 0, 4096)
    cases = {
        "past the end": hidden_ref(X, name, offset=4096 - 100),
        "huge offset": hidden_ref(X, name, offset=2**62),
        "unregistered": hidden_ref(X, "never-registered"),
        "size not the shape's": hidden_ref(X, name, byte_size=X.nbytes - 4),
    }
    for why, ref in cases.items():
        message = invalid(raw.route("mixtral", [ref], out))
        assert message, why
    assert "outside the region" in invalid(
        raw.route("mixtral", [hidden_ref(X, name)], wire.RegionRef(name + "-out", 4000, 200)))
    small = invalid(raw.route("mixtral", [hidden_ref(X, name)], wire.RegionRef(name + "-out",
                                                                               0, 16)))
    assert "this answer needs" in small
    routed = raw.route("mixtral", [hidden_ref(X, name)], out)  # and a good one still works
    assert isinstance(routed, wire.Routed)


def test_a_descriptor_that_can_shrink_is_refused(raw: RawDoor) -> None:
    fd, _ = sealed_memfd(4096, seal=False)
    try:
        answer = raw.call(wire.Register(0, "unsealed", "", 0, 4096), [fd])
    finally:
        os.close(fd)
    assert "sealed" in invalid(answer)
    answer = raw.call(wire.Register(0, "no-fd", "", 0, 4096))
    assert "file descriptor" in invalid(answer)


def test_a_resized_key_region_is_invalid(raw: RawDoor) -> None:
    key = f"moe-router-colocated-test-{uuid.uuid4().hex[:8]}"
    path = Path("/dev/shm") / key
    with open(path, "wb") as f:
        f.truncate(8192)
    try:
        assert isinstance(raw.call(wire.Register(0, key, "/" + key, 0, 8192)), wire.Ok)
        raw.register_memfd(key + "-out", 4096)
        os.truncate(path, 1024)
        message = invalid(raw.route("mixtral", [hidden_ref(X, key)],
                                    wire.RegionRef(key + "-out", 0, 4096)))
        assert "resized" in message
    finally:
        path.unlink()


def test_a_reference_that_worked_is_checked_again_once_any_region_changes(
    open_server: InProcessServer, raw: RawDoor
) -> None:
    """The door keeps a caller's checked views between calls: unregistering (from any
    connection), registering a smaller region under the name, or shrinking a file by
    key is still INVALID_ARGUMENT on the very next call that names it."""
    name = f"kept-{uuid.uuid4().hex[:6]}"
    mapping = raw.register_memfd(name, 4096)
    mapping[: X.nbytes] = X.tobytes()
    raw.register_memfd(name + "-out", 4096)
    out, ref = wire.RegionRef(name + "-out", 0, 4096), hidden_ref(X, name)
    first = raw.route("mixtral", [ref], out, skip_cache=True)
    assert isinstance(first, wire.Routed), first
    other = RawDoor(door_path(open_server))  # same owner, another connection
    try:
        assert isinstance(other.call(wire.Unregister(other.seq(), name)), wire.Ok)
    finally:
        other.close()
    assert "not registered" in invalid(raw.route("mixtral", [ref], out, skip_cache=True))
    raw.register_memfd(name, 512)  # smaller than the 1024 bytes the ref names
    assert "outside the region" in invalid(raw.route("mixtral", [ref], out, skip_cache=True))
    mapping = raw.register_memfd(name + "-2", 4096)
    mapping[: X.nbytes] = (2 * X).tobytes()
    second = raw.route("mixtral", [hidden_ref(X, name + "-2")], out, skip_cache=True)
    assert isinstance(second, wire.Routed)
    key = f"moe-router-colocated-test-{uuid.uuid4().hex[:8]}"
    path = Path("/dev/shm") / key
    with open(path, "wb") as f:
        f.write(X.tobytes().ljust(8192, b"\0"))
    try:
        assert isinstance(raw.call(wire.Register(raw.seq(), key, "/" + key, 0, 8192)),
                          wire.Ok)
        by_key = hidden_ref(X, key)
        assert isinstance(raw.route("mixtral", [by_key], out, skip_cache=True), wire.Routed)
        os.truncate(path, 512)  # a file by key is checked on every call
        assert "resized" in invalid(raw.route("mixtral", [by_key], out, skip_cache=True))
    finally:
        path.unlink()


def test_malformed_messages_are_invalid_and_the_connection_goes_on(raw: RawDoor) -> None:
    route = wire.encode(wire.Route(raw.seq(), "mixtral", 0, wire.RegionRef("x", 0, 1),
                                   (hidden_ref(X),)))
    for data in (route[:-7], route + b"extra", bytes([99]) + route[1:]):
        assert "malformed" in invalid(raw.send_bytes(data))
    assert isinstance(raw.call(wire.Describe(0, "mixtral")), wire.Description)


# ---------------------------------------------------------------------- who may connect
def test_socket_and_directory_keep_other_users_out(open_server: InProcessServer) -> None:
    path = door_path(open_server)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.parent.stat().st_uid == os.geteuid()


PEER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(20)
sock.connect(sys.argv[1])
try:
    sock.send(bytes.fromhex(sys.argv[2]))
    print("answered" if sock.recv(1 << 16) else "hung up")
except (ConnectionResetError, BrokenPipeError):  # closed at accept
    print("hung up")
"""


OTHERS_PYTHON = "/usr/bin/python3"  # one that user 65534 may run (PEER needs the stdlib only)


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(OTHERS_PYTHON, os.X_OK),
                    reason="needs root to act as another user, and a system python3")
def test_a_peer_of_another_uid_is_refused_even_through_open_modes(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="moe-router-peer-", dir="/tmp"))
    directory.chmod(0o711)  # others may pass through (not write): allowed for a set path
    path = directory / "door.sock"
    try:
        _peer_is_refused(tmp_path, path)
    finally:
        shutil.rmtree(directory)


def _peer_is_refused(tmp_path: Path, path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", small_routers()[:1],
                          colocated={"socket_path": str(path)})
    hello = wire.encode(wire.Hello(1, "", 1)).hex()
    with serve_in_process(config):
        os.chmod(path, 0o666)  # an operator's mistake: the modes let anyone connect
        done = subprocess.run([OTHERS_PYTHON, "-c", PEER, str(path), hello], user=65534,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "hung up"  # SO_PEERCRED: not the server's user
        mine = subprocess.run([sys.executable, "-c", PEER, str(path), hello],
                              capture_output=True, text=True, timeout=60)
        assert mine.stdout.strip() == "answered"


def test_start_removes_a_stale_socket_and_refuses_a_live_one(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    path = tmp_path / "door.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # what a killed server leaves
    config = write_config(tmp_path / "config.yaml", small_routers()[:1],
                          colocated={"socket_path": str(path)})
    with serve_in_process(config) as server:
        assert door_path(server) == path
        with CoLocatedClient(server.target, socket_path=path, fallback=False) as client:
            client.route("mixtral", X)
        with pytest.raises(OSError, match="another server listens"):
            with serve_in_process(config):
                pass
    assert not path.exists()  # a clean stop removes it


def test_start_refuses_paths_others_could_touch(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / "file").write_text("not a socket")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    for path, match in ((tmp_path / "file", "not a socket"),
                        (shared / "door.sock", "other users must not"),
                        (tmp_path / "missing" / "door.sock", "does not exist")):
        config = write_config(tmp_path / "config.yaml", small_routers()[:1],
                              colocated={"socket_path": str(path)})
        with pytest.raises(RouterConfigurationError, match=match):
            with serve_in_process(config):
                pass


# ---------------------------------------------------------------------- the breaker
def test_the_breaker_counts_and_refuses_for_both_doors(keyed: InProcessServer) -> None:
    fail = Path(keyed.running.chains["faulty"].hosted.spec.fault.fail_while_file_exists)
    x = np.ones((1, 16), np.float32)
    with CoLocatedClient(keyed.target, api_key=KEY_A, timeout=30) as door, \
            RouterClient(keyed.target, api_key=KEY_A, timeout=30, retries=0) as grpc_client:
        fail.touch()
        try:
            with pytest.raises(InternalError):
                door.route("faulty", x, skip_cache=True)
            with pytest.raises(InternalError):
                grpc_client.route("faulty", x, skip_cache=True)
            for client in (door, grpc_client):  # two failures of two calls: open for both
                with pytest.raises(UnavailableError) as refused:
                    client.route("faulty", x, skip_cache=True)
                assert refused.value.reason == "CIRCUIT_OPEN"
                assert refused.value.retry_after_s is not None
        finally:
            fail.unlink()
        stats = grpc_client.stats("faulty")[0]
    assert stats.breaker.state == "OPEN" and stats.breaker.rejected_calls == 2
