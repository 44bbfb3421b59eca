"""Builds the Servers service (the facade) of `vmattach serve`: its database,
its channels to the Controller and the Nodes, the reconciler."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from vmattach.common.auth import SERVICE_HEADER
from vmattach.common.config import Settings
from vmattach.common.db import close_database, open_database, probe_database
from vmattach.common.grpcutil import Service, channel, intercepted
from vmattach.common.inprocess import InProcessChannel
from vmattach.common.secretbox import SecretBox
from vmattach.common.tls import TlsFiles
from vmattach.server.calls import ControllerCalls
from vmattach.server.facade import Facade
from vmattach.server.facade_servicer import SERVICE_NAME, ServersServicer
from vmattach.server.faults import Faults
from vmattach.server.models import MODELS, SCHEMA
from vmattach.server.nodes import NodeDirectory, parse_nodes
from vmattach.server.reconciler import Reconciler
from vmattach.v1 import controller_pb2_grpc, servers_pb2_grpc


def service_secret(settings: Settings) -> str:
    """The service token this deployment's processes accept (none with --auth none)."""
    if settings.auth == "none":
        return ""
    from vmattach.common.auth import service_token
    return service_token(settings.service_token_path())


def connector(settings: Settings, internal_address: str | None,
              service_secret: str, local: InProcessChannel | None = None,
              ) -> Callable[..., grpc.Channel]:
    """How the facade opens its channels to the Controller and the Nodes:
    to the services of its own process (an address local stands for), the
    in-process channel with the service token; otherwise with the service
    certificate over TLS when TLS is configured, in plain text (the
    process's own loopback server, or a deployment without TLS) with the
    service token."""
    files = TlsFiles.of(settings)
    token = [(SERVICE_HEADER, service_secret)] if service_secret else []

    def connect(address: str, **options) -> grpc.Channel:
        """options: more of common.grpcutil.channel's (retries, options)."""
        if local is not None and address in local.addresses:
            return intercepted(local, token)
        if files.enabled and address != internal_address:
            return channel(address, tls=files, **options)
        return channel(address, metadata=token, **options)

    return connect


def build_facade(settings: Settings, own_address: str, internal_address: str | None = None,
                 service_secret: str = "", local: InProcessChannel | None = None,
                 ) -> tuple[Facade, Callable[[], None]]:
    """The Facade with its database, its Controller channel and its nodes;
    returns it with the function that closes them."""
    db = open_database(settings.database_url_for("servers"), MODELS, SCHEMA,
                       upgrade=settings.db_upgrade)
    connect = connector(settings, internal_address, service_secret, local)
    nodes = NodeDirectory(db, parse_nodes(settings.nodes) or [("", own_address)], connect)
    controller_channel = connect(settings.controller_address or own_address)
    facade = Facade(db, ControllerCalls(controller_pb2_grpc.ControllerStub(controller_channel)),
                    nodes,
                    SecretBox.for_settings(settings, "servers-secret.key"),
                    Faults(settings.fault_injection),
                    max_volumes_per_server=settings.max_volumes_per_server,
                    owner_lease=settings.owner_lease)

    def close() -> None:
        nodes.close()
        controller_channel.close()
        close_database(db)

    return facade, close


def build(settings: Settings, own_address: str, internal_address: str | None = None,
          service_secret: str = "", local: InProcessChannel | None = None) -> Service:
    facade, close = build_facade(settings, own_address, internal_address, service_secret, local)
    facade.nodes.run_periodic(settings.server_refresh_interval)
    reconciler = Reconciler(facade, settings.owner_lease)
    reconciler.run_periodic(settings.reconcile_interval)
    # a node's lifecycle events (a domain undefined or destroyed) -> look at once
    facade.nodes.watch(facade.reap_vanished)
    # its database only: a Node or the Controller that is down is theirs to
    # report (ListNodes shows the Nodes); the facade still serves the others
    url = settings.database_url_for("servers")
    return Service(SERVICE_NAME, servers_pb2_grpc.add_ServersServicer_to_server,
                   ServersServicer(facade), on_stop=[reconciler.stop, close],
                   probes={"database": lambda: probe_database(url)})
