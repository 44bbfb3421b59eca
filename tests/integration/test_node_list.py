"""`ListNodes` (`vmattach node list`) from a facade in front of two real
Node services (fake hypervisor): a node that stops answering is shown down
within the facade's refresh interval even when no request goes to it, and
shown up again within the same time once it is back."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.client import VmattachClient

INTERVAL = 3.0      # the facade's --server-refresh-interval
POLL = 0.05


def _start_node(serve, tmp_path, name: str, port: int = 0):
    hv = FakeHypervisor()
    hv.add_domain()
    return serve(make_settings(tmp_path / name, services="node", node_id=name,
                               listen=f"127.0.0.1:{port}"), hypervisor=hv)


def _reachable(client: VmattachClient) -> dict[str, bool]:
    return {n.node_id: n.reachable for n in client.list_nodes()}


def _seconds_until(client: VmattachClient, node_id: str, reachable: bool,
                   limit: float) -> float:
    started = time.monotonic()
    while _reachable(client).get(node_id) is not reachable:
        if time.monotonic() - started > limit:
            pytest.fail(f"{node_id} not shown {'up' if reachable else 'down'} within {limit}s: "
                        f"{[(n.node_id, n.reachable, n.last_error) for n in client.list_nodes()]}")
        time.sleep(POLL)
    return time.monotonic() - started


def test_node_that_stops_answering_is_down_within_the_refresh_interval(tmp_path, serve):
    a = _start_node(serve, tmp_path, "node-a")
    b = _start_node(serve, tmp_path, "node-b")
    b_port = b.port
    facade = serve(make_settings(
        tmp_path / "facade", services="servers", controller_address="127.0.0.1:1",
        nodes=f"127.0.0.1:{a.port},127.0.0.1:{b_port}", server_refresh_interval=INTERVAL,
        reconcile_interval=3600))
    with VmattachClient(f"127.0.0.1:{facade.port}", timeout=10) as client:
        for node_id in ("node-a", "node-b"):   # the first refresh runs as the facade starts
            _seconds_until(client, node_id, True, limit=INTERVAL)
        nodes = {n.node_id: n for n in client.list_nodes()}
        assert (nodes["node-b"].address, nodes["node-b"].servers) == (f"127.0.0.1:{b_port}", 1)

        # node-b's host freezes: its port still takes connections, nothing answers
        b.stop(grace=0)
        with socket.create_server(("127.0.0.1", b_port)) as silent:
            took = _seconds_until(client, "node-b", False, limit=INTERVAL)
            down = {n.node_id: n for n in client.list_nodes()}
            assert down["node-a"].reachable and down["node-b"].last_error
            print(f"silent node-b shown down after {took:.2f}s (interval {INTERVAL}s)")
            # last_seen of a node nobody calls moves on (the heartbeat answered)
            seen = down["node-a"].last_seen.ToDatetime()
            time.sleep(INTERVAL / 2)
            assert client_node(client, "node-a").last_seen.ToDatetime() > seen
            silent.close()

        b = _start_node(serve, tmp_path, "node-b", port=b_port)
        took = _seconds_until(client, "node-b", True, limit=INTERVAL)
        print(f"node-b shown up {took:.2f}s after it came back")

        # node-b's process is gone: connections refused
        b.stop(grace=0)
        took = _seconds_until(client, "node-b", False, limit=INTERVAL)
        print(f"stopped node-b shown down after {took:.2f}s")
        assert client_node(client, "node-a").reachable


def client_node(client: VmattachClient, node_id: str):
    return {n.node_id: n for n in client.list_nodes()}[node_id]
