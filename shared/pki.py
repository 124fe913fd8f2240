"""The keys and certificates that make Lethe's links private and its devices known.

One folder (`DATA_DIR/certs`, made by `lethe certs init`) holds a private
certificate authority, a server certificate it signed for the coordinator's
endpoints (Flower's SuperLink and the deletion API), and one key pair per
device. Servers show the certificate; clients trust only this CA, so nothing
on the network path reads or changes a model update or a deletion request.
Devices prove who they are with their key: the SuperLink admits only SuperNodes
whose public key was registered (`lethe node register`), which is Flower's
SuperNode authentication (ECDSA on a NIST curve, public keys in OpenSSH form).

Private keys are written 0600 and never printed; a CA that exists is never
overwritten (every device trusts it), so `init` refuses rather than replaces.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.durable import atomic_write_bytes

CURVE = ec.SECP384R1()  # Flower's SuperNode authentication wants a NIST curve; P-384 as it shows
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CA_YEARS = 10
SERVER_YEARS = 2


class CertificateError(ValueError):
    """A certificate folder that is missing a file, or a request that would break it."""


@dataclass(frozen=True)
class CertFiles:
    """The files of one certificate folder."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def node_key(self, name: str) -> Path:
        return self.directory / "nodes" / f"{_node_name(name)}.key"

    def node_public_key(self, name: str) -> Path:
        return self.directory / "nodes" / f"{_node_name(name)}.pub"

    def nodes(self) -> list[str]:
        """Names of the node key pairs in the folder."""
        return sorted(path.stem for path in (self.directory / "nodes").glob("*.pub"))

    def require(self, *paths: Path) -> None:
        """Refuse, naming the command that makes them, when files are missing."""
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise CertificateError(
                f"missing {', '.join(missing)}: run `lethe certs init` (or pass --insecure)"
            )


def _node_name(name: str) -> str:
    if not NODE_NAME.fullmatch(name):
        raise CertificateError(f"node name {name!r} must match {NODE_NAME.pattern}")
    return name


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """An unencrypted PKCS#8 PEM of a private key (files holding it are 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alt_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def new_authority(common_name: str, now: datetime.datetime) -> tuple[bytes, bytes]:
    """A self-signed CA certificate and its key, both PEM."""
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def issue_server_certificate(
    ca_cert_pem: bytes, ca_key_pem: bytes, hosts: Sequence[str], now: datetime.datetime
) -> tuple[bytes, bytes]:
    """A TLS server certificate for `hosts` (DNS names or IP addresses), signed by the CA."""
    if not hosts:
        raise CertificateError("a server certificate needs at least one host name")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the CA key is not an EC key")
    key = ec.generate_private_key(CURVE)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365 * SERVER_YEARS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def new_node_key() -> tuple[bytes, bytes]:
    """A device's key pair, both in OpenSSH form (what Flower's SuperNode reads)."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def init_folder(
    files: CertFiles, hosts: Sequence[str], nodes: Sequence[str], now: datetime.datetime
) -> list[Path]:
    """Make the CA (unless it exists), a server certificate for `hosts` plus loopback, and a
    key pair for each node not yet keyed. Returns the files written."""
    for name in nodes:
        _node_name(name)
    written: list[Path] = []
    files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if files.ca_cert.exists() != files.ca_key.exists():
        raise CertificateError(f"{files.directory} has half a CA (ca.crt or ca.key missing)")
    if not files.ca_cert.exists():
        ca_cert, ca_key = new_authority("Lethe private CA", now)
        atomic_write_bytes(files.ca_key, ca_key, mode=0o600)
        atomic_write_bytes(files.ca_cert, ca_cert)
        written += [files.ca_cert, files.ca_key]
    if not files.server_cert.exists() or hosts:
        server_cert, server_key = issue_server_certificate(
            files.ca_cert.read_bytes(),
            files.ca_key.read_bytes(),
            [*hosts, *LOOPBACK_NAMES],
            now,
        )
        atomic_write_bytes(files.server_key, server_key, mode=0o600)
        atomic_write_bytes(files.server_cert, server_cert)
        written += [files.server_cert, files.server_key]
    for name in nodes:
        if files.node_key(name).exists():
            continue
        files.node_key(name).parent.mkdir(exist_ok=True, mode=0o700)
        private, public = new_node_key()
        atomic_write_bytes(files.node_key(name), private, mode=0o600)
        atomic_write_bytes(files.node_public_key(name), public)
        written += [files.node_key(name), files.node_public_key(name)]
    return written
