"""The facade's servers refresh against three real Node services (fake
hypervisor): the periodic one paces itself after each node's answer (at a
cell's 1,000 nodes it is seconds of CPU), and a request that waits for a
refresh (an attach to a server the cache does not know yet) turns the pace
off instead of waiting for it."""

from __future__ import annotations

import threading
import time

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.common.db import open_database
from vmattach.common.grpcutil import channel
from vmattach.server.models import MODELS, SCHEMA
from vmattach.server.nodes import NodeDirectory


def _directory(tmp_path, serve, count: int = 3) -> tuple[NodeDirectory, list[FakeHypervisor]]:
    hvs, addresses = [], []
    for k in range(count):
        hv = FakeHypervisor()
        hv.add_domain()
        running = serve(make_settings(tmp_path / f"node-{k}", services="node",
                                      node_id=f"node-{k}"), hypervisor=hv)
        hvs.append(hv)
        addresses.append(f"127.0.0.1:{running.port}")
    db = open_database(f"sqlite:///{tmp_path / 'servers.db'}", MODELS, SCHEMA)
    return NodeDirectory(db, addresses, lambda a, **kw: channel(a, **kw)), hvs


def test_a_paced_refresh_pauses_after_each_node_and_stores_them_all(tmp_path, serve):
    nodes, hvs = _directory(tmp_path, serve)
    try:
        paces: list[float] = []
        nodes.refresh(pace=lambda: paces.append(time.monotonic()))
        assert len(paces) == 3
        assert {nodes.known_server(uuid).node_id for hv in hvs for uuid in hv.domains} == \
            {"node-0", "node-1", "node-2"}
    finally:
        nodes.close()


def test_a_request_waiting_for_a_refresh_turns_the_pace_off(tmp_path, serve):
    nodes, hvs = _directory(tmp_path, serve)
    try:
        new = hvs[2].add_domain().uuid  # a server the cache does not know yet
        paces: list[float] = []
        found: list = []

        def request():  # an attach to it: one refresh, at once
            found.append(nodes.server(new))

        waiter = threading.Thread(target=request)

        def slow_pace():  # the periodic refresh's first pause: a request comes meanwhile
            paces.append(time.monotonic())
            if len(paces) == 1:
                waiter.start()
                time.sleep(0.5)

        nodes.refresh(pace=slow_pace)
        waiter.join(10)
        assert len(paces) == 1  # no pause after the request came
        assert found[0].node_id == "node-2"
    finally:
        nodes.close()


def test_a_refresh_of_some_nodes_asks_only_them_and_leaves_the_full_one_due(tmp_path, serve):
    """The heartbeat refreshes only the nodes that reported a change: a
    request that needs every node still gets a full refresh."""
    nodes, hvs = _directory(tmp_path, serve)
    try:
        nodes.refresh(only={nodes.addresses[0]})
        [first] = hvs[0].domains
        assert nodes.known_server(first).node_id == "node-0"
        assert all(nodes.known_server(uuid) is None for hv in hvs[1:] for uuid in hv.domains)
        [last] = hvs[2].domains
        assert nodes.server(last).node_id == "node-2"  # a refresh of every node
    finally:
        nodes.close()
