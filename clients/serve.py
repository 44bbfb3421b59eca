"""`vmattach serve`: the services of one process on one listening port.

The one module that wires the Controller (controller/app.py), the Node
(node/app.py) and the servers facade (server/app.py) together: nothing else
imports more than one of controller/, node/ and server/
(tests/unit/test_import_map.py holds that)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from vmattach.common import auth, tls
from vmattach.common import observability as obs
from vmattach.common.config import Settings
from vmattach.common.db import probe_database
from vmattach.common.grpcutil import (
    CallLimits,
    ErrorInterceptor,
    Service,
    new_server,
    start_server,
)
from vmattach.common.health import Health
from vmattach.common.inprocess import Dispatcher, InProcessChannel
from vmattach.common.runner import CommandRunner
from vmattach.common.turns import Turns
from vmattach.common.version import version
from vmattach.controller import app as controller_app
from vmattach.controller import models as controller_models
from vmattach.controller.servicer import SERVICE_NAME as CONTROLLER_SERVICE
from vmattach.controller.tgtd_socket import TgtdSocketRunner
from vmattach.node import app as node_app
from vmattach.node.servicer import SERVICE_NAME as NODE_SERVICE
from vmattach.server import app as servers_app
from vmattach.server import models as servers_models
from vmattach.server.bdms import BdmStore
from vmattach.server.facade_servicer import SERVICE_NAME as SERVERS_SERVICE

LOG = logging.getLogger(__name__)

# Where each service keeps secrets at rest, for `vmattach rotate-key`:
# (service, key file, its models, the function that re-encrypts its rows).
SECRET_STORES = [
    ("controller", "secret.key", controller_models.MODELS, controller_models.rotate_secrets),
    ("servers", "servers-secret.key", servers_models.MODELS, BdmStore.rotate_secrets),
]


# the gRPC service of each name of --services
SERVICE_NAMES = {"controller": CONTROLLER_SERVICE, "node": NODE_SERVICE,
                 "servers": SERVERS_SERVICE}


def call_limits(settings: Settings, names: Sequence[str]) -> CallLimits:
    """The in-flight limit of each of these services (settings' *_max_calls)."""
    return CallLimits({SERVICE_NAMES[name]: settings.max_calls(name) for name in names})


class Running:
    """A started vmattach server: its port, services and a stop()."""

    def __init__(self, server: grpc.Server, port: int, services: list[Service],
                 internal: grpc.Server | None = None, on_stop=(), health: Health | None = None,
                 shutdown_delay: float = 0.0):
        self.server, self.port, self.services, self.internal = server, port, services, internal
        self.on_stop = list(on_stop)
        self.authenticator: auth.Authenticator | None = None
        # the facade's channel to the services of this process (common/inprocess.py)
        self.local: InProcessChannel | None = None
        self.health = health or Health()
        self.shutdown_delay = shutdown_delay
        self._stopping = threading.Lock()
        self._stopped = False

    def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING first, then shutdown_delay seconds of serving on (a
        load balancer polling health takes the process out meanwhile, and
        watchers see it), then the port closes and the calls in flight get
        grace seconds. Once: a second stop() waits for the first and returns."""
        with self._stopping:
            if self._stopped:
                return
            self._stopped = True
            self.health.shutdown()
            if self.shutdown_delay > 0:
                LOG.info("stopping in %g s (health NOT_SERVING meanwhile)", self.shutdown_delay)
                time.sleep(self.shutdown_delay)
            self.server.stop(grace).wait()
            # the facade's own work (node heartbeats and watches, the reconciler)
            # ends before the internal server it calls does: no "node does not
            # answer" at every stop
            facade = [svc for svc in self.services if svc.name == SERVERS_SERVICE]
            for svc in facade:
                for hook in svc.on_stop:
                    hook()
            if self.internal is not None:
                self.internal.stop(grace).wait()
            for svc in self.services:
                if svc not in facade:
                    for hook in svc.on_stop:
                        hook()
            for hook in self.on_stop:
                hook()


def private_state_dir(settings: Settings) -> None:
    """The state directory exists and only its owner may enter it."""
    path = Path(settings.state_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def authenticator(settings: Settings, names: list[str]) -> tuple[auth.Authenticator, list]:
    """The Authenticator of this process and the hooks that close it."""
    if settings.auth == "none":
        return auth.Authenticator("none"), []
    secret = auth.service_token(settings.service_token_path())
    if not {"controller", "servers"} & set(names):
        return auth.Authenticator("token", None, secret), []  # a Node: internal RPCs only
    from vmattach.common.db import close_database, open_database
    db = open_database(settings.database_url_for("auth"), auth.MODELS, auth.SCHEMA,
                       upgrade=settings.db_upgrade)
    return (auth.Authenticator("token", auth.TokenStore(db), secret),
            [lambda: close_database(db)])


def start(settings: Settings, runner: CommandRunner | None = None, hypervisor=None,
          interceptors: Sequence[grpc.ServerInterceptor] = ()) -> Running:
    """Bind, build the services, start. The servers facade calls the
    Controller and Node of its own process (unless other addresses are
    configured) in-process (common/inprocess.py), in the thread of the call
    it serves, or with internal_calls = "grpc" through a second,
    loopback-only server with threads of its own; either way facade calls
    in flight can never starve the calls they make. Tests pass interceptors
    (the public server and the facade's own calls get them) to record or
    delay calls."""
    names = settings.service_list()
    health = Health(settings.health_interval)
    tls.check_listen(settings)
    if runner is None:
        runner = CommandRunner()
        if settings.tgt_control == "socket":  # tgtadm's requests, without its process
            runner = TgtdSocketRunner(runner)
    private_state_dir(settings)
    authn, closers = authenticator(settings, names)
    files = tls.TlsFiles.of(settings)
    credentials = files.server_credentials() if files.enabled else None
    turns = Turns() if settings.call_turns else None
    server, port = new_server(settings.listen, interceptors=interceptors,
                              credentials=credentials, authenticator=authn,
                              limits=call_limits(settings, names), turns=turns)
    services: list[Service] = []
    if "controller" in names:
        services.append(controller_app.build(settings, runner))
    if "node" in names:
        # tests and benchmarks pass a fake hypervisor
        services.append(node_app.build(settings, runner) if hypervisor is None
                        else node_app.build_with(settings, runner, hypervisor))
    internal = None
    local: InProcessChannel | None = None
    if "servers" in names:
        own_address = settings.listen.rsplit(":", 1)[0] + f":{port}"
        internal_address = None
        if services:
            # the facade's own calls have limits of their own, apart from the public port's
            internal_limits = call_limits(settings, [n for n in names if n != "servers"])
            if settings.internal_calls == "in-process":
                # called in the facade's threads, through the interceptors of a server
                local = InProcessChannel(Dispatcher(
                    services, [*interceptors, ErrorInterceptor(authn, internal_limits, turns)]),
                    [own_address])
            else:
                # loopback only, plain text: the facade's calls carry the service token
                internal, internal_port = new_server(
                    "127.0.0.1:0", interceptors=interceptors, authenticator=authn,
                    limits=internal_limits, turns=turns)
                start_server(internal, services, health)
                own_address = internal_address = f"127.0.0.1:{internal_port}"
        services.append(servers_app.build(settings, own_address, internal_address,
                                          authn.service_secret, local))
    if authn.tokens is not None:  # the public calls of these services need the user tokens
        tokens = settings.database_url_for("auth")
        for svc in services:
            if svc.name in (CONTROLLER_SERVICE, SERVERS_SERVICE):
                svc.probes["token database"] = lambda: probe_database(tokens)
    start_server(server, services, health)
    health.watch((svc.name, svc.probes) for svc in services)
    running = Running(server, port, services, internal, closers, health,
                      settings.shutdown_delay)
    running.authenticator = authn
    running.local = local
    return running


def upgrade_databases(settings: Settings) -> list[tuple[str, int | None, int]]:
    """`vmattach db upgrade`: the schema of each database of settings'
    services (and of the user tokens where public services run) brought to
    this version; (service, version found, version now)."""
    from vmattach.common import migrations
    from vmattach.common.db import close_database, connect_database
    from vmattach.controller import models as controller_models
    from vmattach.server import models as server_models
    schemas = {"controller": controller_models.SCHEMA, "servers": server_models.SCHEMA,
               "auth": auth.SCHEMA}
    private_state_dir(settings)
    done = []
    names = settings.service_list()
    if settings.auth != "none" and {"controller", "servers"} & set(names):
        names.append("auth")
    for name in names:
        if name not in schemas:
            continue  # the Node keeps no database
        schema = schemas[name]
        db = connect_database(settings.database_url_for(name), schema.models)
        try:
            found, now = migrations.upgrade(db, schema)
        finally:
            close_database(db)
        done.append((name, found, now))
    return done


def serve(settings: Settings, hypervisor=None) -> int:
    """Run until SIGTERM/SIGINT. Prints `listening on HOST:PORT` and, with
    metrics_listen, `metrics on HOST:PORT` on the next line. (hypervisor:
    tests pass a fake one.)"""
    obs.setup_logging(settings.log_level, settings.log_format)
    obs.setup_tracing(settings.tracing, f"vmattach-{settings.services.replace(',', '-')}")
    metrics = None
    if settings.metrics_listen:  # first: a typo or a port in use fails before anything starts
        metrics_host, metrics_port, metrics = obs.start_metrics_server(settings.metrics_listen)
    try:
        running = start(settings, hypervisor=hypervisor)
    except BaseException:
        if metrics is not None:
            metrics.shutdown()
        raise
    if settings.auth == "none":
        LOG.warning("--auth none: every caller on this host may call every RPC, unauthenticated")
    host = settings.listen.rsplit(":", 1)[0]
    print(f"listening on {host}:{running.port}", flush=True)
    if metrics is not None:
        print(f"metrics on {metrics_host}:{metrics_port}", flush=True)
    LOG.info("vmattach %s serving %s on port %d (pid %d)", version(), settings.services,
             running.port, os.getpid())
    stopped = threading.Event()

    def on_signal(signum, frame):
        LOG.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    running.stop()
    if metrics is not None:
        metrics.shutdown()
    LOG.info("stopped")
    return 0
