"""A Controller and a Node in one process, the Node on a FakeHypervisor with
servers of fixed ids: for tests that need dozens of servers behind a Node
in another process (real libvirt domains are too dear for that).

    python -m tests.support.fake_node_server --servers 10 --seed s1 \\
        --state-dir DIR --tgt-portal ... --tgt-control-port ... [serve flags]

takes every flag of `vmattach serve` (default services: controller,node),
creates the servers server_uuids(seed, count), prints `listening on
HOST:PORT` and serves until SIGTERM. On SIGUSR1 it writes the hypervisor's
state (domains with their disks, secrets) to the --dump file as JSON (written
whole, then renamed into place). Tests only."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import uuid

from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.common import config

NAMESPACE = uuid.UUID("1b0c7d5e-3f0a-4c55-9a51-6a7d3c1f2e90")


def server_uuids(seed: str, count: int) -> list[str]:
    return [str(uuid.uuid5(NAMESPACE, f"{seed}/{i}")) for i in range(count)]


def hypervisor_state(hv: FakeHypervisor) -> dict:
    return {"domains": [{"uuid": d.uuid, "name": d.name, "state": d.state, "active": d.active,
                         "persistent": d.persistent,
                         "disks": [{"device": k.device, "bus": k.bus, "serial": k.serial,
                                    "alias": k.alias} for k in d.disks]}
                        for d in hv.list_domains()],
            "secrets": hv.secret_usages()}


def write_dump(hv: FakeHypervisor, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(hypervisor_state(hv), fh)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_node_server", description=__doc__)
    parser.add_argument("--servers", type=int, default=10, help="servers (domains) to create")
    parser.add_argument("--seed", default="vmattach", help="derives the servers' uuids")
    parser.add_argument("--dump", help="where SIGUSR1 writes the hypervisor's state")
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.services is None:
        args.services = "controller,node"
    settings = config.load(args)
    hv = FakeHypervisor()
    for i, server_id in enumerate(server_uuids(args.seed, args.servers)):
        hv.add_domain(f"instance-{i:04d}", uuid=server_id)
    if args.dump:
        signal.signal(signal.SIGUSR1, lambda *_: write_dump(hv, args.dump))
    # what `vmattach serve` does (logs, metrics, signals), on the fake hypervisor
    from vmattach.clients.serve import serve
    return serve(settings, hypervisor=hv)


if __name__ == "__main__":
    sys.exit(main())
