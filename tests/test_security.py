"""Security at the edge: bearer-token auth with per-token models, TLS and mutual TLS with
throwaway certificates, message size limits, model names as registry keys, and connection age."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import logging
import re
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stepserve.client import ImageClient, StepserveError, TlsOptions
from stepserve.server.config import ServerConfig

from .metrics_helpers import Samples, scrape
from .server_process import free_port
from .server_thread import ServerThread
from .waiting import wait_for


def serve(tiny_sd_dir: Path, **kw: object) -> ServerThread:
    kw = {"metrics_port": 0, **kw}
    cfg = ServerConfig(host="127.0.0.1", port=0, models=[f"tiny={tiny_sd_dir}"], **kw)  # type: ignore[arg-type]
    return ServerThread(cfg.validate())


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
    except StepserveError as e:
        return e.code
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# -- auth ------------------------------------------------------------------------------


@pytest.fixture
def authed(tiny_sd_dir: Path, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# ops\nops-token\n\nlimited-token other-model, another  # not tiny\n")
    srv = serve(tiny_sd_dir, auth_token_file=str(tokens), metrics_port=free_port())
    yield srv
    srv.stop()


def client(target: str, token: str | None, **kw: object) -> ImageClient:
    md = [("authorization", f"Bearer {token}")] if token else []
    return ImageClient(target, metadata=md, service_config={}, **kw)  # type: ignore[arg-type]


def test_bearer_tokens_gate_every_method_but_health(authed) -> None:
    t = authed.target
    for token in (None, "wrong-token", ""):
        with client(t, token) as c:
            assert code_of(lambda: c.generate("a red circle", steps=2)) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(c.list_models) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(t) as ch:
        bad_scheme = code_of(
            lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        )
        assert bad_scheme == grpc.StatusCode.OK  # health is public (Kubernetes probes send no token)
        with pytest.raises(grpc.RpcError) as e:  # reflection is not, by default
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/stepserve.v1.ImageGenerationService/ListModels")(
                b"", metadata=[("authorization", "Basic b3BzOg==")], timeout=10
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with client(t, "ops-token") as c:
        assert len(c.generate("a red circle", steps=2).images) == 1
    with client(t, "limited-token") as c:
        assert [m.name for m in c.list_models()] == ["tiny"]
        with pytest.raises(StepserveError) as denied:
            c.generate("a red circle", steps=2)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "'tiny'" in denied.value.message
    s = Samples(scrape(authed.server.metrics_port))
    assert s.get("stepserve_auth_failures_total", code="UNAUTHENTICATED") == 3 * 2 + 2
    assert s.get("stepserve_auth_failures_total", code="PERMISSION_DENIED") == 1
    # Refused calls never reached the engine.
    assert s.get("stepserve_requests_total", model="tiny", code="ok") == 1


def test_reflection_can_be_made_public(tiny_sd_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    srv = serve(
        tiny_sd_dir,
        auth_token_file=str(tokens),
        auth_public_services="grpc.health.v1.Health,grpc.reflection.v1alpha.ServerReflection",
    )
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            (resp,) = list(stub.ServerReflectionInfo(iter([req])))
            names = {s.name for s in resp.list_services_response.service}
            assert "stepserve.v1.ImageGenerationService" in names
    finally:
        srv.stop()


# -- TLS -------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False, san: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("stepserve test CA", ca_key, _name("stepserve test CA"), ca_key, ca=True)
    out = {}
    for who, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"stepserve test {who}", key, ca.subject, ca_key, san=san)
        out[f"{who}.crt"] = d / f"{who}.crt"
        out[f"{who}.key"] = d / f"{who}.key"
        out[f"{who}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    out["ca.crt"] = d / "ca.crt"
    out["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return out


def test_tls_serves_tls_clients_and_refuses_plaintext(tiny_sd_dir: Path, pki: dict[str, Path]) -> None:
    srv = serve(tiny_sd_dir, tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]))
    try:
        tls = TlsOptions(root_certificates=pki["ca.crt"].read_bytes())
        with ImageClient(srv.target, tls=tls, service_config={}) as c:
            assert len(c.generate("a red circle", steps=2).images) == 1
        with ImageClient(srv.target, service_config={}, timeout_s=5) as plain:
            assert code_of(plain.list_models) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    tiny_sd_dir: Path, pki: dict[str, Path]
) -> None:
    srv = serve(
        tiny_sd_dir,
        tls_cert=str(pki["server.crt"]),
        tls_key=str(pki["server.key"]),
        tls_client_ca=str(pki["ca.crt"]),
    )
    try:
        ca = pki["ca.crt"].read_bytes()
        with ImageClient(
            srv.target, tls=TlsOptions(root_certificates=ca), service_config={}, timeout_s=5
        ) as c:
            assert code_of(c.list_models) == grpc.StatusCode.UNAVAILABLE
        mtls = TlsOptions(
            root_certificates=ca,
            certificate_chain=pki["client.crt"].read_bytes(),
            private_key=pki["client.key"].read_bytes(),
        )
        with ImageClient(srv.target, tls=mtls, service_config={}) as c:
            assert [m.name for m in c.list_models()] == ["tiny"]
    finally:
        srv.stop()


# -- limits and connection management ----------------------------------------------------


def test_oversized_messages_and_path_like_model_names_are_refused(server) -> None:
    with ImageClient(server.target, service_config={}) as c:
        with pytest.raises(StepserveError) as big:
            c.generate("x" * (17 << 20), steps=2)  # 17 MiB: over the 16 MiB request limit
        assert big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for name in ("../tiny", "/etc/passwd", str(Path.cwd())):
            with pytest.raises(StepserveError) as missing:
                c.generate("a red circle", steps=2, model=name)
            assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert len(c.generate("a red circle", steps=2).images) == 1  # and it still serves


def test_connections_are_recycled_after_max_age_without_cutting_streams(
    tiny_sd_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="stepserve.server.api.servicer")
    # Each step takes at least 10 ms (injected), so 150 steps outlive the 0.5 s age anywhere.
    monkeypatch.setenv("STEPSERVE_FAULTS", "step_delay_s=0.01")
    srv = serve(tiny_sd_dir, max_connection_age_s=0.5, drain_timeout_s=60)
    try:
        with ImageClient(srv.target, service_config={}) as c:
            # A stream that outlives the connection's age is not cut (it gets the grace period).
            long = c.generate("a red circle", steps=150, request_id="long")
            assert long.usage.total_ms > 500

            def peers() -> dict[str, str]:
                return dict(re.findall(r"request (\S+) accepted from (\S+):", caplog.text))

            # The same client channel comes back on a new connection (a new local port) once
            # the old one is closed: later calls go out until one arrives on it.
            calls = itertools.count(1)

            def on_new_connection() -> bool:
                rid = f"later-{next(calls)}"
                c.generate("a red circle", steps=2, request_id=rid)
                return peers()[rid] != peers()["long"]

            wait_for(on_new_connection, timeout_s=30, what="a call on a new connection")
    finally:
        srv.stop()
