"""The private CA: made once, kept, and its certificates say what they are for."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.pki import CertFiles, CertificateError, init_folder

NOW = datetime.datetime(2026, 11, 22, tzinfo=datetime.UTC)


def test_init_makes_a_ca_a_server_certificate_for_the_hosts_and_node_keys(tmp_path: Path) -> None:
    files = CertFiles(tmp_path / "certs")
    init_folder(files, ["coordinator.example"], ["phone-1"], NOW)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = files.node_public_key("phone-1").read_bytes()
    assert public.startswith(b"ecdsa-sha2-nistp384 ")
    serialization.load_ssh_private_key(files.node_key("phone-1").read_bytes(), password=None)
    assert files.nodes() == ["phone-1"]


def test_a_second_init_keeps_the_ca_and_every_existing_node_key(tmp_path: Path) -> None:
    files = CertFiles(tmp_path / "certs")
    init_folder(files, [], ["a"], NOW)
    ca, key_a = files.ca_cert.read_bytes(), files.node_key("a").read_bytes()
    written = init_folder(files, [], ["a", "b"], NOW)
    assert files.ca_cert.read_bytes() == ca and files.node_key("a").read_bytes() == key_a
    assert written == [files.node_key("b"), files.node_public_key("b")]


def test_half_a_ca_and_bad_node_names_are_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    files = CertFiles(tmp_path / "certs")
    with pytest.raises(CertificateError, match="node name"):
        init_folder(files, [], ["../escape"], NOW)
    assert not files.directory.exists()
    init_folder(files, [], [], NOW)
    files.ca_key.unlink()
    with pytest.raises(CertificateError, match="half a CA"):
        init_folder(files, [], ["x"], NOW)
    with pytest.raises(CertificateError, match="lethe certs init"):
        files.require(files.ca_key)
