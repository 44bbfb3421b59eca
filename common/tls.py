"""TLS for every vmattach process: the server's credentials (mutual TLS
when a CA is given), the credentials of outgoing channels, the kind of a
peer's client certificate, and the rule that a non-loopback listener needs
TLS (docs/security.md)."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from vmattach.common.errors import InvalidArgument

# The organizational unit that marks a certificate's kind (vmattach pki init).
SERVICE_OU = "vmattach-service"
CLIENT_OU = "vmattach-client"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this side's certificate and key, the CA that signs the other side."""
    cert: str = ""
    key: str = ""
    ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key)

    @classmethod
    def of(cls, settings) -> TlsFiles:
        return cls(settings.tls_cert, settings.tls_key, settings.tls_ca)

    def _read(self, path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the TLS {what} {path}: {exc.strerror}") from None

    def check(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InvalidArgument("TLS needs both tls_cert and tls_key")

    def server_credentials(self) -> grpc.ServerCredentials:
        """This server's certificate; with a CA, client certificates are
        required and must be signed by it."""
        self.check()
        pair = (self._read(self.key, "key"), self._read(self.cert, "certificate"))
        if self.ca:
            return grpc.ssl_server_credentials([pair], root_certificates=self._read(self.ca, "CA"),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server with the CA (the system's roots without one);
        present this side's certificate when there is one."""
        self.check()
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca, "CA") if self.ca else None,
            private_key=self._read(self.key, "key") if self.key else None,
            certificate_chain=self._read(self.cert, "certificate") if self.cert else None)


def host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT listens on a loopback address only."""
    host = host_of(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" / "0.0.0.0" / "[::]": reachable from elsewhere


def check_listen(settings) -> None:
    """Refuse a non-loopback listener without TLS (unless insecure), and
    auth none anywhere but on loopback."""
    files = TlsFiles.of(settings)
    files.check()
    if files.ca and not files.enabled:
        raise InvalidArgument("tls_ca is given without tls_cert and tls_key")
    if not is_loopback(settings.listen) and not files.enabled and not settings.insecure:
        raise InvalidArgument(
            f"refusing to listen on {settings.listen} without TLS: give --tls-cert/--tls-key"
            " (and --tls-ca), or --insecure to accept plain text on the network")
    if settings.auth == "none" and not is_loopback(settings.listen):
        raise InvalidArgument(f"--auth none is only accepted on a loopback address,"
                              f" not {settings.listen}")


# -- the peer's certificate ------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _parse(pem: bytes) -> tuple[str, str]:
    from cryptography import x509  # here: the CLI need not load it
    from cryptography.x509.oid import NameOID
    cert = x509.load_pem_x509_certificate(pem)
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    kind = "service" if SERVICE_OU in units else "client" if CLIENT_OU in units else "other"
    return kind, cert.subject.rfc4514_string()


def peer_certificate(context) -> tuple[str, str] | None:
    """(kind, subject) of the verified client certificate of this call, kind
    "service", "client" or "other"; None without one. gRPC verified it
    against the CA during the handshake."""
    try:
        auth = context.auth_context()
    except Exception:  # noqa: BLE001 - no auth context: no certificate
        return None
    pems = auth.get("x509_pem_cert") if auth else None
    if not pems:
        return None
    return _parse(bytes(pems[0]))
