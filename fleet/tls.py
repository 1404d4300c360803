"""The fleet's TLS CA: server certificates for the broker and the API, client certificates for
devices signed from their certificate requests.

All keys are ECDSA P-256 (what every OpenSSL behind Mosquitto, Python's ``ssl`` and paho
accepts), certificates X.509 v3 with SHA-256. A TLS directory holds::

    ca.pem      the fleet CA certificate: devices pin it at enrollment
    ca.key      its private key (0600): signs server and device certificates
    broker.pem  the broker's server certificate (+ broker.key, 0600), for its host names
    fleet.pem   the fleet API's HTTPS certificate (+ fleet.key, 0600), if asked for

A device's client certificate is issued from a CSR the agent makes with its own TLS key (the
key never leaves the device); the fleet checks the CSR's signature and key type and ignores its
subject: the certificate names the device id the fleet assigned, and is only for client auth.

This module creates and signs; files are written atomically (:func:`agent.atomic.write_atomic`).
It does not configure the broker (``deploy/mosquitto.conf``) or decide where files live.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.atomic import write_atomic
from fleet.errors import InvalidInputError, TlsError

CA_DAYS = 3650
SERVER_DAYS = 825
KEY_MODE = 0o600
MAX_CSR_BYTES = 8192
_BACKDATE = timedelta(minutes=5)  # tolerate clocks slightly behind ours


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class TlsPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_ca(now: datetime, common_name: str = "edgefleet fleet CA") -> CertificateAuthority:
    """A new self-signed CA (path length 0: it signs only leaf certificates)."""
    key = new_key()
    cert = (
        _builder(_name(common_name), _name(common_name), key.public_key(), now)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def _leaf(
    ca: CertificateAuthority,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    usage: x509.ObjectIdentifier,
    now: datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        _builder(subject, ca.cert.subject, public_key, now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise TlsError(f"{host!r} is not a host name or IP address for a certificate") from None
        return x509.DNSName(host)


def issue_server_cert(
    ca: CertificateAuthority, hosts: list[str], now: datetime, days: int = SERVER_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate (and its new key) valid for every name and IP in ``hosts``."""
    if not hosts:
        raise TlsError("a server certificate needs at least one host name or IP address")
    key = new_key()
    cert = (
        _leaf(ca, _name(hosts[0]), key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, now, days)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def client_csr_key(csr_pem: str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a device's PEM CSR whose self-signature verifies."""
    data = csr_pem.encode("utf-8", errors="replace")
    if len(data) > MAX_CSR_BYTES:
        raise TlsError(f"the certificate request is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise TlsError("it is not a PEM certificate signing request") from None
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise TlsError("the certificate request's key must be ECDSA P-256")
    try:
        valid = csr.is_signature_valid
    except InvalidSignature:  # pragma: no cover - cryptography returns False instead
        valid = False
    if not valid:
        raise TlsError("the certificate request's signature does not verify")
    return public_key


def sign_client_csr(
    ca: CertificateAuthority, csr_pem: str, device_id: str, now: datetime, days: int
) -> x509.Certificate:
    """A client certificate for ``device_id`` from the device's CSR; its subject is ignored."""
    public_key = client_csr_key(csr_pem)
    return _leaf(ca, _name(device_id), public_key, ExtendedKeyUsageOID.CLIENT_AUTH, now, days).sign(
        ca.key, hashes.SHA256()
    )


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> str:
    """A PEM CSR for ``key`` (what the agent sends at enrollment)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# --- files ------------------------------------------------------------------------------------


def write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    """The key first (0600), then the certificate, each atomically."""
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(key_path, key_pem(key), KEY_MODE)
    write_atomic(cert_path, cert_pem(cert))


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    """The CA from its files; :class:`TlsError` naming the command that creates them."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise TlsError(
            f"{exc.filename} does not exist; create the fleet CA with `fleet keys tls "
            "--broker-host HOST` or set tls.ca_file and tls.ca_key_file"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise TlsError(f"cannot load the fleet CA from {cert_path} and {key_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{key_path} is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise TlsError(f"{key_path} is not the key of the CA certificate {cert_path}")
    if os.stat(key_path).st_mode & 0o077:
        raise TlsError(f"{key_path} is readable by other users; run `chmod 600 {key_path}`")
    return CertificateAuthority(cert, key)


def load_or_create_ca(paths: TlsPaths, now: datetime) -> tuple[CertificateAuthority, bool]:
    """The CA in ``paths`` (created if there is none); True if it was created."""
    if paths.ca_cert.exists() or paths.ca_key.exists():
        return load_ca(paths.ca_cert, paths.ca_key), False
    ca = create_ca(now)
    write_pair(paths.ca_cert, paths.ca_key, ca.cert, ca.key)
    return ca, True


class ClientCerts:
    """A :class:`fleet.enrollment.ClientCertIssuer` over the fleet CA."""

    def __init__(self, ca: CertificateAuthority, days: int) -> None:
        self.ca = ca
        self.days = days

    def check(self, csr_pem: str) -> None:
        try:
            client_csr_key(csr_pem)
        except TlsError as exc:
            raise InvalidInputError(f"tls_csr cannot be signed: {exc}") from None

    def issue(self, csr_pem: str, device_id: str, now: datetime) -> str:
        return cert_pem(sign_client_csr(self.ca, csr_pem, device_id, now, self.days)).decode()


def pinned_ca_pem(ca_file: Path) -> str | None:
    """The CA certificate(s) devices pin, if ``ca_file`` exists (checked to be PEM)."""
    try:
        data = ca_file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{ca_file} is not a PEM certificate; fix tls.ca_file") from None
    return data.decode()


def client_cert_issuer(ca_file: Path, ca_key_file: Path, days: int) -> ClientCerts | None:
    """Signs device client certificates if the fleet holds the CA's key, else None."""
    if not ca_key_file.exists():
        return None
    return ClientCerts(load_ca(ca_file, ca_key_file), days)
