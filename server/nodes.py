"""The facade's directory of nodes and of the servers they host.

Nodes are configured by address (setting `nodes`); each node's id comes
from its NodeGetInfo. The servers are cached in the facade's database from
each node's ListServers: at start, every `server_refresh_interval` seconds,
and whenever a request names a server the cache does not know yet."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import peewee

from vmattach.common.db import Prepared, utcnow, with_connection
from vmattach.common.errors import NotFound, Unavailable, VmattachError
from vmattach.common.grpcutil import call, channel
from vmattach.common.periodic import every
from vmattach.server.models import ServerRecord
from vmattach.v1 import node_pb2 as npb
from vmattach.v1 import node_pb2_grpc

LOG = logging.getLogger(__name__)
NODE_CALL_TIMEOUT = 10.0
# lifecycle events after which a domain may no longer exist
GONE_EVENTS = frozenset({"undefined", "stopped", "crashed"})
_SERVER = Prepared(lambda s: ServerRecord.select().where(ServerRecord.server_id == s), 1)


@dataclass
class NodeHandle:
    node_id: str
    address: str
    stub: node_pb2_grpc.NodeStub
    max_volumes_per_server: int


class NodeDirectory:
    def __init__(self, db: peewee.Database, addresses: list[str],
                 connect: Callable[[str], grpc.Channel] = channel):
        self.db = db
        self.addresses = addresses
        self._channels = {a: connect(a) for a in addresses}
        self._nodes: dict[str, NodeHandle] = {}
        self._refresh_lock = threading.Lock()
        self._refreshed_at = 0.0
        self._stop = threading.Event()

    def close(self) -> None:
        self._stop.set()
        for ch in self._channels.values():
            ch.close()

    # -- refreshing the cache -----------------------------------------------------------

    @with_connection
    def refresh(self, if_older_than: float | None = None) -> None:
        """Ask every node for its servers. With if_older_than, skip when a
        refresh that started after that moment has finished (many callers
        wait for one; a refresh that was already asking the nodes when the
        caller came may have missed the server it is looking for)."""
        with self._refresh_lock:
            if if_older_than is not None and self._refreshed_at > if_older_than:
                return
            started = time.monotonic()
            for address in self.addresses:
                try:
                    self._refresh_node(address)
                except VmattachError as exc:
                    LOG.warning("node at %s did not answer: %s", address, exc.message)
            self._refreshed_at = started

    def _refresh_node(self, address: str) -> None:
        stub = node_pb2_grpc.NodeStub(self._channels[address])
        info = call(stub.NodeGetInfo, npb.NodeGetInfoRequest(), timeout=NODE_CALL_TIMEOUT)
        servers = call(stub.ListServers, npb.NodeListServersRequest(),
                       timeout=NODE_CALL_TIMEOUT).servers
        self._nodes[info.node_id] = NodeHandle(info.node_id, address, stub,
                                               info.max_volumes_per_server or 26)
        fields = ("name", "state", "device_prefix", "root_device", "disks", "node_id")
        reported = {s.server_id: (s.name, s.state, s.device_prefix or "vd", s.root_device,
                                  json.dumps([{"device": d.device, "serial": d.serial,
                                               "bus": d.bus} for d in s.disks]), info.node_id)
                    for s in servers}
        # write only what changed: a refresh of thousands of unchanged servers is one read
        known = {row[0]: row[1:] for row in ServerRecord.select(
            ServerRecord.server_id, *(getattr(ServerRecord, f) for f in fields))
            .where(ServerRecord.node_id == info.node_id).tuples()}
        now = utcnow()
        changed = [dict(zip(("server_id", *fields, "updated_at"), (sid, *values, now),
                            strict=True))
                   for sid, values in reported.items() if known.get(sid) != values]
        gone = [sid for sid in known if sid not in reported]
        if not changed and not gone:
            return
        with self.db.atomic():
            for start in range(0, len(changed), 200):
                (ServerRecord.insert_many(changed[start:start + 200])
                 .on_conflict(conflict_target=[ServerRecord.server_id],
                              preserve=[*(getattr(ServerRecord, f) for f in fields),
                                        ServerRecord.updated_at])
                 .execute())
            for start in range(0, len(gone), 200):
                ServerRecord.delete().where(
                    ServerRecord.server_id.in_(gone[start:start + 200])
                    & (ServerRecord.node_id == info.node_id)).execute()

    def watch(self, on_change: Callable[[set[str]], object], wait: int = 20) -> None:
        """Follow every node's lifecycle events (NodeWatchServers, a long poll,
        one thread per node): when a domain was undefined, stopped, started,
        ..., refresh the cache and call on_change({node id}) at once instead of
        at the next periodic refresh."""
        for address in self.addresses:
            threading.Thread(target=self._watch, args=(address, on_change, wait), daemon=True,
                             name=f"watch-{address}").start()

    def _watch(self, address: str, on_change: Callable[[set[str]], object], wait: int) -> None:
        stub = node_pb2_grpc.NodeStub(self._channels[address])
        epoch, after = "", 0
        while not self._stop.is_set():
            try:
                answer = call(stub.NodeWatchServers, npb.NodeWatchServersRequest(
                    after_seq=after, wait_seconds=wait), timeout=wait + NODE_CALL_TIMEOUT)
            except VmattachError as exc:
                if not self._stop.is_set():
                    LOG.debug("watching node at %s: %s", address, exc.message)
                self._stop.wait(2.0)
                continue
            restarted = bool(epoch) and answer.epoch != epoch
            epoch, after = answer.epoch, answer.last_seq
            # a domain that went (undefined, or a transient one stopped): look now. A
            # new domain waits for the periodic refresh or the first request naming it
            gone = [e for e in answer.events if e.event in GONE_EVENTS]
            if not (gone or answer.events_lost or restarted) or self._stop.is_set():
                continue
            LOG.info("node at %s: %d domain(s) undefined or stopped", address, len(gone))
            try:
                self.refresh()
                on_change({h.node_id for h in self._nodes.values() if h.address == address})
            except Exception:  # noqa: BLE001 - the watch must go on; the periodic run retries
                LOG.exception("reacting to the events of node at %s failed", address)

    def run_periodic(self, interval: float) -> threading.Thread:
        """Refresh now (at start), then every interval."""
        return every(interval, self.refresh, self._stop, "server-refresh")

    # -- lookups ----------------------------------------------------------------------

    def handles(self) -> list[NodeHandle]:
        """The nodes that answered the last refresh."""
        return list(self._nodes.values())

    def node(self, node_id: str) -> NodeHandle:
        handle = self._nodes.get(node_id)
        if handle is None:
            self.refresh(if_older_than=time.monotonic())
            handle = self._nodes.get(node_id)
        if handle is None:
            raise Unavailable(f"node {node_id} is not reachable", reason="NODE_UNAVAILABLE",
                              metadata={"node_id": node_id})
        return handle

    @with_connection
    def known_server(self, server_id: str) -> ServerRecord | None:
        """The cached server, or None (no refresh)."""
        return _SERVER.first(server_id)

    @with_connection
    def server(self, server_id: str) -> ServerRecord:
        record = _SERVER.first(server_id)
        if record is None:
            self.refresh(if_older_than=time.monotonic())
            record = _SERVER.first(server_id)
        if record is None:
            raise NotFound(f"Server {server_id} could not be found.", reason="SERVER_NOT_FOUND",
                           metadata={"server_id": server_id})
        return record

    @with_connection
    def list_servers(self, page_size: int, page_token: str) -> tuple[list[ServerRecord], str]:
        query = ServerRecord.select().order_by(ServerRecord.server_id)
        if page_token:
            query = query.where(ServerRecord.server_id > page_token)
        rows = list(query.limit(page_size + 1))
        token = rows[page_size - 1].server_id if len(rows) > page_size else ""
        return rows[:page_size], token
