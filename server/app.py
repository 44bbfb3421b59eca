"""`vmattach serve`: the services of one process on one listening port."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc

from vmattach.common.config import Settings
from vmattach.common.grpcutil import Service, new_server, start_server
from vmattach.common.periodic import every
from vmattach.common.runner import CommandRunner

LOG = logging.getLogger(__name__)


def build_controller(settings: Settings, runner: CommandRunner) -> Service:
    from vmattach.common.db import close_database, open_database
    from vmattach.common.secretbox import SecretBox
    from vmattach.controller.models import MODELS, SCHEMA
    from vmattach.controller.servicer import SERVICE_NAME, ControllerServicer
    from vmattach.controller.tgt import TgtAdm, check_iqn_prefix
    from vmattach.controller.volumes import VolumeManager
    from vmattach.v1 import controller_pb2_grpc

    iqn_prefix = check_iqn_prefix(settings.iqn_prefix)
    db = open_database(settings.database_url_for("controller"), MODELS, SCHEMA,
                       upgrade=settings.db_upgrade)
    manager = VolumeManager(db, settings.volume_path(), TgtAdm(runner, settings.tgt_control_port),
                            settings.tgt_portal, SecretBox.from_state_dir(settings.state_dir),
                            settings.max_volume_gb, iqn_prefix=iqn_prefix)
    def ensure_exports() -> None:
        restored = manager.ensure_exports()
        if restored:
            LOG.warning("re-created %d tgt exports", restored)

    # at start, and every interval: a restarted tgtd has no targets
    manager.ensure_exports()
    stop = threading.Event()
    every(settings.reconcile_interval, ensure_exports, stop, "ensure-exports", now=False)
    return Service(SERVICE_NAME, controller_pb2_grpc.add_ControllerServicer_to_server,
                   ControllerServicer(manager), on_stop=[stop.set, lambda: close_database(db)])


def build_node(settings: Settings, runner: CommandRunner, hypervisor=None) -> Service:
    from vmattach.node.app import build, build_with
    if hypervisor is not None:  # tests and benchmarks pass a fake
        return build_with(settings, runner, hypervisor)
    return build(settings, runner)


def build_servers(settings: Settings, own_address: str) -> Service:
    from vmattach.server.facade_app import build
    return build(settings, own_address)


class Running:
    """A started vmattach server: its port, services and a stop()."""

    def __init__(self, server: grpc.Server, port: int, services: list[Service],
                 internal: grpc.Server | None = None):
        self.server, self.port, self.services, self.internal = server, port, services, internal

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace).wait()
        if self.internal is not None:
            self.internal.stop(grace).wait()
        for svc in self.services:
            for hook in svc.on_stop:
                hook()


def start(settings: Settings, runner: CommandRunner | None = None, hypervisor=None,
          interceptors: Sequence[grpc.ServerInterceptor] = ()) -> Running:
    """Bind, build the services, start. The servers facade talks to the
    Controller and Node of its own process (unless other addresses are
    configured) through a second, loopback-only server with threads of its
    own, so that facade calls in flight can never starve the calls they make.
    Tests pass interceptors (both servers get them) to record or delay calls."""
    names = settings.service_list()
    runner = runner or CommandRunner()
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    server, port = new_server(settings.listen, interceptors=interceptors)
    services: list[Service] = []
    if "controller" in names:
        services.append(build_controller(settings, runner))
    if "node" in names:
        services.append(build_node(settings, runner, hypervisor))
    internal = None
    if "servers" in names:
        own_address = settings.listen.rsplit(":", 1)[0] + f":{port}"
        if services:
            internal, internal_port = new_server("127.0.0.1:0", interceptors=interceptors)
            start_server(internal, services)
            own_address = f"127.0.0.1:{internal_port}"
        services.append(build_servers(settings, own_address))
    start_server(server, services)
    return Running(server, port, services, internal)


def serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    running = start(settings)
    host = settings.listen.rsplit(":", 1)[0]
    print(f"listening on {host}:{running.port}", flush=True)
    LOG.info("serving %s on port %d (pid %d)", settings.services, running.port, os.getpid())
    stopped = threading.Event()

    def on_signal(signum, frame):
        LOG.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    running.stop()
    LOG.info("stopped")
    return 0
