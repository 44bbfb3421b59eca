"""`vmattach pki init DIR --hosts ...`: a small CA and the certificates of one
deployment, made with `cryptography`:

    ca.crt (+ ca.key)           the deployment's CA
    service.crt + service.key   the servers, and the facade's outgoing calls
                                (OU vmattach-service: the service role)
    client.crt + client.key     users and the CLI (OU vmattach-client)

Every file is written 0600. The CA key stays in DIR: keep DIR private."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmattach.common.errors import AlreadyExists, InvalidArgument
from vmattach.common.rules import quote
from vmattach.common.tls import CLIENT_OU, SERVICE_OU

VALID_DAYS = 825
FILES = ("ca.crt", "ca.key", "service.crt", "service.key", "client.crt", "client.key")


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmattach")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def parse_hosts(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise InvalidArgument("--hosts needs at least one host name or address")
    for host in hosts:
        if len(host) > 253 or not all(c.isalnum() or c in ".-:" for c in host):
            raise InvalidArgument(f"{quote(host)} is not a host name or IP address")
    return hosts


def init(directory: str | os.PathLike, hosts: list[str], days: int = VALID_DAYS) -> dict[str, Path]:
    """Create the CA and the two certificates in directory (made 0700);
    AlreadyExists when any of the files is there."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    existing = [f for f in FILES if (out / f).exists()]
    if existing:
        raise AlreadyExists(f"{out} already has {', '.join(existing)}; not overwriting")
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("vmattach CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, ou: str, usages: list, san: list[str] | None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn, ou)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if san:
            builder = builder.add_extension(_san(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    # the service certificate serves (serverAuth) and calls other services (clientAuth)
    service_key, service = leaf("vmattach-service", SERVICE_OU,
                                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                                hosts)
    client_key, client = leaf("vmattach-client", CLIENT_OU, [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    pem = serialization.Encoding.PEM
    contents = {"ca.crt": ca.public_bytes(pem), "ca.key": _key_pem(ca_key),
                "service.crt": service.public_bytes(pem), "service.key": _key_pem(service_key),
                "client.crt": client.public_bytes(pem), "client.key": _key_pem(client_key)}
    for name, data in contents.items():
        _write(out / name, data)
    return {name: out / name for name in contents}
