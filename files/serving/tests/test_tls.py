"""HTTPS and mutual TLS on the API port (``--tls-certfile``, ``--tls-keyfile``,
``--tls-client-ca``), against a real ``metalserve serve``, with a throwaway CA made here as the
roles make the cluster's (one certificate per node, for server and client use, IP SAN
127.0.0.1)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import Server, Store, free_port, run_cli, serve_args
from metalserve import tls
from metalserve.settings import ServeSettings
from test_api_processes import answered_by

TLS_API_PROCESSES = 2

NOW = datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    serial: int


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class CA:
    def __init__(self, directory: Path, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=5))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name}.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cert: Path, key: Path, common_name: str = "node") -> Issued:
        """A node certificate as the roles issue it: serverAuth and clientAuth."""
        private = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        issued = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(private.public_key())
            .serial_number(serial)
            .not_valid_before(NOW - datetime.timedelta(minutes=5))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        _write_key(private, key)
        cert.write_bytes(issued.public_bytes(serialization.Encoding.PEM))
        return Issued(cert, key, serial)


@dataclass(frozen=True)
class Pki:
    ca: CA
    other_ca: CA
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(d, "cluster-ca"), CA(d, "other-ca")
    return Pki(
        ca,
        other,
        server=ca.issue(d / "server.crt", d / "server.key"),
        client=ca.issue(d / "client.crt", d / "client.key", "lb1"),
        stranger=other.issue(d / "stranger.crt", d / "stranger.key", "stranger"),
    )


def _served_serial(port: int, pki: Pki) -> int:
    """The serial of the certificate the server presents now, on a new connection."""
    context = tls.client_context(pki.ca.path, pki.client.cert, pki.client.key)
    with (
        httpx.Client(verify=context, timeout=5) as client,
        client.stream("GET", f"https://127.0.0.1:{port}/readyz") as response,
    ):
        stream = response.extensions["network_stream"]
        der = stream.get_extra_info("ssl_object").getpeercert(True)
    return x509.load_der_x509_certificate(der).serial_number


def _wait_ready(server: Server, context: ssl.SSLContext, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=context, timeout=2) as client:
        while time.monotonic() < deadline:
            assert server.proc is not None
            assert server.proc.poll() is None, server.log()
            try:
                if client.get(f"https://127.0.0.1:{server.port}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"not ready over mTLS after {timeout}s:\n{server.log()}")


@pytest.fixture(scope="module")
def mtls_server(
    model_store: Store, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, int]]:
    """A replica requiring client certificates from the cluster CA, metrics on a plain port;
    two API processes (``--api-processes``: each ends its clients' TLS, the second hands what
    it does not serve to the first over a plain Unix socket)."""
    metrics_port = free_port()
    # Files of its own: the reload test renews them in place.
    d = tmp_path_factory.mktemp("server-tls")
    cert, key = d / "node.crt", d / "node.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    server = Server(
        serve_args(
            model_store,
            max_new_tokens=16,
            metrics_port=metrics_port,
            tls_certfile=cert,
            tls_keyfile=key,
            tls_client_ca=pki.ca.path,
            engine_process=True,
            api_processes=TLS_API_PROCESSES,
        ),
        d / "server.log",
    ).start()
    try:
        _wait_ready(server, tls.client_context(pki.ca.path, pki.client.cert, pki.client.key))
        yield server, metrics_port
    finally:
        server.stop()


def test_a_client_with_a_cluster_certificate_is_served(
    mtls_server: tuple[Server, int], pki: Pki
) -> None:
    server, _ = mtls_server
    context = tls.client_context(pki.ca.path, pki.client.cert, pki.client.key)
    with httpx.Client(verify=context, timeout=30) as client:
        response = client.post(
            f"https://127.0.0.1:{server.port}/v1/completions",
            json={"model": "tiny", "prompt": "hello", "max_tokens": 4},
        )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_every_api_process_serves_tls_and_hands_the_rest_to_the_first(
    mtls_server: tuple[Server, int], pki: Pki
) -> None:
    server, _ = mtls_server
    context = tls.client_context(pki.ca.path, pki.client.cert, pki.client.key)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    for _ in range(60):  # a new connection each: the kernel hands each to one process
        with httpx.Client(verify=context, timeout=30) as client:
            response = client.post(f"https://127.0.0.1:{server.port}/v1/completions", json=body)
            assert response.status_code == 200, response.text
            version = client.get(f"https://127.0.0.1:{server.port}/version")
            assert version.json()["api_processes"] == TLS_API_PROCESSES
        if len(answered_by(server)) == TLS_API_PROCESSES:
            break
    assert len(answered_by(server)) == TLS_API_PROCESSES, answered_by(server)


@pytest.mark.parametrize("client_cert", ["none", "other CA"])
def test_a_client_without_a_cluster_certificate_is_refused_in_the_handshake(
    mtls_server: tuple[Server, int], pki: Pki, client_cert: str
) -> None:
    server, _ = mtls_server
    if client_cert == "none":
        context = tls.client_context(pki.ca.path)
    else:
        context = tls.client_context(pki.ca.path, pki.stranger.cert, pki.stranger.key)
    with httpx.Client(verify=context, timeout=5) as client, pytest.raises(httpx.TransportError):
        # TLS 1.3: the server's refusal arrives with the first read, not the handshake.
        client.get(f"https://127.0.0.1:{server.port}/v1/models")


def test_plain_http_to_the_api_port_gets_nothing(mtls_server: tuple[Server, int]) -> None:
    server, _ = mtls_server
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/v1/models", timeout=5)


def test_the_metrics_port_stays_plain_http(mtls_server: tuple[Server, int]) -> None:
    _, metrics_port = mtls_server
    response = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    assert response.status_code == 200
    assert "metalserve_ready 1.0" in response.text


def test_consistency_presents_the_client_certificate(
    mtls_server: tuple[Server, int], pki: Pki
) -> None:
    server, _ = mtls_server
    url = f"https://127.0.0.1:{server.port}"
    tls_args = ["--tls-ca", str(pki.ca.path)]
    client_args = [
        "--tls-client-cert",
        str(pki.client.cert),
        "--tls-client-key",
        str(pki.client.key),
    ]
    refused = run_cli("consistency", url, *tls_args, "--max-tokens", "4")
    assert refused.returncode != 0, refused.stdout
    assert "unreachable" in refused.stdout
    served = run_cli("consistency", url, url, *tls_args, *client_args, "--max-tokens", "4")
    assert served.returncode == 0, served.stdout + served.stderr
    assert "OK: 2 replicas" in served.stdout


def test_a_renewed_certificate_is_served_without_a_restart(
    mtls_server: tuple[Server, int], pki: Pki
) -> None:
    server, _ = mtls_server
    assert _served_serial(server.port, pki) == pki.server.serial
    cert = Path(server.args[server.args.index("--tls-certfile") + 1])
    key = Path(server.args[server.args.index("--tls-keyfile") + 1])
    renewed = pki.ca.issue(cert, key)
    deadline = time.monotonic() + 15  # checked every 5 s, by each API process
    while server.log().count("reloaded the TLS certificate") < TLS_API_PROCESSES:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.5)
    # New connections, whichever process takes them: the renewed one.
    assert {_served_serial(server.port, pki) for _ in range(10)} == {renewed.serial}
    assert server.proc is not None
    assert server.proc.poll() is None


def test_a_half_renewed_pair_keeps_the_loaded_one(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    pki.ca.issue(cert, key)
    context = tls.server_context(cert, key, pki.ca.path)
    reloader = tls.CertificateReloader(context, cert, key, pki.ca.path)
    assert not reloader.check()  # nothing changed
    # The certificate renewed, its key not yet: refused, the context keeps a usable pair.
    pki.ca.issue(cert, tmp_path / "new.key")
    assert not reloader.check()
    key.write_bytes((tmp_path / "new.key").read_bytes())
    assert reloader.check()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"tls_certfile": "cert"}, "tls_certfile and tls_keyfile go together"),
        ({"tls_client_ca": "ca"}, "tls_client_ca needs tls_certfile"),
        ({"tls_certfile": "cert", "tls_keyfile": "missing"}, "tls_keyfile"),
    ],
)
def test_bad_tls_settings_are_named(tmp_path: Path, flags: dict[str, str], message: str) -> None:
    for name in ("cert", "ca"):
        (tmp_path / name).write_text("x")
    values = {k: tmp_path / v for k, v in flags.items()}
    with pytest.raises(ValueError, match=message):
        ServeSettings(store=tmp_path, model="m", version="0" * 64, **values)
