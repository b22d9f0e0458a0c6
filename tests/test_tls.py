"""TLS listener: the configured certificate is served, TLS below 1.2 is refused."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.realpeers import RelayProc


def _make_cert(directory: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator-cert.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "op-cert.pem", directory / "op-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)


def _client(max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def test_configured_certificate_is_served(relay_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key, der = _make_cert(tmp_path)
    relay: RelayProc = relay_factory(extra=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    with socket.create_connection(("127.0.0.1", relay.tls), timeout=5) as raw, \
            _client().wrap_socket(raw) as tls:
        assert tls.getpeercert(binary_form=True) == der
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(b"\r\n\r\n")  # RFC 5626 ping over TLS
        assert tls.recv(16) == b"\r\n"
    assert not (relay.state_dir / "tls" / "cert.pem").exists()  # no self-signed one was made


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_older_than_1_2_is_refused(relay: RelayProc) -> None:
    try:
        ctx = _client(ssl.TLSVersion.TLSv1_1)
    except (ssl.SSLError, ValueError) as e:
        pytest.skip(f"this OpenSSL cannot even offer TLS 1.1: {e}")
    with socket.create_connection(("127.0.0.1", relay.tls), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"\r\n\r\n")
                tls.recv(16)
    assert relay.alive()
    assert relay.metric("pbx_relay_tls_handshake_failures_total") >= 1
