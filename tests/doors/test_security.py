"""ApiKeyInterceptor and TLS credentials on a real grpc.aio server at 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moe_router.doors.security import ApiKeyInterceptor, caller_identity, key_id, server_credentials
from moe_router.errors import RouterConfigurationError

KEYS = ["alpha-secret-key", "beta-secret-key"]


async def _unary(request: bytes, context) -> bytes:
    return request + b"|" + caller_identity().encode()


async def _server_stream(request: bytes, context):
    for i in range(3):
        yield f"{i}|{caller_identity()}".encode()


async def _client_stream(requests, context) -> bytes:
    parts = [r async for r in requests]
    return b"+".join(parts) + b"|" + caller_identity().encode()


def _sync_unary(request: bytes, context) -> bytes:
    return b"sync|" + caller_identity().encode()


async def _serve(body: Callable[[str], Awaitable[None]], *, interceptors=(),
                 credentials: grpc.ServerCredentials | None = None) -> None:
    """Start an echo + health server on 127.0.0.1:0, run ``body(target)``, stop."""
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "SyncUnary": grpc.unary_unary_rpc_method_handler(_sync_unary),
    }),))
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def _auth_run(body: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    async def with_channel(target: str) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            await body(channel)

    asyncio.run(_serve(with_channel, interceptors=[ApiKeyInterceptor(KEYS)]))


@pytest.mark.parametrize(
    "metadata",
    [(("authorization", f"Bearer {KEYS[0]}"),), (("x-api-key", KEYS[0]),),
     (("authorization", f"bearer {KEYS[0]}"),)],
)
def test_valid_key_in_either_header_is_accepted_and_identified(metadata) -> None:
    async def body(channel):
        reply = await channel.unary_unary("/test.Echo/Unary")(b"hi", metadata=metadata,
                                                               timeout=10)
        assert reply == b"hi|" + key_id(KEYS[0]).encode()

    _auth_run(body)


def test_key_id_is_short_and_not_the_key() -> None:
    ident = key_id(KEYS[1])
    assert len(ident) == 8 and int(ident, 16) >= 0 and ident not in KEYS[1]
    assert ident != key_id(KEYS[0])


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [((), "missing API key"),
     ((("x-api-key", "wrong"),), "invalid API key in 'x-api-key'"),
     ((("authorization", "Bearer wrong"),), "invalid API key in 'authorization'"),
     ((("authorization", KEYS[0]),), "must be 'Bearer <key>'")],
)
def test_missing_or_wrong_key_is_unauthenticated(metadata, fragment) -> None:
    async def body(channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Echo/Unary")(b"hi", metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert fragment in info.value.details()
        for key in KEYS:
            assert key not in info.value.details()

    _auth_run(body)


def test_streaming_methods_are_guarded_and_identified() -> None:
    good = (("x-api-key", KEYS[1]),)
    ident = key_id(KEYS[1])

    async def body(channel):
        server_stream = channel.unary_stream("/test.Echo/ServerStream")
        replies = [r async for r in server_stream(b"x", metadata=good, timeout=10)]
        assert replies == [f"{i}|{ident}".encode() for i in range(3)]
        client_stream = channel.stream_unary("/test.Echo/ClientStream")
        assert await client_stream(iter([b"a", b"b"]), metadata=good, timeout=10) == (
            b"a+b|" + ident.encode())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in server_stream(b"x", timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client_stream(iter([b"a"]), metadata=(("x-api-key", "no"),), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    _auth_run(body)


def test_sync_handlers_see_the_identity_too() -> None:
    async def body(channel):
        reply = await channel.unary_unary("/test.Echo/SyncUnary")(
            b"", metadata=(("x-api-key", KEYS[0]),), timeout=10)
        assert reply == b"sync|" + key_id(KEYS[0]).encode()

    _auth_run(body)


def test_health_check_needs_no_key() -> None:
    async def body(channel):
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    _auth_run(body)


def test_unknown_method_without_key_is_unauthenticated_not_unimplemented() -> None:
    async def body(channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Echo/Nope")(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Echo/Nope")(
                b"", metadata=(("x-api-key", KEYS[0]),), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    _auth_run(body)


def test_identity_is_empty_outside_a_keyed_call() -> None:
    assert caller_identity() == ""

    async def body(target):
        async with grpc.aio.insecure_channel(target) as channel:
            assert await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10) == b"x|"

    asyncio.run(_serve(body))


@pytest.mark.parametrize("keys", [[], [""], "one-string"])
def test_bad_key_lists_fail_at_construction(keys) -> None:
    with pytest.raises(RouterConfigurationError, match="keys"):
        ApiKeyInterceptor(keys)


# ---------------------------------------------------------------------------- TLS
class _Pki:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client cert."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key, self.ca_cert = self._issue("test CA", None, None, ca=True)
        self.server = self._write("server", *self._issue(
            "localhost", self.ca_key, self.ca_cert, san=True))
        self.client = self._write("client", *self._issue("client", self.ca_key, self.ca_cert))
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, name, issuer_key, issuer_cert, *, ca=False, san=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_cert.subject if issuer_cert else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    def _write(self, stem, key, cert) -> tuple[Path, Path]:
        cert_file, key_file = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> _Pki:
    return _Pki(tmp_path_factory.mktemp("pki"))


def _tls_call(server_creds, channel_creds) -> grpc.StatusCode:
    outcome: list[grpc.StatusCode] = []

    async def body(target):
        async with grpc.aio.secure_channel(target, channel_creds) as channel:
            try:
                assert await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10) == b"x|"
                outcome.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                outcome.append(exc.code())

    asyncio.run(_serve(body, credentials=server_creds))
    return outcome[0]


def test_tls_handshake_succeeds_with_the_ca(pki: _Pki) -> None:
    creds = server_credentials(*pki.server)
    client = grpc.ssl_channel_credentials(root_certificates=pki.ca_file.read_bytes())
    assert _tls_call(creds, client) == grpc.StatusCode.OK


def test_tls_handshake_fails_without_trusting_the_ca(pki: _Pki, tmp_path: Path) -> None:
    other = _Pki(tmp_path)
    creds = server_credentials(*pki.server)
    client = grpc.ssl_channel_credentials(root_certificates=other.ca_file.read_bytes())
    assert _tls_call(creds, client) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(pki: _Pki) -> None:
    creds = server_credentials(*pki.server, client_ca_file=pki.ca_file)
    ca = pki.ca_file.read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=pki.client[1].read_bytes(),
        certificate_chain=pki.client[0].read_bytes())
    assert _tls_call(creds, with_cert) == grpc.StatusCode.OK
    without = grpc.ssl_channel_credentials(root_certificates=ca)
    assert _tls_call(creds, without) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_cert_from_another_ca(pki: _Pki, tmp_path: Path) -> None:
    other = _Pki(tmp_path)
    creds = server_credentials(*pki.server, client_ca_file=pki.ca_file)
    stranger = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(), private_key=other.client[1].read_bytes(),
        certificate_chain=other.client[0].read_bytes())
    assert _tls_call(creds, stranger) == grpc.StatusCode.UNAVAILABLE


def test_missing_or_non_pem_files_name_the_argument(pki: _Pki, tmp_path: Path) -> None:
    with pytest.raises(RouterConfigurationError, match="cert_file"):
        server_credentials(tmp_path / "nope.crt", pki.server[1])
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(RouterConfigurationError, match="client_ca_file"):
        server_credentials(*pki.server, client_ca_file=junk)
