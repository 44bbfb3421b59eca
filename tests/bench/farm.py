"""The fake nodes of the scale benchmark, in one extra process: one Node
service per fake node (clients.serve.start with services=node on its own
loopback port, on a FakeHypervisor of its own), each hosting --domains
fake domains. Prints `ready ADDR,ADDR,...`; SIGTERM stops them all.

One process for 99 nodes is cheap and honest for what the facade sees: a
distinct address, node id and server list per node; the nodes' own cost is
not what the scale figure is about (each answers NodeGetInfo/ListServers at
the facade's refreshes)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from tests.bench.common import INITIATOR, node_id
from tests.bench.fakes import fake_hypervisor
from vmattach.clients.serve import start
from vmattach.common.config import Settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", required=True)
    p.add_argument("--first", type=int, default=1)
    p.add_argument("--nodes", type=int, default=99)
    p.add_argument("--domains", type=int, default=100)
    p.add_argument("--prefilled", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level="WARNING", stream=sys.stderr)
    running = []
    for n in range(args.first, args.first + args.nodes):
        state = Path(args.state_dir) / f"node-{n}"
        settings = Settings(services="node", listen="127.0.0.1:0", state_dir=str(state), auth="none",
                            node_id=node_id(n), initiator_iqn=INITIATOR, log_level="WARNING",
                            shutdown_delay=0)
        running.append(start(settings, hypervisor=fake_hypervisor(n, args.domains,
                                                                   args.prefilled)))
    print("ready " + ",".join(f"127.0.0.1:{r.port}" for r in running), flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    while not stopped.wait(0.2):
        pass
    for r in running:
        r.stop(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
