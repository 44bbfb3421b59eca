"""The benchmark's vmattach server: the three services in one process (the
all-in-one), built with clients.serve.start, the Node on the FAKE hypervisor
with N fake domains, the Controller on SQLite with a fake or a real tgtd.

    python -m tests.bench.server --state-dir D --domains 64 [--tgt fake|real]
        [--farm HOST:PORT,...] [--prefilled] [--count-calls FILE]
        [--internal-calls in-process|grpc] [--call-turns on|off]

One start() of the three services, as `vmattach serve` runs them; with
--farm, the facade's `nodes` setting lists this process's own port first
(its Node, called as the facade calls its own process's services:
`internal_calls`) and then the fake nodes of the farm process
(tests/bench/farm.py). With `--role node`,
`--role controller` or `--role servers --controller HOST:PORT --farm
NODE_ADDRESSES`, one service only: the services apart, one process each, as
a deployment runs them. Prints
`listening on 127.0.0.1:PORT` (the Controller + Servers port) and serves
until SIGTERM. With --count-calls, every gRPC call the facade makes goes
through a counting client interceptor and SIGUSR1 writes the counts (JSON)
to FILE, with the SQL statements SQLite ran in this process (all three
services: tests/support/sql_counter.py) under the key "sql"; the periodic
refresh and reconciler are then off, so that only requests are counted."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import socket
import sys
import threading
from contextlib import ExitStack

import grpc

from tests.bench.common import INITIATOR, node_id
from tests.bench.fake_tgtd import fake_tgtd
from tests.bench.fakes import fake_hypervisor
from vmattach.clients.serve import start
from vmattach.common.config import Settings


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        with self._lock:
            self.counts[details.method] += 1
        return continuation(details, request)


def install_counter() -> tuple[CountingInterceptor, CountingInterceptor]:
    """Wrap every channel the facade opens (to the Controller and the Nodes):
    the counts of all its calls, and of those made in-process."""
    import vmattach.server.app
    import vmattach.server.nodes
    from vmattach.common.grpcutil import channel as plain_channel
    from vmattach.common.grpcutil import intercepted as plain_intercepted
    counter, in_process = CountingInterceptor(), CountingInterceptor()

    def counting_channel(address: str, retries: bool = True, **kw):
        return grpc.intercept_channel(plain_channel(address, retries, **kw), counter)

    def counting_intercepted(ch, metadata=()):
        return grpc.intercept_channel(plain_intercepted(ch, metadata), counter, in_process)

    vmattach.server.app.channel = counting_channel
    vmattach.server.app.intercepted = counting_intercepted
    vmattach.server.nodes.channel = counting_channel
    return counter, in_process


def memory_log(path: str) -> None:
    """VMATTACH_BENCH_MEMLOG=FILE (a diagnosis aid, off by default): append
    `seconds rss_mb threads` to FILE every second; with
    VMATTACH_BENCH_TRACEMALLOC=1 also trace Python allocations and, on
    SIGUSR2, write the biggest allocation sites (and the traced peak) to
    FILE.top."""
    import time
    import tracemalloc

    from tests.bench.common import vm_rss_mb
    traced = os.environ.get("VMATTACH_BENCH_TRACEMALLOC") == "1"
    if traced:
        tracemalloc.start(8)

    def top(*_):
        if not traced:
            return
        snap = tracemalloc.take_snapshot()
        current, peak = tracemalloc.get_traced_memory()
        with open(path + ".top", "a") as fh:
            fh.write(f"traced now {current / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB,"
                     f" rss {vm_rss_mb(os.getpid()):.1f} MB\n")
            for stat in snap.statistics("lineno")[:25]:
                fh.write(f"  {stat}\n")
            for stat in snap.statistics("traceback")[:6]:
                fh.write(f"{stat}\n" + "\n".join("    " + ln for ln in stat.traceback.format())
                         + "\n")

    def sample():
        t0 = time.monotonic()
        while True:
            with open(path, "a") as fh:
                fh.write(f"{time.monotonic() - t0:.0f} {vm_rss_mb(os.getpid()):.1f}"
                         f" {threading.active_count()}\n")
            time.sleep(1.0)

    signal.signal(signal.SIGUSR2, top)
    threading.Thread(target=sample, daemon=True, name="bench-memlog").start()


def main(argv=None) -> int:
    with ExitStack() as stack:
        return serve(stack, argv)


def serve(stack: ExitStack, argv=None) -> int:
    if os.environ.get("VMATTACH_BENCH_MEMLOG"):
        memory_log(os.environ["VMATTACH_BENCH_MEMLOG"])
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", required=True)
    p.add_argument("--domains", type=int, default=64)
    p.add_argument("--tgt", choices=["fake", "real"], default="fake")
    p.add_argument("--tgt-portal", default="127.0.0.1:3260")
    p.add_argument("--tgt-control-port", type=int, default=0)
    p.add_argument("--farm", default="",
                   help="addresses of more Nodes: the farm's fake nodes (with --role servers, the"
                        " Node of --role node)")
    p.add_argument("--prefilled", action="store_true")
    p.add_argument("--count-calls", default="")
    p.add_argument("--role", choices=["all", "node", "controller", "servers"], default="all",
                   help="all three services (the all-in-one) or one of them")
    p.add_argument("--controller", default="", help="the Controller's address (--role servers)")
    p.add_argument("--secure", action="store_true",
                   help="the secure default: mutual TLS (certificates of vmattach pki init in"
                        " STATE/pki) and tokens (an admin token written to STATE/bench.token);"
                        " otherwise --auth none in plain text")
    # the Controller's periodic re-export and the facade's reconciler run at the
    # default interval during the measured runs, as in production
    p.add_argument("--reconcile-interval", type=float, default=10.0)
    p.add_argument("--call-turns", choices=["on", "off"], default="on",
                   help="the setting call_turns (off: to measure what turns buy)")
    p.add_argument("--internal-calls", choices=["in-process", "grpc"], default="in-process",
                   help="how the all-in-one's facade calls its own Controller and Node")
    args = p.parse_args(argv)
    if args.role != "all" and (args.secure or args.count_calls or args.prefilled):
        p.error("--secure, --count-calls and --prefilled are for --role all")
    logging.basicConfig(level="WARNING", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    counter, in_process = install_counter() if args.count_calls else (None, None)
    sql = None
    refresh_interval = 30.0
    if args.count_calls:
        from tests.support import sql_counter
        sql = sql_counter.install()
        args.reconcile_interval = refresh_interval = 3600.0
    runner = None
    if args.tgt == "fake":
        # the fake tgtd runs in a process of its own: the figures are vmattach's memory
        runner = stack.enter_context(fake_tgtd(
            f"{args.state_dir}/controller.db" if args.prefilled else None))

    security: dict = {"auth": "none"}
    if args.secure:
        from pathlib import Path

        from vmattach.common import pki
        certs = Path(args.state_dir) / "pki"
        if not (certs / "ca.crt").exists():
            pki.init(certs, ["127.0.0.1"])
        security = {"auth": "token", "tls_cert": str(certs / "service.crt"),
                    "tls_key": str(certs / "service.key"), "tls_ca": str(certs / "ca.crt")}
    nodes = [a for a in args.farm.split(",") if a]
    listen = "127.0.0.1:0"
    if args.role == "all" and nodes:
        listen = f"127.0.0.1:{free_port()}"
        nodes.insert(0, listen)  # its own Node first
    services = {"all": "controller,node,servers", "node": "node", "controller": "controller",
                "servers": "servers"}[args.role]
    settings = Settings(services=services, listen=listen, **security,
                        state_dir=args.state_dir, tgt_portal=args.tgt_portal,
                        tgt_control_port=args.tgt_control_port, nodes=",".join(nodes),
                        controller_address=args.controller, node_id=node_id(0),
                        initiator_iqn=INITIATOR, internal_calls=args.internal_calls,
                        log_level="WARNING", reconcile_interval=args.reconcile_interval,
                        server_refresh_interval=refresh_interval, shutdown_delay=0,
                        call_turns=args.call_turns == "on")
    hypervisor = None
    if args.role in ("all", "node"):
        hypervisor = fake_hypervisor(0, args.domains, args.prefilled)
    running = start(settings, runner=runner, hypervisor=hypervisor)
    if args.secure and running.authenticator is not None and running.authenticator.tokens:
        token, _ = running.authenticator.tokens.create("bench", "admin")
        fd = os.open(f"{args.state_dir}/bench.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
    print(f"listening on 127.0.0.1:{running.port}", flush=True)

    stopped = threading.Event()

    def dump(*_):
        if counter is not None:
            with open(args.count_calls + ".tmp", "w") as fh:
                json.dump({"grpc": dict(counter.counts), "in_process": dict(in_process.counts),
                           "sql": sql.snapshot() if sql is not None else {}}, fh)
            os.replace(args.count_calls + ".tmp", args.count_calls)

    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    signal.signal(signal.SIGUSR1, dump)
    while not stopped.wait(0.2):
        pass
    running.stop(1)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
