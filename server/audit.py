"""`vmattach audit`: compare the places an attachment lives, host by host,
and list every divergence; `--repair` fixes what can be fixed.

1. the facade's block_device_mapping rows (its own database),
2. the Controller's volumes, attachments and exports, and tgtd's targets
   and ACLs as the Controller sees them (Controller.ListVolumes, ListExports),
3. every node's domains, disks and secrets (Node.ListServers, ListSecrets).

The other services are read and repaired only through their RPCs, so the
audit takes the same paths as a normal operation and needs nothing on the
hosts themselves. Only this deployment's objects count: a volume is ours
when the Controller has it or a live BDM names it, and a disk, secret or
target that names no volume of ours (another tool on the same host) is
never reported or touched. Run it as its own process: it binds the facade's
models to its own connection."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vmattach.common.config import Settings
from vmattach.common.db import close_database, open_database
from vmattach.common.enums import ATTACH_STATUS, DRIVER_VOLUME_TYPE, VOLUME_STATUS
from vmattach.common.errors import VmattachError
from vmattach.common.grpcutil import call
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, node_pb2_grpc, types_pb2
from vmattach.v1 import node_pb2 as npb

LOG = logging.getLogger(__name__)
VOLUME_SECRET_PREFIX = "volume-"
ALIAS_PREFIX = "ua-"
CONTROLLER = "controller"
CALL_TIMEOUT = 30.0
NODE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Divergence:
    host: str          # "controller" or "node <node id>"
    kind: str
    volume_id: str
    server_id: str = ""
    detail: str = ""

    def __str__(self) -> str:
        where = " ".join(([f"volume {self.volume_id}"] if self.volume_id else [])
                         + ([f"server {self.server_id}"] if self.server_id else []))
        return f"{self.host}: {self.kind}: " + (f"{where}: " if where else "") + self.detail


@dataclass
class NodeView:
    """What one node answered (or why it did not)."""
    address: str
    node_id: str = ""                                # as configured, then as it answers
    servers: dict = field(default_factory=dict)     # server id -> types_pb2.Server
    secrets: list = field(default_factory=list)     # secret usages
    error: str = ""

    @property
    def host(self) -> str:
        return f"node {self.node_id or self.address}"


@dataclass
class Snapshot:
    bdms: list = field(default_factory=list)            # live BDM rows
    volumes: dict = field(default_factory=dict)         # id -> cpb.Volume (with attachments)
    exports: dict = field(default_factory=dict)         # volume id -> cpb.ExportState
    strays: list = field(default_factory=list)          # cpb.StrayTarget
    nodes: list = field(default_factory=list)           # NodeView

    def ours(self) -> set[str]:
        """This deployment's volume ids."""
        return set(self.volumes) | {b.volume_id for b in self.bdms}


def own_address(listen: str) -> str:
    """Where this host's `vmattach serve --listen LISTEN` answers: loopback
    for a wildcard listen (0.0.0.0:50051 answers at 127.0.0.1:50051, which
    a certificate names; 0.0.0.0 it never does)."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0"):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"[::1]:{port}"
    return listen


def controller_address(settings: Settings) -> str:
    return settings.controller_address or own_address(settings.listen)


def node_addresses(settings: Settings) -> list[tuple[str, str]]:
    """[(configured node id or "", address)]"""
    from vmattach.server.nodes import parse_nodes
    return parse_nodes(settings.nodes) or [("", own_address(settings.listen))]


def _channel(settings: Settings, address: str):
    """A channel with the service role (the facade's own credentials)."""
    from vmattach.server.app import connector, service_secret
    return connector(settings, None, service_secret(settings))(address)


def _read_node(settings: Settings, configured_id: str, address: str) -> NodeView:
    view = NodeView(address, configured_id)
    ch = _channel(settings, address)
    try:
        stub = node_pb2_grpc.NodeStub(ch)
        view.node_id = call(stub.NodeGetInfo, npb.NodeGetInfoRequest(),
                            timeout=NODE_TIMEOUT).node_id
        view.servers = {s.server_id: s for s in call(
            stub.ListServers, npb.NodeListServersRequest(), timeout=CALL_TIMEOUT).servers}
        view.secrets = list(call(stub.ListSecrets, npb.NodeListSecretsRequest(),
                                 timeout=CALL_TIMEOUT).usages)
    except VmattachError as exc:
        view.error = exc.message
    finally:
        ch.close()
    return view


def snapshot(settings: Settings) -> Snapshot:
    from vmattach.server import models as sm

    snap = Snapshot()
    facade_db = open_database(settings.database_url_for("servers"), sm.MODELS, sm.SCHEMA,
                              upgrade=settings.db_upgrade)
    try:
        with facade_db.connection_context():
            snap.bdms = list(sm.BlockDeviceMapping.select().where(
                sm.BlockDeviceMapping.deleted == 0))
    finally:
        close_database(facade_db)
    ch = _channel(settings, controller_address(settings))
    try:
        stub = controller_pb2_grpc.ControllerStub(ch)
        token = ""
        while True:
            page = call(stub.ListVolumes, cpb.ListVolumesRequest(page_size=1000, page_token=token),
                        timeout=CALL_TIMEOUT)
            snap.volumes.update((v.volume_id, v) for v in page.volumes)
            token = page.next_page_token
            if not token:
                break
        exports = call(stub.ListExports, cpb.ListExportsRequest(), timeout=CALL_TIMEOUT)
        snap.exports = {e.volume_id: e for e in exports.exports}
        snap.strays = list(exports.stray_targets)
    finally:
        ch.close()
    snap.nodes = [_read_node(settings, *node) for node in node_addresses(settings)]
    return snap


def _volume_of_disk(disk: types_pb2.ServerDisk) -> str:
    if disk.alias.startswith(ALIAS_PREFIX):
        return disk.alias.removeprefix(ALIAS_PREFIX)
    return disk.serial


def divergences(snap: Snapshot) -> list[Divergence]:
    found: list[Divergence] = []
    ours = snap.ours()
    live = {(b.volume_id, b.instance_uuid): b for b in snap.bdms}
    attached = {(v.volume_id, a.server_id): a for v in snap.volumes.values()
                for a in v.attachments}

    # 1 <-> 2: the facade's rows against the Controller's attachments
    for (volume_id, server_id), bdm in live.items():
        if bdm.state != "attached":
            found.append(Divergence(CONTROLLER, "operation-unfinished", volume_id, server_id,
                                    f"BDM {bdm.id} is {bdm.state} (last step {bdm.progress})"))
            continue
        att = attached.get((volume_id, server_id))
        att_status = ATTACH_STATUS.name(att.attach_status) if att else "nothing"
        if att_status != "attached":
            found.append(Divergence(CONTROLLER, "bdm-without-controller-attachment", volume_id,
                                    server_id, f"BDM {bdm.id} is attached; the Controller says "
                                    f"{att_status}"))
    for (volume_id, server_id), att in attached.items():
        if (volume_id, server_id) not in live:
            found.append(Divergence(CONTROLLER, "controller-attachment-without-bdm", volume_id,
                                    server_id,
                                    f"the Controller has an attachment in "
                                    f"{ATTACH_STATUS.name(att.attach_status)}"))
    for volume in snap.volumes.values():
        states = {ATTACH_STATUS.name(a.attach_status) for a in volume.attachments}
        expected = ("in-use" if "attached" in states or "detaching" in states
                    else "attaching" if states else "available")
        status = VOLUME_STATUS.name(volume.status)
        if status in ("attaching", "detaching") and not states:
            found.append(Divergence(CONTROLLER, "volume-status", volume.volume_id, "",
                                    f"status {status} with no attachment"))
        elif status == "in-use" and expected != "in-use":
            found.append(Divergence(CONTROLLER, "volume-status", volume.volume_id, "",
                                    f"status in-use but attachments are {sorted(states)}"))
        elif status == "available" and states:
            found.append(Divergence(CONTROLLER, "volume-status", volume.volume_id, "",
                                    f"status available but attachments are {sorted(states)}"))

    # 2 <-> tgtd: the Controller's exports against its targets
    for volume_id, export in snap.exports.items():
        if not export.at_tgtd:
            found.append(Divergence(CONTROLLER, "export-missing-at-tgtd", volume_id, "",
                                    f"{export.target_iqn} (tid {export.tid}) is not in tgtd"))
            continue
        if not export.connection_initiators:
            found.append(Divergence(CONTROLLER, "export-without-connection", volume_id, "",
                                    f"{export.target_iqn} is exported with no connection"))
        if set(export.allowed_initiators) != set(export.connection_initiators):
            found.append(Divergence(CONTROLLER, "acl-mismatch", volume_id, "",
                                    f"tgtd allows {sorted(export.allowed_initiators)}, "
                                    f"connections are {sorted(export.connection_initiators)}"))
    for stray in snap.strays:
        found.append(Divergence(CONTROLLER, "target-without-export", stray.volume_id, "",
                                f"tgtd has {stray.target_iqn} (tid {stray.tid}) that no export "
                                f"owns"))

    # 1 <-> 3: the facade's rows against each node's disks and secrets
    hosted = {}  # server id -> the node that hosts it
    for node in snap.nodes:
        if node.error:
            found.append(Divergence(node.host, "node-unreachable", "", "",
                                    f"{node.address}: {node.error}"))
            continue
        for server_id, server in node.servers.items():
            hosted[server_id] = node
            for disk in server.disks:
                volume_id = _volume_of_disk(disk)
                if volume_id in ours and (volume_id, server_id) not in live:
                    found.append(Divergence(node.host, "disk-without-bdm", volume_id, server_id,
                                            f"the domain has disk {disk.device}"))
    for (volume_id, server_id), bdm in live.items():
        node = hosted.get(server_id)
        if bdm.state == "attached" and node is not None and not any(
                _volume_of_disk(d) == volume_id for d in node.servers[server_id].disks):
            found.append(Divergence(node.host, "bdm-without-disk", volume_id, server_id,
                                    f"BDM {bdm.id} says {bdm.device_name}; the domain has no "
                                    f"disk"))
    for node in snap.nodes:
        used = {v for (v, s) in live if s in node.servers}
        for usage in node.secrets:
            volume_id = usage.removeprefix(VOLUME_SECRET_PREFIX)
            if usage.startswith(VOLUME_SECRET_PREFIX) and volume_id in ours \
                    and volume_id not in used:
                found.append(Divergence(node.host, "secret-without-bdm", volume_id, "",
                                        f"libvirt secret {usage} serves no attachment"))
    return sorted(found, key=lambda d: (d.host != CONTROLLER, d.host))


EXPORT_KINDS = ("export-missing-at-tgtd", "export-without-connection", "acl-mismatch",
                "target-without-export")


def repair(found: list[Divergence], settings: Settings, snap: Snapshot) -> list[str]:
    """Fix each divergence through the services' RPCs (and the reconciler);
    returns what it could not fix."""
    from vmattach.server.app import build_facade, service_secret
    from vmattach.server.reconciler import Reconciler
    facade, close = build_facade(settings, settings.listen, None, service_secret(settings))
    failed: list[str] = []
    nodes = {n.host: n for n in snap.nodes}
    try:
        if any(d.kind == "operation-unfinished" for d in found):
            Reconciler(facade, settings.owner_lease).run_once()
        if any(d.kind in EXPORT_KINDS for d in found):
            try:
                call(facade.controller.stub.ReconcileExports,
                     cpb.ReconcileExportsRequest(prune=True), timeout=CALL_TIMEOUT)
            except VmattachError as exc:
                failed.append(f"repair of the exports failed: {exc.message}")
        for d in found:
            try:
                if d.kind == "controller-attachment-without-bdm":
                    facade.controller.delete_attachment(d.volume_id, d.server_id, CALL_TIMEOUT)
                elif d.kind in ("disk-without-bdm", "secret-without-bdm"):
                    _repair_on_node(settings, nodes[d.host], d)
                elif d.kind == "bdm-without-disk":
                    # the disk left the guest (a detach that completed after it was
                    # rolled back): finish that detach through the facade
                    _finish_detach_without_disk(facade, d)
                elif d.kind in ("operation-unfinished", "volume-status", *EXPORT_KINDS):
                    pass  # the reconciler / ReconcileExports above
                else:
                    failed.append(f"no automatic repair for {d}")
            except VmattachError as exc:
                failed.append(f"repair of {d} failed: {exc.message}")
    finally:
        close()
    return failed


def _finish_detach_without_disk(facade, d: Divergence) -> None:
    from vmattach.server.models import BlockDeviceMapping as BDM
    with facade.db.connection_context():
        bdm = BDM.get_or_none((BDM.volume_id == d.volume_id) & (BDM.instance_uuid == d.server_id)
                              & (BDM.deleted == 0))
        if bdm is None or bdm.state != "attached":
            return  # gone or taken meanwhile
        node = facade.node(bdm.node_id)
        if node.disk_of(d.server_id, d.volume_id, CALL_TIMEOUT):
            return  # the disk is back: nothing to finish
        if not facade.detach_gone(bdm, node, server_gone=False):
            raise VmattachError(f"BDM {bdm.id} is busy", reason="ABORTED")


def _repair_on_node(settings: Settings, node: NodeView, d: Divergence) -> None:
    ch = _channel(settings, node.address)
    try:
        stub = node_pb2_grpc.NodeStub(ch)
        if d.kind == "disk-without-bdm":
            call(stub.NodeUnpublishVolume, npb.NodeUnpublishVolumeRequest(
                server_id=d.server_id, volume_id=d.volume_id), timeout=120)
        call(stub.NodeUnstageVolume, npb.NodeUnstageVolumeRequest(
            volume_id=d.volume_id, connection_info=types_pb2.ConnectionInfo(
                driver_volume_type=DRIVER_VOLUME_TYPE.to_pb("iscsi"), serial=d.volume_id,
                data=types_pb2.ConnectionData(volume_id=d.volume_id))), timeout=CALL_TIMEOUT)
    finally:
        ch.close()


def _summary(snap: Snapshot) -> str:
    return f"the Controller and {len(snap.nodes)} node(s)"


def write_metrics(path: str, found: list[Divergence]) -> None:
    """The divergence count in Prometheus' text format, for node_exporter's
    textfile collector (written whole, then renamed into place)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
    registry = CollectorRegistry()
    total = Gauge("vmattach_audit_divergences", "divergences the last audit found",
                  registry=registry)
    by_kind = Gauge("vmattach_audit_divergences_by_kind", "divergences the last audit found,"
                    " by kind", ["kind"], registry=registry)
    last = Gauge("vmattach_audit_last_run_timestamp_seconds", "when the last audit finished",
                 registry=registry)
    total.set(len(found))
    for d in found:
        by_kind.labels(d.kind).inc()
    last.set_to_current_time()
    write_to_textfile(path, registry)


def run(settings: Settings, do_repair: bool, metrics_file: str | None = None) -> int:
    snap = snapshot(settings)
    found = divergences(snap)
    if metrics_file:
        write_metrics(metrics_file, found)
    for d in found:
        print(d)
    if not found:
        print(f"audit: no divergence ({_summary(snap)} checked)")
        return 0
    hosts = len({d.host for d in found})
    if not do_repair:
        print(f"audit: {len(found)} divergence(s) on {hosts} host(s)")
        return 1
    for problem in repair(found, settings, snap):
        print(problem)
    remaining = divergences(snapshot(settings))
    for d in remaining:
        print(f"after repair: {d}")
    print(f"audit: {len(found)} divergence(s) on {hosts} host(s), {len(remaining)} left after "
          f"repair")
    return 1 if remaining else 0
