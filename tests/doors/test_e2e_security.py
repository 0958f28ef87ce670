"""End to end over loopback: API keys, TLS, mutual TLS and the per-caller rate limit of the
real server (in-process, ``create_server``). Certificates are made in the test (throw-away
CAs)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess_server import InProcessServer, serve_in_process
from prometheus_client.parser import text_string_to_metric_families
from server_process import small_routers, write_config

from moe_router_client import RouterClient
from moe_router_client.errors import (
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

FILE_KEYS = ("file-key-4f9a1c0d2e7b", "file-key-second-88c1e2")
ENV_KEY = "env-key-0d5e6b7f1a2c"
KEYS_ENV = "MOE_E2E_API_KEYS"
EXPECTED_HEADERS = "'authorization: Bearer <key>' or 'x-api-key: <key>'"


def only(*names: str) -> list[dict]:
    return [r for r in small_routers() if r["name"] in names]


def tokens(rows: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)


def routes(client: RouterClient, router: str = "mixtral") -> bool:
    dim = {"mixtral": 64, "deepseek": 32}[router]
    return client.route(router, tokens(2, dim)).expert_indices.shape == (2, 2 if dim == 64 else 4)


def health_check(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


# --------------------------------------------------------------------------- API keys
@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory):
    """A server that requires a key: two from a file (with a comment), one from the
    variable named by security.api_keys_env."""
    tmp = tmp_path_factory.mktemp("api-keys")
    keys_file = tmp / "keys.txt"
    keys_file.write_text(f"# team keys\n{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  \n")
    config = write_config(
        tmp / "config.yaml",
        only("mixtral"),
        security={
            "api_key_required": True,
            "api_keys_file": str(keys_file),
            "api_keys_env": KEYS_ENV,
        },
    )
    with serve_in_process(config, env={KEYS_ENV: f" {ENV_KEY} , "}) as server:
        yield server


def raw_route(server: InProcessServer, metadata: tuple[tuple[str, str], ...]) -> pb.RouteResponse:
    """One Route call with exactly ``metadata`` (the client only sends Bearer)."""
    request = pb.RouteRequest(router="mixtral", layer=0)
    request.hidden_states.CopyFrom(
        pb.Tensor(dtype=pb.FLOAT32, shape=[2, 64], data=tokens(2).tobytes())
    )
    with grpc.insecure_channel(server.target) as channel:
        return pb_grpc.RouterServiceStub(channel).Route(request, metadata=metadata, timeout=30)


@pytest.mark.parametrize("key", [*FILE_KEYS, ENV_KEY], ids=["file-1", "file-2", "env"])
def test_each_configured_key_is_accepted_as_bearer(keyed, key):
    with RouterClient(keyed.target, api_key=key, timeout=30, retries=0) as c:
        assert routes(c)
        assert [s.router for s in c.stats()] == ["mixtral"]


def test_x_api_key_metadata_is_accepted(keyed):
    response = raw_route(keyed, (("x-api-key", FILE_KEYS[1]),))
    assert list(response.expert_indices.shape) == [2, 2]


def test_a_call_without_a_key_is_unauthenticated_and_names_the_headers(keyed):
    with RouterClient(keyed.target, timeout=30, retries=0) as c:
        for call in (lambda: routes(c), c.stats, c.list_routers):
            with pytest.raises(UnauthenticatedError) as raised:
                call()
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "missing API key" in raised.value.details
            assert EXPECTED_HEADERS in raised.value.details
            assert not any(k in raised.value.details for k in (*FILE_KEYS, ENV_KEY))
    with RouterClient(keyed.target, api_key=ENV_KEY, timeout=30, retries=0) as c:
        assert routes(c)


@pytest.mark.parametrize(
    "metadata,message",
    [
        ((("authorization", "Bearer wrong-key-5c3a"),), "invalid API key in 'authorization'"),
        ((("x-api-key", "wrong-key-5c3a"),), "invalid API key in 'x-api-key'"),
        ((("authorization", f"Bearer {FILE_KEYS[0]}x"),), "invalid API key"),
        ((("authorization", f"Basic {FILE_KEYS[0]}"),), "must be 'Bearer <key>'"),
    ],
    ids=["wrong-bearer", "wrong-x-api-key", "key-prefix", "basic-scheme"],
)
def test_a_wrong_key_is_unauthenticated_and_never_echoed(keyed, metadata, message):
    with pytest.raises(grpc.RpcError) as raised:
        raw_route(keyed, metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details = raised.value.details()
    assert message in details
    assert "wrong-key-5c3a" not in details and FILE_KEYS[0] not in details
    assert list(raw_route(keyed, (("x-api-key", ENV_KEY),)).expert_indices.shape) == [2, 2]


def test_health_needs_no_key(keyed):
    with grpc.insecure_channel(keyed.target) as channel:
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        service = "moe_router.v1.RouterService/mixtral"
        assert health_check(channel, service) == health_pb2.HealthCheckResponse.SERVING
    with RouterClient(keyed.target, timeout=30, retries=0) as c:
        assert c.health().status == "SERVING"


def test_the_server_log_never_contains_a_key(keyed):
    with RouterClient(keyed.target, api_key="wrong-key-in-log-9e1f", timeout=30, retries=0) as c:
        with pytest.raises(UnauthenticatedError):
            routes(c)
    with RouterClient(keyed.target, api_key=FILE_KEYS[0], timeout=30, retries=0) as c:
        assert routes(c)
    # The log is every record of this process since before start-up, at the server's
    # log_level; a record under the server's logger shows the recording is live (as the
    # "listening on" line did for a child process's output).
    logging.getLogger("moe_router.doors.security").info("the log is recorded")
    log = keyed.log()
    assert "INFO moe_router.doors.security: the log is recorded" in log
    for secret in (*FILE_KEYS, ENV_KEY, "wrong-key-in-log-9e1f"):
        assert secret not in log


# --------------------------------------------------------------------------- TLS
def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Issued:
    """A PEM certificate, its private key, and (for a CA) the objects that sign others."""

    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key)


def issue(ca: Issued, common_name: str, *, server: bool) -> Issued:
    """A leaf certificate signed by ``ca``: for 127.0.0.1 / localhost, or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key)


@dataclass(frozen=True)
class Pki:
    """The trusted CA with a server and a client certificate, and an unrelated CA with a
    client certificate of its own."""

    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_client: Issued
    folder: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("moe-router test CA"), make_ca("unrelated test CA")
    made = Pki(
        ca=ca,
        server=issue(ca, "moe-router test server", server=True),
        client=issue(ca, "moe-router test client", server=False),
        other_ca=other_ca,
        other_client=issue(other_ca, "intruder", server=False),
        folder=folder,
    )
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    (folder / "server.pem").write_bytes(made.server.cert_pem)
    (folder / "server.key").write_bytes(made.server.key_pem)
    return made


def tls_config(pki: Pki, name: str, *, mutual: bool) -> Path:
    tls = {
        "enabled": True,
        "cert_file": str(pki.folder / "server.pem"),
        "key_file": str(pki.folder / "server.key"),
    }
    if mutual:
        tls["client_ca_file"] = str(pki.folder / "ca.pem")
    return write_config(pki.folder / f"{name}.yaml", only("mixtral"), security={"tls": tls})


@pytest.fixture(scope="module")
def tls(pki: Pki):
    with serve_in_process(tls_config(pki, "tls", mutual=False)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls(pki: Pki):
    with serve_in_process(tls_config(pki, "mtls", mutual=True)) as server:
        yield server


def tls_client(target: str, root: bytes, client: Issued | None = None) -> RouterClient:
    return RouterClient(
        target,
        tls=True,
        root_certificates=root,
        private_key=None if client is None else client.key_pem,
        certificate_chain=None if client is None else client.cert_pem,
        timeout=15,
        retries=0,
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_client_trusting_the_ca_routes(tls, pki, host):
    with tls_client(f"{host}:{tls.port}", pki.ca.cert_pem) as c:
        assert routes(c)
        assert c.health().status == "SERVING"


def test_plaintext_client_cannot_reach_a_tls_server(tls, pki):
    with RouterClient(tls.target, timeout=15, retries=0) as c:
        with pytest.raises(UnavailableError) as raised:
            routes(c)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    with tls_client(tls.target, pki.ca.cert_pem) as c:
        assert routes(c)


def test_client_trusting_another_ca_refuses_the_server(tls, pki):
    with tls_client(tls.target, pki.other_ca.cert_pem) as c:
        with pytest.raises(UnavailableError):
            routes(c)
    with tls_client(tls.target, pki.ca.cert_pem) as c:
        assert routes(c)


def test_mtls_client_with_a_certificate_from_the_ca_routes(mtls, pki):
    with tls_client(mtls.target, pki.ca.cert_pem, pki.client) as c:
        assert routes(c)
        assert [s.router for s in c.stats()] == ["mixtral"]


@pytest.mark.parametrize("which", ["no-certificate", "other-ca", "server-untrusted"])
def test_mtls_refuses_a_client_without_a_trusted_certificate(mtls, pki, which):
    root, client = {
        "no-certificate": (pki.ca.cert_pem, None),
        "other-ca": (pki.ca.cert_pem, pki.other_client),
        "server-untrusted": (pki.other_ca.cert_pem, pki.client),
    }[which]
    with tls_client(mtls.target, root, client) as c:
        with pytest.raises(UnavailableError):
            routes(c)
    with tls_client(mtls.target, pki.ca.cert_pem, pki.client) as c:
        assert routes(c)


# --------------------------------------------------------------------------- rate limit
RATE_PER_HOUR = 3600  # one token a second; burst = one minute's worth = 60
BURST = 60
RATE_KEYS = ("rate-key-alpha-61b0", "rate-key-beta-27d4")


def limited_metric(server: InProcessServer, router: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "moe_router_rate_limited_total" and sample.labels["router"] == router:
                total += sample.value
    return total


def exhaust(
    client: RouterClient, router: str = "mixtral"
) -> tuple[int, float, ResourceExhaustedError]:
    """Call until refused: (calls admitted, seconds it took, the refusal)."""
    started = time.monotonic()
    for admitted in range(BURST * 3):
        try:
            routes(client, router)
        except ResourceExhaustedError as exc:
            return admitted, time.monotonic() - started, exc
    raise AssertionError(f"{BURST * 3} calls were never rate limited")


def assert_rate_limited(refusal: ResourceExhaustedError) -> None:
    assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.reason == "RATE_LIMITED"
    assert 0 < refusal.retry_after_s <= 3600 / RATE_PER_HOUR
    assert f"rate limit of {RATE_PER_HOUR} requests per hour (burst {BURST})" in refusal.details


@pytest.fixture(scope="module")
def keyed_limit(tmp_path_factory: pytest.TempPathFactory):
    """Rate limit per API key."""
    tmp = tmp_path_factory.mktemp("rate-keys")
    config = write_config(
        tmp / "config.yaml",
        only("mixtral", "deepseek"),
        cache={"enabled": False},
        security={"api_key_required": True, "rate_limit": RATE_PER_HOUR},
    )
    with serve_in_process(config, env={"DYNAMIC_MOE_API_KEYS": ",".join(RATE_KEYS)}) as server:
        yield server


@pytest.fixture(scope="module")
def host_limit(tmp_path_factory: pytest.TempPathFactory):
    """Rate limit without keys: one bucket per client host."""
    tmp = tmp_path_factory.mktemp("rate-host")
    config = write_config(
        tmp / "config.yaml",
        only("mixtral"),
        cache={"enabled": False},
        security={"rate_limit": RATE_PER_HOUR},
    )
    with serve_in_process(config) as server:
        yield server


def test_calls_past_the_burst_are_rate_limited_and_recover(keyed_limit):
    alpha = RouterClient(keyed_limit.target, api_key=RATE_KEYS[0], timeout=30, retries=0)
    with alpha:
        before = limited_metric(keyed_limit, "mixtral")
        admitted, took, refusal = exhaust(alpha)
        # A full bucket plus what refilled while the loop ran, never more.
        assert BURST <= admitted <= BURST + took * RATE_PER_HOUR / 3600 + 1
        assert_rate_limited(refusal)
        with pytest.raises(ResourceExhaustedError) as again:
            routes(alpha)
        assert_rate_limited(again.value)
        assert limited_metric(keyed_limit, "mixtral") >= before + 2
        (stats,) = alpha.stats("mixtral")
        assert stats.errors >= 2

        time.sleep(again.value.retry_after_s + 0.2)
        assert routes(alpha)
        with pytest.raises(ResourceExhaustedError):  # one token came back, and it is spent
            routes(alpha)


def test_another_key_has_its_own_bucket(keyed_limit):
    alpha = RouterClient(keyed_limit.target, api_key=RATE_KEYS[0], timeout=30, retries=0)
    beta = RouterClient(keyed_limit.target, api_key=RATE_KEYS[1], timeout=30, retries=0)
    with alpha, beta:
        exhaust(alpha)
        assert routes(beta)
        with pytest.raises(ResourceExhaustedError) as raised:
            routes(alpha)
        assert_rate_limited(raised.value)
        assert routes(beta)


def test_the_limit_is_per_key_across_routers(keyed_limit):
    """Requests per hour per key, whichever router they go to (README: a bucket per key)."""
    with RouterClient(keyed_limit.target, api_key=RATE_KEYS[1], timeout=30, retries=0) as beta:
        exhaust(beta, "mixtral")
        with pytest.raises(ResourceExhaustedError) as raised:
            routes(beta, "deepseek")
        assert_rate_limited(raised.value)


def test_callers_without_a_key_share_one_bucket_per_host(host_limit):
    with RouterClient(host_limit.target, timeout=30, retries=0) as first:
        _, _, refusal = exhaust(first)
        assert_rate_limited(refusal)
    # A new connection from the same host is the same caller.
    with RouterClient(host_limit.target, timeout=30, retries=0) as second:
        with pytest.raises(ResourceExhaustedError) as raised:
            routes(second)
        assert_rate_limited(raised.value)
    assert limited_metric(host_limit, "mixtral") >= 2
    with grpc.insecure_channel(host_limit.target) as channel:  # health is never limited
        assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING
