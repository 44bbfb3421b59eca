"""Many hosts for real (docs/deployment.md): two hypervisor hosts, each a
network + mount namespace with its own libvirtd, guests and address and
its own Node service; the storage host (tgtd and the Controller) in a
namespace of its own; the API host with two facade replicas sharing one
PostgreSQL database. The hosts are joined by veth links to one switch
(tests/support/hosts.py), so QEMU on each hypervisor reaches the tgtd
portal over a real link, and a test can cut a host's link or kill its
services. The test process reaches the API and storage hosts through a
loopback relay (tests/support/netns_relay.py).

One deployment for the module; its guests are reused by every test."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import FreshPostgres, need, need_postgres
from tests.support.guest import TestGuest, ensure_guest_image, virsh
from tests.support.hosts import Topology
from tests.support.tgtd import TgtDaemon
from tests.support.vmattach_process import VMATTACH, ServeProcess
from vmattach.clients.client import VmattachClient
from vmattach.common import pki
from vmattach.common.errors import Unavailable, VmattachError
from vmattach.common.tls import TlsFiles
from vmattach.v1 import types_pb2

pytestmark = pytest.mark.realstack

PORT = 50051                 # every service's port inside its own namespace
PORTAL_PORT = 3260
FAULTY_PORT = 50053          # the API host's third facade (fault injection)
DEADLINE = 20.0              # the client's deadline for a call to a lost host
REFRESH = 4.0                # facade 1's server refresh interval (its heartbeat: every 1 s)


class MultiHost:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, ServeProcess] = {}
        self.topo = Topology(tmp).start()
        self.tag = self.topo.tag
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- start ----------------------------------------------------------------------------

    def _start(self) -> None:
        topo = self.topo
        self.api = topo.add_host("api", 1)
        self.storage = topo.add_host("st", 2)
        self.a = topo.add_hypervisor("a", 11)
        self.b = topo.add_hypervisor("b", 12)
        self.node_ids = {self.a: f"{self.tag}-host-a", self.b: f"{self.tag}-host-b"}
        # every service speaks TLS with the service certificate (the facades' calls
        # to the Controller and the Nodes carry it too); its names: every host's
        # address, and the loopback the test process reaches the relay at
        certs = self.tmp / "pki"
        pki.init(certs, ["127.0.0.1", "localhost",
                         *(h.ip for h in (self.api, self.storage, self.a, self.b))])
        self.tls = TlsFiles(str(certs / "service.crt"), str(certs / "service.key"),
                            str(certs / "ca.crt"))
        self.tls_args = ["--tls-cert", self.tls.cert, "--tls-key", self.tls.key,
                         "--tls-ca", self.tls.ca]
        # tgtd listens on every address of the storage host; the Controller
        # advertises the one the hypervisors reach over their links
        self.tgtd = TgtDaemon(PORTAL_PORT, bind="0.0.0.0", netns=self.storage.netns,
                              log_path=self.tmp / "tgtd.log").start()
        self.controller_address = f"{self.storage.ip}:{PORT}"
        self.start_controller()
        for host in (self.a, self.b):
            self.start_node(host)
        self.database = FreshPostgres(schema=True)
        # the API host reaches PostgreSQL through its socket (no route to 127.0.0.1:5432)
        self.database_url = (f"postgresql://postgres@/test?host=/var/run/postgresql"
                             f"&application_name={self.database.name}"
                             f"&options=-csearch_path%3D{self.database.name}")
        self.nodes_setting = ",".join(f"{self.node_ids[h]}={h.ip}:{PORT}"
                                      for h in (self.a, self.b))
        # one after the other: the first creates the key both seal secrets with
        self.start_facade(1, ["--server-refresh-interval", str(REFRESH)])
        self.start_facade(2, ["--server-refresh-interval", "300"])
        relay = ServeProcess([], self.tmp / "relay.log", command=[
            sys.executable, "-m", "tests.support.netns_relay", f"/run/netns/{self.api.netns}",
            f"{self.api.ip}:{PORT}", f"{self.api.ip}:{PORT + 1}", f"{self.api.ip}:{FAULTY_PORT}",
            self.controller_address])
        self.procs["relay"] = relay
        ports = relay.first_line.split()[1:]
        self.local = dict(zip(("facade-1", "facade-2", "faulty", "controller"),
                              (f"127.0.0.1:{p}" for p in ports), strict=True))
        self.clients = [self.client(f"facade-{i}") for i in (1, 2)]
        with ThreadPoolExecutor(2) as pool:
            ga, gb = pool.map(lambda h: TestGuest.start(uri=h.uri, name=f"vmattach-{self.tag}-"
                                                        f"{h.role}1", ready_timeout=180),
                              (self.a, self.b))
        self.guests = {self.a: ga, self.b: gb}

    def client(self, name: str, timeout: float = 120) -> VmattachClient:
        return VmattachClient(self.local[name], self.local["controller"], timeout=timeout,
                              tls=self.tls)

    def _serve(self, name: str, argv: list[str], args: list[str]) -> ServeProcess:
        proc = ServeProcess(args + self.tls_args + ["--log-level", "INFO"],
                            self.tmp / f"{name}.log", command=argv, timeout=60,
                            env={"VMATTACH_AUTH": "token"})
        assert proc.address, f"{name}: {proc.first_line}\n{proc.log()}"
        self.procs[name] = proc
        return proc

    def start_controller(self) -> ServeProcess:
        return self._serve("controller", self.storage.argv(VMATTACH, "serve"), [
            "--services", "controller", "--listen", self.controller_address,
            "--state-dir", str(self.tmp / "storage"),
            "--tgt-portal", f"{self.storage.ip}:{PORTAL_PORT}",
            "--tgt-control-port", str(self.tgtd.control_port), "--reconcile-interval", "1"])

    def start_node(self, host) -> ServeProcess:
        return self._serve(f"node-{host.role}", host.enter(VMATTACH, "serve"), [
            "--services", "node", "--listen", f"{host.ip}:{PORT}",
            "--state-dir", str(self.tmp / f"node-{host.role}"),
            "--node-id", self.node_ids[host], "--node-ip", host.ip,
            "--initiator-iqn", f"iqn.2004-10.org.vmattach:{self.tag}-{host.role}",
            "--detach-timeout", "5"])

    def facade_args(self, port: int) -> list[str]:
        return ["--services", "servers", "--listen", f"{self.api.ip}:{port}",
                "--database-url", self.database_url, "--state-dir", str(self.tmp / "api"),
                "--controller-address", self.controller_address, "--nodes", self.nodes_setting,
                "--owner-lease", "3", "--reconcile-interval", "1"]

    def start_facade(self, i: int, extra: list[str]) -> ServeProcess:
        return self._serve(f"facade-{i}", self.api.argv(VMATTACH, "serve"),
                           self.facade_args(PORT + i - 1) + extra)

    def start_faulty_facade(self, fault: str) -> ServeProcess:
        return self._serve("faulty", self.api.argv(VMATTACH, "serve"),
                           self.facade_args(FAULTY_PORT) + ["--fault-injection", fault])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.proc.kill()
        proc.proc.wait(timeout=10)
        proc.stop()

    # -- reading --------------------------------------------------------------------------

    def bdms(self, volume_id: str) -> list[tuple]:
        conn = self.database.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT state, progress, owner, node_id FROM block_device_mapping"
                            " WHERE deleted = 0 AND volume_id = %s", (volume_id,))
                return cur.fetchall()
        finally:
            conn.close()

    def nodes(self) -> dict[str, dict]:
        """`vmattach node list --json` from facade 1, by node id."""
        out = subprocess.run([VMATTACH, "--address", self.local["facade-1"], *self.tls_args,
                              "--json", "node", "list"],
                             capture_output=True, text=True, timeout=60, check=True)
        return {n["node_id"]: n for n in json.loads(out.stdout)}

    def wait_reachable(self, host, reachable: bool, timeout: float) -> float:
        """Seconds until node list shows host as reachable/down."""
        start = time.monotonic()
        while self.nodes()[self.node_ids[host]]["reachable"] != reachable:
            assert time.monotonic() - start < timeout, \
                f"{host.role} not shown {'up' if reachable else 'down'} in {timeout}s"
            time.sleep(0.2)
        return time.monotonic() - start

    def audit(self, repair: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.api.argv(
            VMATTACH, "audit", *(["--repair"] if repair else []),
            "--database-url", self.database_url, "--state-dir", str(self.tmp / "api"),
            "--controller-address", self.controller_address, "--nodes", self.nodes_setting,
            *self.tls_args, "--log-level", "WARNING"), capture_output=True, text=True,
            timeout=180)

    def wait_log(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.procs[name].log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"{name} never logged {text!r}"
            time.sleep(0.05)

    def wait_no_bdm(self, volume_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.bdms(volume_id):
            assert time.monotonic() < deadline, f"BDM of {volume_id}: {self.bdms(volume_id)}"
            time.sleep(0.2)

    # -- stop -----------------------------------------------------------------------------

    def close(self) -> None:
        for c in getattr(self, "clients", []):
            c.close()
        for g in getattr(self, "guests", {}).values():
            g.destroy()
        for name in list(self.procs)[::-1]:
            self.stop(name)
        if getattr(self, "tgtd", None) is not None:
            self.tgtd.stop()
        if getattr(self, "database", None) is not None:
            self.database.drop()
        self.topo.close()


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    need("tgtd", "virsh", "nsenter", "unshare", "ip")
    need_postgres()
    ensure_guest_image()
    started = time.monotonic()
    d = MultiHost(tmp_path_factory.mktemp("multi-node"))
    print(f"\n    deployment {d.tag} up in {time.monotonic() - started:.1f}s")
    yield d
    d.close()


def by_id(volume_id: str) -> str:
    return f"/dev/disk/by-id/virtio-{volume_id[:20]}"


def guest_has(guest: TestGuest, volume_id: str) -> bool:
    """Whether the guest has a disk of the volume now, as the guest itself
    reported its disks coming and going (DISK-ADDED / DISK-REMOVED)."""
    present: dict[str, str] = {}
    for event in guest.events():
        if event["event"] == "DISK-ADDED":
            present[event["name"]] = event.get("serial", "")
        else:
            present.pop(event["name"], None)
    return any(serial and volume_id.startswith(serial) for serial in present.values())


def audit_clean(dc: MultiHost, what: str) -> str:
    audit = dc.audit()
    print(f"    audit after {what}: {audit.stdout.strip().splitlines()[-1]}")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    return audit.stdout


# -- the same flows across hosts ------------------------------------------------------------


def test_both_nodes_are_listed_reachable_with_their_servers(dc):
    # the counts come from the servers cache: a guest booted after the facade
    # started is counted from the next refresh (every REFRESH seconds) on
    deadline = time.monotonic() + 2 * REFRESH + 5
    while True:
        nodes = dc.nodes()
        if all(nodes[dc.node_ids[h]]["servers"] >= 1 for h in (dc.a, dc.b)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for host in (dc.a, dc.b):
        node = nodes[dc.node_ids[host]]
        assert node["address"] == f"{host.ip}:{PORT}" and node["reachable"] is True
        assert node["servers"] >= 1 and node["last_seen"]
    servers = {s.server_id: s.node_id for s in dc.clients[0].list_servers()}
    assert servers[dc.guests[dc.a].uuid] == dc.node_ids[dc.a]
    assert servers[dc.guests[dc.b].uuid] == dc.node_ids[dc.b]
    out = subprocess.run([VMATTACH, "--address", dc.local["facade-1"], *dc.tls_args, "node",
                          "list", "-f", "csv"], capture_output=True, text=True, timeout=60).stdout
    assert out.splitlines()[0].replace('"', "").split(",") == [
        "node_id", "address", "reachable", "servers", "attachments", "last_seen"]


def test_concurrent_attaches_and_detaches_on_both_nodes(dc):
    c1, c2 = dc.clients
    ga, gb = dc.guests[dc.a], dc.guests[dc.b]
    vols = [c1.create_volume(f"{dc.tag}-conc-{i}", 1).volume_id for i in range(4)]
    plan = [(c1, ga, vols[0], ""), (c2, gb, vols[1], ""),
            (c2, ga, vols[2], "/dev/vdf"), (c1, gb, vols[3], "/dev/vdf")]
    with ThreadPoolExecutor(4) as pool:
        atts = list(pool.map(lambda p: p[0].attach_volume(p[1].uuid, p[2], device=p[3]), plan))
    for (_, guest, volume_id, device), att in zip(plan, atts, strict=True):
        assert att.state == types_pb2.ATTACHMENT_STATE_ATTACHED and att.device == (device or "/dev/vdb")
        guest.wait_disk(volume_id, timeout=60)
        # routed to the node that hosts the server: the other host's guest never sees it
        other = gb if guest is ga else ga
        assert not guest_has(other, volume_id)
    assert {r[3] for v in vols for r in dc.bdms(v)} == set(dc.node_ids.values())
    nodes = dc.nodes()
    assert nodes[dc.node_ids[dc.a]]["attachments"] == nodes[dc.node_ids[dc.b]]["attachments"] == 2
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: p[0].detach_volume(p[1].uuid, p[2]), plan))
    for _, guest, volume_id, _ in plan:
        guest.wait_disk_gone(volume_id, timeout=60)
    for v in vols:
        assert c1.get_volume(v).status == types_pb2.VOLUME_STATUS_AVAILABLE
        c1.delete_volume(v)
    audit_clean(dc, "the concurrent attaches")


def test_a_volume_written_on_a_reads_the_same_on_b(dc):
    c1, c2 = dc.clients
    ga, gb = dc.guests[dc.a], dc.guests[dc.b]
    volume_id = c1.create_volume(f"{dc.tag}-move", 1).volume_id
    c1.attach_volume(ga.uuid, volume_id)
    ga.wait_disk(volume_id, timeout=60)
    rc, out = ga.run(f"dd if=/dev/urandom of={by_id(volume_id)} bs=1M count=4 conv=fsync"
                     f" 2>/dev/null && head -c 4194304 {by_id(volume_id)} | sha256sum",
                     timeout=120)
    assert rc == 0, out
    written = out.split()[0]
    c1.detach_volume(ga.uuid, volume_id)
    ga.wait_disk_gone(volume_id, timeout=60)
    c2.attach_volume(gb.uuid, volume_id)       # through the other replica
    disk = gb.wait_disk(volume_id, timeout=60)
    rc, out = gb.run(f"head -c 4194304 {by_id(volume_id)} | sha256sum", timeout=120)
    assert rc == 0 and out.split()[0] == written == disk["sha256"]
    c2.detach_volume(gb.uuid, volume_id)
    gb.wait_disk_gone(volume_id, timeout=60)
    c1.delete_volume(volume_id)


def test_a_server_that_appears_on_a_node_is_found_on_first_use(dc):
    """Through the replica whose periodic refresh is 300 s away: the attach
    names a server the facade has never seen."""
    c2 = dc.clients[1]
    name = f"vmattach-{dc.tag}-b2"
    booted: dict = {}
    thread = threading.Thread(target=lambda: booted.setdefault("guest", TestGuest.start(
        uri=dc.b.uri, name=name, ready_timeout=180)))
    thread.start()
    deadline = time.monotonic() + 60
    while virsh(dc.b.uri, "domuuid", name, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the new guest never appeared"
        time.sleep(0.05)
    server_id = virsh(dc.b.uri, "domuuid", name).stdout.strip()
    volume_id = c2.create_volume(f"{dc.tag}-new-server", 1).volume_id
    try:
        att = c2.attach_volume(server_id, volume_id)
        assert att.device == "/dev/vdb"
        assert c2.get_server(server_id).node_id == dc.node_ids[dc.b]
    finally:
        thread.join()
    guest = booted["guest"]
    try:
        guest.wait_disk(volume_id, timeout=60)
        c2.detach_volume(server_id, volume_id)
        guest.wait_disk_gone(volume_id, timeout=60)
    finally:
        guest.destroy()
    c2.delete_volume(volume_id)


# -- faults between hosts ------------------------------------------------------------------


def _attach_to_lost_b_fails_fast_and_a_keeps_working(dc, fault: str) -> None:
    c1 = dc.clients[0]
    ga, gb = dc.guests[dc.a], dc.guests[dc.b]
    on_b = c1.create_volume(f"{dc.tag}-lost-b-{fault}", 1).volume_id
    on_a = c1.create_volume(f"{dc.tag}-lost-a-{fault}", 1).volume_id
    with ThreadPoolExecutor(1) as pool:
        a_attach = pool.submit(c1.attach_volume, ga.uuid, on_a)   # meanwhile, on A
        with dc.client("facade-1", timeout=DEADLINE) as c:
            started = time.monotonic()
            with pytest.raises(Unavailable) as err:
                c.attach_volume(gb.uuid, on_b)
            took = time.monotonic() - started
        assert a_attach.result().state == types_pb2.ATTACHMENT_STATE_ATTACHED
    print(f"    {fault}: attach to B failed in {took:.1f}s: {err.value.message}")
    assert took < DEADLINE and dc.node_ids[dc.b] in err.value.message
    assert err.value.metadata.get("node_id") == dc.node_ids[dc.b]
    # nothing left behind: no BDM, the Controller's volume untouched
    volume = c1.get_volume(on_b)
    assert dc.bdms(on_b) == [] and (volume.status, len(volume.attachments)) == (types_pb2.VOLUME_STATUS_AVAILABLE, 0)
    ga.wait_disk(on_a, timeout=60)
    # shown as down (the failed attach probed it; the heartbeat would within REFRESH)
    took = dc.wait_reachable(dc.b, False, timeout=REFRESH + 5)
    print(f"    {fault}: node list shows B down after {took:.1f}s more")
    c1.detach_volume(ga.uuid, on_a)
    ga.wait_disk_gone(on_a, timeout=60)
    dc.audit_during_fault = dc.audit()
    for v in (on_a, on_b):
        c1.delete_volume(v)


def _b_works_again(dc) -> None:
    dc.wait_reachable(dc.b, True, timeout=REFRESH * 2 + 10)
    c1, gb = dc.clients[0], dc.guests[dc.b]
    volume_id = c1.create_volume(f"{dc.tag}-b-back", 1).volume_id
    c1.attach_volume(gb.uuid, volume_id)
    gb.wait_disk(volume_id, timeout=60)
    c1.detach_volume(gb.uuid, volume_id)
    gb.wait_disk_gone(volume_id, timeout=60)
    c1.delete_volume(volume_id)


def test_link_to_b_down(dc):
    dc.topo.cut(dc.b)
    try:
        _attach_to_lost_b_fails_fast_and_a_keeps_working(dc, "link-down")
        audit = dc.audit_during_fault
        print(f"    audit with B's link down: {audit.stdout.strip()}")
        assert audit.returncode == 1 and "node-unreachable" in audit.stdout
        assert dc.node_ids[dc.b] in audit.stdout or f"{dc.b.ip}:{PORT}" in audit.stdout
    finally:
        dc.topo.restore(dc.b)
    _b_works_again(dc)
    audit_clean(dc, "B's link came back")


def test_node_b_killed(dc):
    dc.kill("node-b")
    try:
        _attach_to_lost_b_fails_fast_and_a_keeps_working(dc, "node-killed")
        assert dc.audit_during_fault.returncode == 1
    finally:
        dc.start_node(dc.b)
    _b_works_again(dc)
    audit_clean(dc, "B's Node restarted")


def _half_way(dc, fault: str, request, cut) -> VmattachError:
    """request (through the faulty facade, paused at fault) is cut off by
    cut(); returns once the request failed."""
    dc.start_faulty_facade(fault)
    errors: list = []

    def run():
        with dc.client("faulty", timeout=DEADLINE) as c:
            try:
                request(c)
            except VmattachError as exc:
                errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        dc.wait_log("faulty", f"fault injection: {fault.split('=')[0]}")
        cut()
    finally:
        thread.join(timeout=120)
        dc.stop("faulty")
    assert errors, "the request cut off half-way did not fail"
    print(f"    {fault}: the request failed: {type(errors[0]).__name__}: {errors[0].message}")
    return errors[0]


def test_attach_cut_off_half_way_by_bs_link_is_undone_once_b_is_back(dc):
    c1, gb = dc.clients[0], dc.guests[dc.b]
    volume_id = c1.create_volume(f"{dc.tag}-half-attach", 1).volume_id
    try:
        err = _half_way(dc, "after:create_attachment=pause:3",
                        lambda c: c.attach_volume(gb.uuid, volume_id), lambda: dc.topo.cut(dc.b))
        assert isinstance(err, Unavailable) and dc.node_ids[dc.b] in err.message
        # the undo towards B fails too; the row waits for the reconciler
        assert [r[:2] for r in dc.bdms(volume_id)] == [("attaching", "rolling_back")]
        time.sleep(2)  # the reconcilers try (and fail) while B is away
        assert dc.bdms(volume_id)
    finally:
        dc.topo.restore(dc.b)
    dc.wait_no_bdm(volume_id)
    assert c1.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_AVAILABLE
    assert not guest_has(gb, volume_id)
    audit_clean(dc, "an attach cut off half-way by B's link")
    dc.wait_reachable(dc.b, True, timeout=REFRESH * 2 + 10)
    c1.delete_volume(volume_id)


def test_detach_cut_off_half_way_by_bs_link_is_finished_once_b_is_back(dc):
    c1, gb = dc.clients[0], dc.guests[dc.b]
    volume_id = c1.create_volume(f"{dc.tag}-half-detach", 1).volume_id
    c1.attach_volume(gb.uuid, volume_id)
    gb.wait_disk(volume_id, timeout=60)
    try:
        # begun at the Controller, cut off from B before B's one call (unpublish
        # and unstage): neither the call nor the facade's question what the
        # domain shows reaches B
        err = _half_way(dc, "before:node_unpublish=pause:3",
                        lambda c: c.detach_volume(gb.uuid, volume_id), lambda: dc.topo.cut(dc.b))
        assert isinstance(err, Unavailable) and dc.node_ids[dc.b] in err.message
        assert [r[0] for r in dc.bdms(volume_id)] == ["detaching"]
    finally:
        dc.topo.restore(dc.b)
    dc.wait_no_bdm(volume_id)
    assert c1.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_AVAILABLE
    gb.wait_disk_gone(volume_id, timeout=30)
    assert not guest_has(gb, volume_id)
    audit_clean(dc, "a detach cut off half-way by B's link")
    c1.delete_volume(volume_id)


def test_controller_killed_mid_attach_and_restarted(dc):
    c1, ga = dc.clients[0], dc.guests[dc.a]
    volume_id = c1.create_volume(f"{dc.tag}-ctl-killed", 1).volume_id
    try:
        _half_way(dc, "after:node_publish=pause:3",
                  lambda c: c.attach_volume(ga.uuid, volume_id), lambda: dc.kill("controller"))
        assert [r[:2] for r in dc.bdms(volume_id)] == [("attaching", "rolling_back")]
    finally:
        dc.start_controller()
    dc.wait_no_bdm(volume_id)
    assert c1.get_volume(volume_id).status == types_pb2.VOLUME_STATUS_AVAILABLE
    ga.wait_disk_gone(volume_id, timeout=30)
    assert not guest_has(ga, volume_id)
    audit_clean(dc, "the Controller was killed mid-attach")
    c1.delete_volume(volume_id)


# -- one audit for the deployment ------------------------------------------------------------


def test_one_audit_for_the_deployment_reports_per_host_and_ignores_other_tools(dc):
    c1 = dc.clients[0]
    # what other tools made on the same hosts
    other = uuid.uuid4()
    backing = dc.tmp / "other-tool.img"
    backing.write_bytes(b"\0" * 1024 * 1024)
    dc.storage.run("tgtadm", "--control-port", str(dc.tgtd.control_port), "--lld", "iscsi",
                   "--mode", "target", "--op", "new", "--tid", "900",
                   "--targetname", f"iqn.2010-10.org.openstack:volume-{other}")
    dc.storage.run("tgtadm", "--control-port", str(dc.tgtd.control_port), "--lld", "iscsi",
                   "--mode", "logicalunit", "--op", "new", "--tid", "900", "--lun", "1",
                   "--backing-store", str(backing))
    secret_xml = ("<secret ephemeral='no' private='yes'><usage type='iscsi'>"
                  "<target>volume-{}</target></usage></secret>")
    foreign_secret = subprocess.run(
        ["virsh", "-c", dc.b.uri, "secret-define", "/dev/stdin"],
        input=secret_xml.format(other), text=True, capture_output=True, check=True)
    foreign = TestGuest.start(uri=dc.b.uri, name=f"other-tool-{dc.tag}", kind="diskless")
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{backing}'/><target dev='vdb' bus='virtio'/>"
            f"<serial>{other}</serial><alias name='ua-{other}'/></disk>")
    subprocess.run(["virsh", "-c", dc.b.uri, "attach-device", foreign.uuid, "/dev/stdin",
                    "--live"], input=disk, text=True, capture_output=True, check=True)
    try:
        clean = audit_clean(dc, "other tools made a target, a secret and a disk")
        assert "2 node(s)" in clean and str(other) not in clean
        # a real divergence on B: a secret of one of ours that serves nothing
        ours = c1.create_volume(f"{dc.tag}-audit", 1).volume_id
        subprocess.run(["virsh", "-c", dc.b.uri, "secret-define", "/dev/stdin"],
                       input=secret_xml.format(ours), text=True, capture_output=True,
                       check=True)
        audit = dc.audit()
        print(f"    audit with a stray secret on B: {audit.stdout.strip()}")
        assert audit.returncode == 1
        assert f"node {dc.node_ids[dc.b]}: secret-without-bdm: volume {ours}" in audit.stdout
        repaired = dc.audit(repair=True)
        print(f"    audit --repair: {repaired.stdout.strip().splitlines()[-1]}")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        audit_clean(dc, "the repair")
        # the other tools' objects are all still there
        assert f"volume-{other}" in subprocess.run(
            ["virsh", "-c", dc.b.uri, "secret-list"], capture_output=True, text=True).stdout
        assert str(other) in virsh(dc.b.uri, "dumpxml", foreign.uuid).stdout
        assert f"volume-{other}" in dc.storage.run(
            "tgtadm", "--control-port", str(dc.tgtd.control_port), "--lld", "iscsi",
            "--mode", "target", "--op", "show").stdout
        c1.delete_volume(ours)
    finally:
        foreign.destroy()
        dc.storage.run("tgtadm", "--control-port", str(dc.tgtd.control_port), "--lld", "iscsi",
                       "--mode", "target", "--op", "delete", "--force", "--tid", "900",
                       check=False)
        uuid_ = foreign_secret.stdout.split()[1]
        virsh(dc.b.uri, "secret-undefine", uuid_, check=False)
