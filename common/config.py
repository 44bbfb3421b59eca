"""Settings of `vmattach serve`: defaults < TOML file (--config) <
environment (VMATTACH_<NAME>) < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from vmattach.common.errors import InvalidArgument
from vmattach.common.rules import MAX_VOLUMES_PER_SERVER

SERVICES = ("controller", "node", "servers")


def _opt(default, help, type=str):
    return field(default=default, metadata={"help": help, "type": type})


def flag(value) -> bool:
    """A boolean setting: true/yes/on/1 or false/no/off/0 (TOML booleans too)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


flag.__name__ = "boolean"

AUTH_MODES = ("token", "none")
TGT_CONTROLS = ("socket", "tgtadm")
INTERNAL_CALLS = ("in-process", "grpc")
CHOICES = {"auth": AUTH_MODES, "tgt_control": TGT_CONTROLS, "internal_calls": INTERNAL_CALLS}


@dataclass
class Settings:
    services: str = _opt(",".join(SERVICES), "comma-separated services to run in this process")
    listen: str = _opt("127.0.0.1:50051", "HOST:PORT to listen on; port 0 picks a free port")
    state_dir: str = _opt("/var/lib/vmattach", "directory for databases, keys and volumes")
    database_url: str = _opt("", "database URL (default: SQLite files in the state directory)")
    log_level: str = _opt("INFO", "logging level")
    log_format: str = _opt("text", "log line format: text or json (one JSON object a line)")
    metrics_listen: str = _opt("", "HOST:PORT to serve Prometheus metrics on (/metrics);"
                               " port 0 picks a free port; empty: no metrics endpoint")
    tracing: str = _opt("", "OpenTelemetry tracing: empty (off), console, or otlp"
                        " (needs the package's [tracing] extra)")
    db_upgrade: bool = _opt(True, "upgrade the database schema at start (false: refuse to"
                            " start on an older schema; run `vmattach db upgrade`)", flag)
    # Overload and health (docs/operations.md, "Limits and health")
    controller_max_calls: int = _opt(64, "most Controller calls in flight at once on one listening"
                                     " port; more are answered RESOURCE_EXHAUSTED at once", int)
    node_max_calls: int = _opt(64, "most Node calls in flight at once on one listening port; more"
                               " are answered RESOURCE_EXHAUSTED at once", int)
    servers_max_calls: int = _opt(64, "most Servers (facade) calls in flight at once on one"
                                  " listening port; more are answered RESOURCE_EXHAUSTED at once",
                                  int)
    health_interval: float = _opt(5.0, "seconds between two probes of each service's backends"
                                  " (tgtd, libvirtd, the database) for the health service",
                                  float)
    shutdown_delay: float = _opt(2.0, "seconds between health turning NOT_SERVING and the port"
                                 " closing at shutdown (calls are still answered meanwhile), so"
                                 " that a load balancer polling health takes the process out"
                                 " first", float)
    # Security (docs/security.md)
    tls_cert: str = _opt("", "PEM certificate this server presents (and the facade's outgoing"
                         " calls use); with tls_key, turns TLS on")
    tls_key: str = _opt("", "PEM private key of tls_cert")
    tls_ca: str = _opt("", "PEM CA bundle: client certificates must be signed by it; outgoing"
                       " calls verify servers with it")
    insecure: bool = _opt(False, "allow listening on a non-loopback address without TLS", flag)
    auth: str = _opt("token", "token: public RPCs need a user token, internal RPCs the service"
                     " role; none: no checks at all (loopback listen only)")
    service_token_file: str = _opt("", "file of the service token this process accepts and its"
                                   " facade sends (default: STATE_DIR/service.token)")
    secret_key_file: str = _opt("", "Fernet key file for secrets at rest, shared by facade"
                                " replicas (default: keys generated in the state directory)")
    # Controller
    volume_dir: str = _opt("", "directory of the volume files (default: STATE_DIR/volumes)")
    tgt_portal: str = _opt("127.0.0.1:3260", "HOST:PORT of the tgtd iSCSI portal")
    tgt_control_port: int = _opt(0, "tgtd control port (tgtadm --control-port)", int)
    tgt_control: str = _opt("socket", "how the Controller sends tgtd its requests: socket (tgtd's"
                            " control socket, what tgtadm writes, without a process per"
                            " request) or tgtadm (a tgtadm command each time)")
    max_volume_gb: int = _opt(1024, "largest volume CreateVolume accepts, in GiB", int)
    iqn_prefix: str = _opt("iqn.2010-10.org.openstack:volume-", "prefix of the target IQNs"
                           " (the volume id follows); targets are only ever removed when this"
                           " Controller's database has the volume they name")
    quota_gigabytes: int = _opt(0, "most GiB all volumes together may have (Cinder's gigabytes"
                                " quota); 0: no quota", int)
    # Node
    node_id: str = _opt("", "this node's id (default: the host name)")
    libvirt_uri: str = _opt("qemu:///system", "libvirt connection URI")
    initiator_iqn: str = _opt("", "initiator IQN when /etc/iscsi/initiatorname.iscsi is absent")
    node_ip: str = _opt("127.0.0.1", "this host's IP address in the connector")
    iscsi_connector: str = _opt("qemu", "iSCSI initiator for iscsi volumes: qemu or kernel")
    max_volumes_per_server: int = _opt(MAX_VOLUMES_PER_SERVER, "most volumes one server may have", int)
    detach_timeout: float = _opt(10.0, "seconds to wait for the guest to release a disk", float)
    detach_retries: int = _opt(3, "detach attempts before giving up", int)
    node_volume_dirs: str = _opt("", "comma-separated directories the file connector may attach"
                                 " volumes from (default: the volume directory)")
    # Servers facade
    controller_address: str = _opt("", "HOST:PORT of the Controller (default: this process)")
    nodes: str = _opt("", "NODE_ID=HOST:PORT,... of the Nodes (default: this process's node)")
    internal_calls: str = _opt("in-process", "how the facade calls the Controller and the Node of"
                               " its own process: in-process (in the calling thread, through"
                               " the same interceptors and handlers) or grpc (through a loopback"
                               " gRPC server)")
    call_turns: bool = _opt(True, "the calls this process serves run their Python one at a"
                            " time, each giving its turn up while it waits on a command, libvirtd,"
                            " another service, a database server, a lock or an event"
                            " (docs/architecture.md, \"Turns\"); false:"
                            " all at once, under the interpreter's lock", flag)
    server_refresh_interval: float = _opt(30.0, "seconds between refreshes of the server list", float)
    reconcile_interval: float = _opt(10.0, "seconds between two runs of the reconcilers", float)
    owner_lease: float = _opt(15.0, "seconds after which an operation whose facade stopped"
                              " sending heartbeats is recovered by another", float)
    fault_injection: str = _opt("", "tests only: before|after:STEP[=ACTION],... (ACTION: error,"
                                " unavailable, deadline, kill, pause:SECONDS)")

    def service_list(self) -> list[str]:
        names = [s.strip() for s in self.services.split(",") if s.strip()]
        unknown = sorted(set(names) - set(SERVICES))
        if unknown or not names:
            raise InvalidArgument(f"unknown services {unknown}; choose from {', '.join(SERVICES)}")
        return names

    def max_calls(self, service: str) -> int:
        """The in-flight limit of service ("controller", "node" or "servers")."""
        limit = getattr(self, f"{service}_max_calls")
        if limit < 1:
            raise InvalidArgument(f"setting {service}_max_calls: {limit} is not at least 1")
        return limit

    def database_url_for(self, service: str) -> str:
        return self.database_url or f"sqlite:///{Path(self.state_dir) / (service + '.db')}"

    def volume_path(self) -> Path:
        return Path(self.volume_dir or Path(self.state_dir) / "volumes")

    def file_volume_dirs(self) -> list[Path]:
        """Where the Node's file connector may find volumes (the Controller's
        volume directory, or the comma-separated node_volume_dirs)."""
        dirs = [d.strip() for d in self.node_volume_dirs.split(",") if d.strip()]
        return [Path(d) for d in dirs] or [self.volume_path()]

    def service_token_path(self) -> Path:
        return Path(self.service_token_file or Path(self.state_dir) / "service.token")

    def tls_enabled(self) -> bool:
        return bool(self.tls_cert or self.tls_key)


def _env_name(name: str) -> str:
    return "VMATTACH_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("VMATTACH_CONFIG"),
                        help="TOML file with settings (env VMATTACH_CONFIG)")
    for f in fields(Settings):
        text = f"{f.metadata['help']} (env {_env_name(f.name)}, default {f.default!r})"
        if f.metadata["type"] is flag:  # --insecure, or with a value: --db-upgrade false
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                                nargs="?", const=True, type=flag, metavar="true|false",
                                help=text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                                type=f.metadata["type"], help=text)


def load(args: argparse.Namespace | None = None, environ=None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict = {}
    config = getattr(args, "config", None) if args else environ.get("VMATTACH_CONFIG")
    known = {f.name: f for f in fields(Settings)}
    if config:
        try:
            with open(config, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"cannot read config file {config}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise InvalidArgument(f"unknown setting {key!r} in {config}")
            values[name] = value
    for name in known:
        if _env_name(name) in environ:
            values[name] = environ[_env_name(name)]
        if args is not None and getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    for name, value in values.items():
        typ = known[name].metadata["type"]
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        try:
            values[name] = typ(value)
        except ValueError:
            raise InvalidArgument(f"setting {name}: {value!r} is not a valid {typ.__name__}") from None
    settings = dataclasses.replace(Settings(), **values)
    for name, choices in CHOICES.items():
        if getattr(settings, name) not in choices:
            raise InvalidArgument(f"setting {name}: {getattr(settings, name)!r} is not one of"
                                  f" {', '.join(choices)}")
    return settings
