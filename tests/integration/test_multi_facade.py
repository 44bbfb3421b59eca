"""Two servers facades (`vmattach serve --services servers`, two processes)
on one PostgreSQL database, in front of one Controller (real tgtd) and one
Node (fake hypervisor, tests/support/fake_node_server.py): 1,000 attaches and
detaches from concurrent clients spread over both facades, with repeated and
conflicting requests on the same volumes and servers. Afterwards every
invariant holds, read directly from each place an attachment lives: the
facades' block_device_mapping rows, the Controller, the hypervisor (through
the Node) and tgtd; and `vmattach audit` finds nothing."""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.fake_node_server import server_uuids
from tests.support.vmattach_process import VMATTACH, ServeProcess
from vmattach.clients.client import VmattachClient
from vmattach.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    VmattachError,
    status_code,
)
from vmattach.common.grpcutil import call, channel
from vmattach.common.runner import CommandRunner
from vmattach.controller.tgt import IQN_PREFIX, TgtAdm
from vmattach.v1 import node_pb2 as npb
from vmattach.v1 import node_pb2_grpc, types_pb2

pytestmark = pytest.mark.postgres

OPERATIONS = 1000
THREADS = 16
SERVERS = 10
VOLUMES = 20
MULTIATTACH = 4          # the first MULTIATTACH volumes
HOT = 6                  # half of the requests go to the first HOT volumes
DEVICES = ["/dev/vdb", "/dev/vdc", "/dev/vdd", "/dev/vde"]
INITIATOR = "iqn.2004-10.org.vmattach:multi-facade-node"
# the documented answers to a request that conflicts with another
EXPECTED_ERRORS = (AlreadyExists, FailedPrecondition, NotFound, Aborted, ResourceExhausted)
SETTLE_TIMEOUT = 60.0


class Cluster:
    """The processes and what the test needs to reach them."""

    def __init__(self, tmp_path: Path, tgtd, database):
        self.tmp_path, self.tgtd, self.database = tmp_path, tgtd, database
        self.procs: list[ServeProcess] = []
        self.seed = uuid.uuid4().hex[:8]
        self.servers = server_uuids(self.seed, SERVERS)
        self.dump = tmp_path / "hypervisor.json"
        self.facade_state = tmp_path / "facade-state"
        env = {"VMATTACH_RECONCILE_INTERVAL": "1"}
        self.node = self._start(
            ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "node-state"),
             "--database-url", database.url, "--tgt-portal", tgtd.portal,
             "--tgt-control-port", str(tgtd.control_port), "--node-id", "node-1",
             "--initiator-iqn", INITIATOR, "--detach-timeout", "0.5", "--detach-retries", "2",
             "--log-level", "WARNING",
             "--servers", str(SERVERS), "--seed", self.seed, "--dump", str(self.dump)],
            "node", command=[sys.executable, "-m", "tests.support.fake_node_server"], env=env)
        # one after the other: the first creates the state directory's key that
        # both use to seal the CHAP secrets in the rows they share
        self.facades = [self._start(
            ["--services", "servers", "--listen", "127.0.0.1:0",
             "--database-url", database.url, "--controller-address", self.node.address,
             "--nodes", self.node.address, "--state-dir", str(self.facade_state),
             "--log-level", "WARNING"], f"facade-{i}", env=env) for i in range(2)]
        self.clients = [VmattachClient(f.address, controller_address=self.node.address,
                                       timeout=60) for f in self.facades]
        self.node_channel = channel(self.node.address)
        self.node_stub = node_pb2_grpc.NodeStub(self.node_channel)
        self.tgtadm = TgtAdm(CommandRunner(), tgtd.control_port)

    def _start(self, args, name, command=None, env=None) -> ServeProcess:
        proc = ServeProcess(args, self.tmp_path / f"{name}.log", env=env, command=command,
                            timeout=60)
        self.procs.append(proc)
        assert proc.address, f"{name}: {proc.first_line}\n{proc.log()}"
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()}" for p in self.procs)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.node_channel.close()
        for p in reversed(self.procs):
            p.stop()

    # -- reading each place an attachment lives ---------------------------------------------

    def live_bdms(self) -> list[dict]:
        conn = self.database.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id, instance_uuid, volume_id, device_name, state, progress"
                            " FROM block_device_mapping WHERE deleted = 0 ORDER BY id")
                names = [c.name for c in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def node_servers(self) -> dict:
        reply = call(self.node_stub.ListServers, npb.NodeListServersRequest(), timeout=30)
        return {s.server_id: s for s in reply.servers}

    def hypervisor_state(self) -> dict:
        self.dump.unlink(missing_ok=True)
        self.node.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.dump.exists():
            assert time.monotonic() < deadline, "the node did not dump its hypervisor"
            time.sleep(0.05)
        return json.loads(self.dump.read_text())


@pytest.fixture
def cluster(tmp_path, tgtd, postgres_database):
    c = Cluster(tmp_path, tgtd, postgres_database)
    yield c
    c.close()


class Workload:
    """OPERATIONS random requests over both facades, THREADS at a time."""

    def __init__(self, cluster: Cluster, volumes: list[str], seed: int):
        self.c = cluster
        self.volumes = volumes
        self.seed = seed
        self.lock = threading.Lock()
        self.outcomes: collections.Counter = collections.Counter()
        self.unexpected: list[str] = []
        self.attached: dict[tuple[str, str], str] = {}  # (server, volume) -> request id

    def _volume(self, rng: random.Random) -> str:
        return self.volumes[rng.randrange(HOT)] if rng.random() < 0.5 else rng.choice(self.volumes)

    def _pair(self, rng: random.Random, attached_bias: float) -> tuple[str, str, str | None]:
        with self.lock:
            known = list(self.attached.items())
        if known and rng.random() < attached_bias:
            (server_id, volume_id), request_id = rng.choice(known)
            return server_id, volume_id, request_id
        return rng.choice(self.c.servers), self._volume(rng), None

    def one(self, i: int) -> None:
        rng = random.Random(self.seed * 100_003 + i)
        client = self.c.clients[i % 2]
        roll = rng.random()
        if roll < 0.40:
            kind = "attach"
            server_id, volume_id, request_id = rng.choice(self.c.servers), self._volume(rng), None
            request = dict(request_id=str(uuid.uuid4()))
        elif roll < 0.50:
            kind = "attach-device"  # a chosen device name: conflicts on the server
            server_id, volume_id, request_id = rng.choice(self.c.servers), self._volume(rng), None
            request = dict(device=rng.choice(DEVICES))
        elif roll < 0.60:
            kind = "attach-retry"  # the same request again, often through the other facade
            server_id, volume_id, request_id = self._pair(rng, 0.9)
            request = dict(request_id=request_id or str(uuid.uuid4()))
        else:
            kind = "detach"
            server_id, volume_id, _ = self._pair(rng, 0.7)
        try:
            if kind == "detach":
                client.detach_volume(server_id, volume_id)
                with self.lock:
                    self.attached.pop((server_id, volume_id), None)
            else:
                att = client.attach_volume(server_id, volume_id, **request)
                assert (att.server_id, att.volume_id, att.state) == \
                    (server_id, volume_id, types_pb2.ATTACHMENT_STATE_ATTACHED)
                with self.lock:
                    self.attached[(server_id, volume_id)] = request.get("request_id")
            outcome = "OK"
        except EXPECTED_ERRORS as exc:
            outcome = f"{status_code(exc).name} {exc.reason}"
        except VmattachError as exc:
            outcome = f"UNEXPECTED {status_code(exc).name}"
            with self.lock:
                self.unexpected.append(f"{kind} {volume_id} {server_id}: "
                                       f"{type(exc).__name__} {exc.reason}: {exc.message}")
        with self.lock:
            self.outcomes[(kind, outcome)] += 1

    def run(self) -> None:
        with ThreadPoolExecutor(THREADS) as pool:
            for future in [pool.submit(self.one, i) for i in range(OPERATIONS)]:
                future.result()


def settle(cluster: Cluster) -> list[dict]:
    """The live rows once no attach or detach is in progress (the reconcilers
    finish what a failed undo left)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        rows = cluster.live_bdms()
        busy = [r for r in rows if r["state"] != "attached"]
        if not busy:
            return rows
        assert time.monotonic() < deadline, f"operations still in progress: {busy}"
        time.sleep(0.2)


def test_two_facades_on_one_postgresql_keep_every_invariant_under_1000_mixed_operations(
        cluster, capsys):
    c = cluster
    client = c.clients[0]
    volumes = [client.create_volume(f"mf-{i:02d}", 1, multiattach=i < MULTIATTACH).volume_id
               for i in range(VOLUMES)]
    multiattach = set(volumes[:MULTIATTACH])
    for f in c.clients:  # both facades list the node's servers (refreshed at start)
        deadline = time.monotonic() + 20
        while {s.server_id for s in f.list_servers()} != set(c.servers):
            assert time.monotonic() < deadline, "a facade does not list the node's servers"
            time.sleep(0.1)

    work = Workload(c, volumes, seed=random.randrange(1 << 30))
    started = time.monotonic()
    work.run()
    elapsed = time.monotonic() - started
    rows = settle(c)
    with capsys.disabled():
        print(f"\n{OPERATIONS} operations over 2 facades in {elapsed:.1f}s (seed {work.seed}):")
        for (kind, outcome), n in sorted(work.outcomes.items()):
            print(f"    {kind:14} {outcome:46} {n}")
    assert sum(work.outcomes.values()) == OPERATIONS
    assert not work.unexpected, "\n".join(work.unexpected[:20]) + "\n" + c.logs()
    assert any(o == "OK" for (k, o) in work.outcomes if k == "attach")
    assert any(o == "OK" for (k, o) in work.outcomes if k == "detach")

    # 1. the facades' rows: one device per server, one server per volume
    #    (unless multiattach), nothing half-done
    devices = collections.Counter((r["instance_uuid"], r["device_name"]) for r in rows)
    assert [k for k, n in devices.items() if n > 1] == []
    pairs = collections.Counter((r["instance_uuid"], r["volume_id"]) for r in rows)
    assert [k for k, n in pairs.items() if n > 1] == []
    servers_of = collections.defaultdict(set)
    for r in rows:
        servers_of[r["volume_id"]].add(r["instance_uuid"])
    assert {v: s for v, s in servers_of.items() if len(s) > 1 and v not in multiattach} == {}
    assert rows, "the run ended with nothing attached: the invariants below would be vacuous"

    # 2. the Controller: the same attachments; in-use exactly when attached
    for volume_id in volumes:
        volume = client.get_volume(volume_id)
        attachments = {a.server_id: a for a in volume.attachments}
        assert set(attachments) == servers_of.get(volume_id, set()), volume
        assert all(a.attach_status == types_pb2.ATTACH_STATUS_ATTACHED for a in attachments.values()), volume
        by_server = {r["instance_uuid"]: r for r in rows if r["volume_id"] == volume_id}
        assert {s: a.mountpoint for s, a in attachments.items()} == \
            {s: r["device_name"] for s, r in by_server.items()}
        expected = ((types_pb2.VOLUME_STATUS_IN_USE, types_pb2.ATTACH_STATUS_ATTACHED) if attachments
                    else (types_pb2.VOLUME_STATUS_AVAILABLE, types_pb2.ATTACH_STATUS_DETACHED))
        assert (volume.status, volume.attach_status) == expected, volume

    # 3. the hypervisor (through the Node): each server's disks are its live rows
    node_servers = c.node_servers()
    for server_id in c.servers:
        disks = {d.serial: "/dev/" + d.device for d in node_servers[server_id].disks}
        assert disks == {r["volume_id"]: r["device_name"] for r in rows
                         if r["instance_uuid"] == server_id}, server_id

    # 4. tgtd: a complete target exactly for each attached volume, allowing the node
    targets = {t.iqn.removeprefix(IQN_PREFIX): t for t in c.tgtadm.show().values()
               if t.iqn.startswith(IQN_PREFIX)}
    assert set(targets) == set(servers_of)
    for volume_id, target in targets.items():
        assert target.acls == [INITIATOR], (volume_id, target)
        assert list(target.luns) == [1] and len(target.accounts) == 1, (volume_id, target)
    secrets = c.hypervisor_state()["secrets"]
    assert sorted(secrets) == sorted(f"volume-{v}" for v in servers_of)

    # 5. the audit (it asks the Controller and the Node through their RPCs) finds
    #    nothing; an audit that cannot run fails the test
    audit = subprocess.run(
        [VMATTACH, "audit", "--database-url", c.database.url,
         "--controller-address", c.node.address, "--nodes", c.node.address,
         "--state-dir", str(c.facade_state), "--log-level", "WARNING"],
        capture_output=True, text=True, timeout=120)
    with capsys.disabled():
        print(f"    vmattach audit: exit {audit.returncode}: {audit.stdout.strip()[-200:]}")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "no divergence" in audit.stdout, audit.stdout + audit.stderr
