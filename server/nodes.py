"""The facade's directory of nodes and of the servers they host.

Nodes are configured by address (setting `nodes`: `HOST:PORT` or
`NODE_ID=HOST:PORT`); each node's id comes from its NodeGetInfo. The
servers are cached in the facade's database from each node's ListServers:
at start, every `server_refresh_interval` seconds, and whenever a request
names a server the cache does not know yet.

The directory also keeps each node's health (reachable, last seen, last
error), shown by ListNodes: a heartbeat asks every node for its lifecycle
events (NodeWatchServers, no wait) four times per refresh interval, so that
a node that stops answering is shown down within one interval even when no
request goes to it, and a server undefined behind the facade's back is
noticed within a quarter of it. A call to a node
that fails with UNAVAILABLE or DEADLINE_EXCEEDED is followed by a short
probe; when the probe fails too, the node is down, and until it answers
again every call to it fails at once (after a new probe at most every
REPROBE_AFTER seconds) with UNAVAILABLE naming the node, so that an attach
to a server on a lost host fails well within its deadline and undo steps
towards it are left to the reconciler."""

from __future__ import annotations

import collections
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import peewee

from vmattach.common import auth, pagetoken
from vmattach.common.db import Prepared, utcnow, with_connection
from vmattach.common.enums import BUS, SERVER_STATE
from vmattach.common.errors import (
    DeadlineExceeded,
    NotFound,
    Unavailable,
    VmattachError,
)
from vmattach.common.grpcutil import call, channel, error_from_rpc
from vmattach.common.periodic import BACKGROUND_SHARE, Pacer, every, no_pause
from vmattach.common.rules import MAX_VOLUMES_PER_SERVER
from vmattach.common.turns import holding, result
from vmattach.server.models import BlockDeviceMapping, ServerRecord
from vmattach.v1 import node_pb2 as npb
from vmattach.v1 import node_pb2_grpc

LOG = logging.getLogger(__name__)
NODE_CALL_TIMEOUT = 10.0      # a refresh's calls
READ_TIMEOUT = 5.0            # the read-only calls of a flow (NodeGetInfo)
PROBE_TIMEOUT = 2.0           # is the node there at all?
# kept back from a node call's time, so that when the node is lost the facade can
# still probe it, roll back and answer (UNAVAILABLE naming it) within its caller's deadline
ANSWER_MARGIN = 5.0
REPROBE_AFTER = 1.0           # a down node is probed again at most this often
OLD_CHANNEL_GRACE = 120.0     # a replaced channel is closed this much later
# a refresh stores each node's servers as its answer comes, with at most this many
# answers asked for ahead (all 1,000 nodes' answers at once were 100,000 servers)
REFRESH_AHEAD = 32
READ_ONLY = ("NodeGetInfo", "ListServers", "ListSecrets")
# reconnect soon after a host comes back (gRPC's default back-off grows to 120 s);
# a channel of its own connections (gRPC shares them between channels of the same
# target and arguments, and a new channel must not inherit a dead connection)
NODE_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000), ("grpc.use_local_subchannel_pool", 1)]
# lifecycle events after which a domain may no longer exist
GONE_EVENTS = frozenset({"undefined", "stopped", "crashed"})
_SERVER = Prepared(lambda s: ServerRecord.select().where(ServerRecord.server_id == s), 1)


def parse_nodes(setting: str) -> list[tuple[str, str]]:
    """`NODE_ID=HOST:PORT,HOST:PORT` -> [(configured id or "", address)]."""
    out = []
    for item in (a.strip() for a in setting.split(",")):
        if item:
            node_id, _, address = item.rpartition("=")
            out.append((node_id, address))
    return out


@dataclass
class NodeState:
    """What the directory knows of one configured node."""
    address: str
    configured_id: str = ""
    node_id: str = ""
    reachable: bool = False
    last_seen: datetime.datetime | None = None   # last answer (UTC)
    last_error: str = ""
    checked_at: float = 0.0                       # monotonic time of the last answer or probe
    max_volumes_per_server: int = MAX_VOLUMES_PER_SERVER
    epoch: str = ""                               # of its lifecycle events (the heartbeat reads them)
    events_seen: int = 0                          # the last event's sequence number read
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.node_id or self.configured_id or self.address


def node_unavailable(state: NodeState, why: str) -> Unavailable:
    return Unavailable(f"node {state.name} ({state.address}) is not reachable: {why}",
                       reason="NODE_UNAVAILABLE",
                       metadata={"node_id": state.name, "address": state.address})


class GuardedStub:
    """A NodeStub whose calls fail at once, naming the node, while the node
    is down, and that turn a lost node into Unavailable naming it. Each
    method can also begin() a call (grpcutil.begin)."""

    def __init__(self, directory: NodeDirectory, state: NodeState):
        self._directory, self._state = directory, state

    def __getattr__(self, name: str):
        return _GuardedMethod(self._directory, self._state, name)


class _GuardedMethod:
    def __init__(self, directory: NodeDirectory, state: NodeState, name: str):
        self._directory, self._state, self._name = directory, state, name

    def _method(self, timeout: float | None):
        """The stub's method and the call's timeout, once the node is known up."""
        d, state, name = self._directory, self._state, self._name
        method = getattr(d.stub(state.address), name)
        if not state.reachable and not d.probe(state):
            raise node_unavailable(state, state.last_error or "no answer")
        if timeout is not None:
            timeout = (min(timeout, READ_TIMEOUT) if name in READ_ONLY
                       else max(timeout - min(ANSWER_MARGIN, timeout / 4), 0.1))
        return method, timeout

    def _failed(self, err: grpc.RpcError) -> VmattachError:
        exc = error_from_rpc(err)
        lost = isinstance(exc, Unavailable | DeadlineExceeded) \
            or err.code() == grpc.StatusCode.CANCELLED  # its channel was replaced
        if lost and not self._directory.probe(self._state):
            return node_unavailable(self._state, exc.message)
        return exc

    def _answer(self, wait: Callable[[], Any]):
        """The call's reply (wait() gives it), the node marked as answering;
        a failure mapped as _failed() says."""
        try:
            reply = wait()
        except grpc.RpcError as err:
            raise self._failed(err) from None
        self._directory.answered(self._state)
        return reply

    def __call__(self, request, timeout=None, metadata=None):
        method, timeout = self._method(timeout)
        return self._answer(lambda: method(request, timeout=timeout, metadata=metadata))

    def begin(self, request, timeout=None, metadata=None) -> Callable[[], Any]:
        method, timeout = self._method(timeout)
        future = method.future(request, timeout=timeout, metadata=metadata)
        return lambda: self._answer(lambda: result(future))


@dataclass
class NodeHandle:
    node_id: str
    address: str
    stub: GuardedStub
    max_volumes_per_server: int


def server_not_found(server_id: str) -> NotFound:
    return NotFound(f"Server {server_id} could not be found.", reason="SERVER_NOT_FOUND",
                    metadata={"server_id": server_id})


class NodeDirectory:
    def __init__(self, db: peewee.Database, addresses: list[str] | list[tuple[str, str]],
                 connect: Callable[..., grpc.Channel] = channel):
        """addresses: "HOST:PORT" or (configured node id, "HOST:PORT"); connect:
        how to open a channel (TLS, service token), common.grpcutil.channel's
        keyword arguments accepted."""
        self.db = db
        self._connect = connect
        pairs = [a if isinstance(a, tuple) else ("", a) for a in addresses]
        self.addresses = [a for _, a in pairs]
        self._states = {a: NodeState(a, configured_id=i) for i, a in pairs}
        self._channels = {a: connect(a, options=NODE_CHANNEL_OPTIONS) for a in self.addresses}
        self._raw = {a: node_pb2_grpc.NodeStub(ch) for a, ch in self._channels.items()}
        self._nodes: dict[str, NodeHandle] = {}
        self._refresh_lock = threading.Lock()
        self._refreshed_at = 0.0
        # unpaced refreshes waiting or running: while there is one, none is paced
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._stop = threading.Event()
        self._ask_timeout = NODE_CALL_TIMEOUT
        self._on_change: Callable[[set[str]], object] | None = None
        self._pool = ThreadPoolExecutor(max_workers=min(16, max(len(self.addresses), 1)),
                                        thread_name_prefix="node-refresh")

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for ch in self._channels.values():
            ch.close()

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        return self._raw[address]

    # -- health -------------------------------------------------------------------------

    def answered(self, state: NodeState) -> None:
        if not state.reachable and state.last_seen is None:  # its first answer: news, not trouble
            LOG.info("node %s (%s) answers", state.name, state.address)
        elif not state.reachable:
            LOG.warning("node %s (%s) answers again", state.name, state.address)
        state.reachable, state.last_error = True, ""
        state.last_seen, state.checked_at = utcnow(), time.monotonic()

    def lost(self, state: NodeState, why: str) -> None:
        if state.reachable:
            LOG.warning("node %s (%s) does not answer: %s", state.name, state.address, why)
        state.reachable, state.last_error, state.checked_at = False, why, time.monotonic()

    def _new_channel(self, address: str) -> None:
        """A new channel (and so a new connection) for a node that stopped
        answering: a TCP connection across a link that went down can stay
        silent long after the link is back (its retransmissions back off for
        minutes), while a new one connects at once. The old channel is
        closed a little later, once the calls still on it are over."""
        old = self._channels[address]
        self._channels[address] = self._connect(address, options=NODE_CHANNEL_OPTIONS)
        self._raw[address] = node_pb2_grpc.NodeStub(self._channels[address])
        timer = threading.Timer(OLD_CHANNEL_GRACE, old.close)
        timer.daemon = True
        timer.start()

    def probe(self, state: NodeState, timeout: float = PROBE_TIMEOUT) -> bool:
        """Ask the node for its info with a short deadline (one probe at a
        time per node; a down node at most every REPROBE_AFTER seconds);
        True when it answered."""
        with state.lock:
            if not state.reachable and time.monotonic() - state.checked_at < REPROBE_AFTER:
                return False
            # on a channel of its own: the node's channel may sit in a long
            # reconnect back-off, or on a connection that died with the link
            ch = self._connect(state.address, retries=False, options=NODE_CHANNEL_OPTIONS)
            try:
                node_pb2_grpc.NodeStub(ch).NodeGetInfo(npb.NodeGetInfoRequest(),
                                                       timeout=timeout)
            except grpc.RpcError as err:
                self.lost(state, error_from_rpc(err).message)
                return False
            finally:
                ch.close()
            if not state.reachable:
                self._new_channel(state.address)
            self.answered(state)
            return True

    # -- refreshing the cache -----------------------------------------------------------

    @with_connection
    def refresh(self, if_older_than: float | None = None,
                pace: Callable[[], None] = no_pause, only: set[str] | None = None) -> None:
        """Ask every node for its servers, all at once (or only the nodes at
        the addresses `only`). With if_older_than (a request looking for a
        server it does not know), skip when a refresh of every node that
        started after that moment has finished, and skip the nodes known to
        be down (the periodic refresh keeps asking them). pace is called
        after each node's answer is stored (the periodic refresh passes a
        common.periodic.Pacer: at a cell's 1,000 nodes a refresh is seconds
        of CPU), except while an unpaced refresh waits for it (a request's,
        or the heartbeat's): then it runs at full speed."""
        urgent = pace is no_pause
        if urgent:
            with self._waiting_lock:
                self._waiting += 1
        try:
            with holding(self._refresh_lock):  # held while it waits for the nodes
                if if_older_than is not None and self._refreshed_at > if_older_than:
                    return
                started = time.monotonic()
                wanted = [s for s in self._states.values()
                          if (if_older_than is None or s.reachable or not s.checked_at)
                          and (only is None or s.address in only)]
                asked: collections.deque = collections.deque()
                for state in wanted:
                    asked.append((state, self._pool.submit(self._ask, state)))
                    if len(asked) >= REFRESH_AHEAD:
                        self._stored(asked.popleft(), pace)
                while asked:
                    self._stored(asked.popleft(), pace)
                if only is None:
                    self._refreshed_at = started
        finally:
            if urgent:
                with self._waiting_lock:
                    self._waiting -= 1

    def _stored(self, asked: tuple[NodeState, Future], pace: Callable[[], None]) -> None:
        state, future = asked
        answer = result(future)
        if answer is not None:
            self._store(state, *answer)
        if not self._waiting:
            pace()

    def _ask(self, state: NodeState):
        if not state.reachable and state.checked_at and not self.probe(state):
            return None
        stub = self._raw[state.address]
        try:
            info = call(stub.NodeGetInfo, npb.NodeGetInfoRequest(), timeout=self._ask_timeout)
            servers = call(stub.ListServers, npb.NodeListServersRequest(),
                           timeout=self._ask_timeout).servers
        except VmattachError as exc:
            LOG.info("node at %s did not answer: %s", state.address, exc.message)
            self.lost(state, exc.message)
            return None
        self.answered(state)
        return info, servers

    def _store(self, state: NodeState, info, servers) -> None:
        state.node_id = info.node_id
        state.max_volumes_per_server = info.max_volumes_per_server or MAX_VOLUMES_PER_SERVER
        self._nodes[info.node_id] = NodeHandle(
            info.node_id, state.address, GuardedStub(self, state),
            state.max_volumes_per_server)
        fields = ("name", "state", "device_prefix", "root_device", "disks", "node_id",
                  "project_id")
        reported = {s.server_id: (s.name, SERVER_STATE.name(s.state), s.device_prefix or "vd",
                                  s.root_device,
                                  json.dumps([{"device": d.device, "serial": d.serial,
                                               "bus": BUS.name(d.bus)} for d in s.disks]), info.node_id,
                                  s.project_id)
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

    def watch(self, on_change: Callable[[set[str]], object]) -> None:
        """Follow every node's lifecycle events: the heartbeat asks each node
        for the events since the last it saw (NodeWatchServers without
        waiting, which also shows that the node answers); when a domain was
        undefined or stopped, or events were lost, refresh the cache and call
        on_change({node ids}) then, instead of at the next periodic refresh.
        (A long poll per node took a thread per node in the facade and one
        in each node: at a cell's 1,000 nodes ~50-75 MB here.)"""
        self._on_change = on_change

    def _news(self, state: NodeState, answer) -> bool:
        """Record a node's NodeWatchServers answer; True when the cache of its
        servers may be wrong now (a domain went, events were lost, the node
        restarted)."""
        restarted = bool(state.epoch) and answer.epoch != state.epoch
        state.epoch, state.events_seen = answer.epoch, answer.last_seq
        # a domain that went (undefined, or a transient one stopped): look now. A
        # new domain waits for the periodic refresh or the first request naming it
        gone = sum(1 for e in answer.events if e.event in GONE_EVENTS)
        if gone or answer.events_lost or restarted:
            LOG.info("node %s: %d domain(s) undefined or stopped", state.name, gone)
            return True
        return False

    def heartbeat(self, interval: float) -> None:
        """One round of liveness checks, so that a node that stops answering
        is shown down within `interval` even when no request goes to it:
        each node is asked for its events (watch) on its channel with a
        quarter of the interval to answer; one that does not is probed on a
        new channel with half of it (a down node: the probe alone, which also
        notices that it is back). The calls go through the directory's
        bounded pool: no thread per node."""
        def check(state: NodeState) -> bool:
            if state.reachable:
                try:
                    answer = self._raw[state.address].NodeWatchServers(
                        npb.NodeWatchServersRequest(after_seq=state.events_seen),
                        timeout=interval / 4)
                except grpc.RpcError:
                    pass
                else:
                    self.answered(state)
                    return self._news(state, answer)
            self.probe(state, timeout=min(PROBE_TIMEOUT, interval / 2))
            return False

        states = [s for s in self._states.values() if s.checked_at]
        changed = {s.address for s, news in zip(states, self._pool.map(check, states),
                                                strict=True) if news}
        if not changed or self._on_change is None or self._stop.is_set():
            return
        try:
            self.refresh(only=changed)  # a few nodes: no pace
            self._on_change({h.node_id for h in self._nodes.values() if h.address in changed})
        except Exception:  # noqa: BLE001 - the heartbeat must go on; the periodic run retries
            LOG.exception("reacting to the events of nodes %s failed",
                          ", ".join(sorted(changed)))

    def run_periodic(self, interval: float) -> threading.Thread:
        """Refresh the servers now (at start), then every interval; check
        that every node answers every quarter of the interval (heartbeat),
        so that a node that stops answering is down within the interval."""
        self._ask_timeout = min(NODE_CALL_TIMEOUT, max(interval, PROBE_TIMEOUT))
        every(interval / 4, lambda: self.heartbeat(interval), self._stop, "node-heartbeat",
              now=False)
        return every(interval, lambda: self.refresh(pace=Pacer(BACKGROUND_SHARE)), self._stop,
                     "server-refresh")

    # -- lookups ----------------------------------------------------------------------

    def handles(self) -> list[NodeHandle]:
        """The nodes that answered a refresh."""
        return list(self._nodes.values())

    def node(self, node_id: str) -> NodeHandle:
        handle = self._nodes.get(node_id)
        if handle is None:
            self.refresh(if_older_than=time.monotonic())
            handle = self._nodes.get(node_id)
        if handle is None:
            state = next((s for s in self._states.values() if s.configured_id == node_id), None)
            if state is not None:
                raise node_unavailable(state, state.last_error or "it never answered")
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
            raise server_not_found(server_id)
        return record

    def visible_server(self, server_id: str, cached: ServerRecord | None = None) -> ServerRecord:
        """server() (or the cached record the caller read), for a caller who
        may see it: another project's server is NotFound, exactly like a
        missing one."""
        record = cached if cached is not None else self.server(server_id)
        if not auth.current().sees(record.project_id):
            raise server_not_found(server_id)
        return record

    @with_connection
    def list_servers(self, page_size: int, page_token: str,
                     project_id: str | None = None) -> tuple[list[ServerRecord], str]:
        """A page of servers (of project_id only, unless None)."""
        query = ServerRecord.select().order_by(ServerRecord.server_id)
        if project_id is not None:
            query = query.where(ServerRecord.project_id == project_id)
        if page_token:
            query = query.where(ServerRecord.server_id > pagetoken.decode(
                page_token, "servers", pagetoken.uuid_key)[0])
        rows = list(query.limit(page_size + 1))
        token = pagetoken.encode("servers", rows[page_size - 1].server_id) if len(rows) > page_size else ""
        return rows[:page_size], token

    @with_connection
    def statuses(self) -> list[tuple[NodeState, int, int]]:
        """Every configured node with its number of servers and of live
        attachments (from the shared database), in configuration order."""
        ids = [s.node_id for s in self._states.values() if s.node_id]
        servers = dict(ServerRecord.select(ServerRecord.node_id, peewee.fn.COUNT(1))
                       .where(ServerRecord.node_id.in_(ids)).group_by(ServerRecord.node_id)
                       .tuples()) if ids else {}
        bdm = BlockDeviceMapping
        attachments = dict(bdm.select(bdm.node_id, peewee.fn.COUNT(1))
                           .where((bdm.deleted == 0) & bdm.node_id.in_(ids))
                           .group_by(bdm.node_id).tuples()) if ids else {}
        return [(s, servers.get(s.node_id, 0), attachments.get(s.node_id, 0))
                for s in self._states.values()]
