"""`vmattach audit`: compare the four places an attachment lives and list
every divergence; `--repair` fixes what can be fixed.

1. the facade's block_device_mapping rows (its database),
2. the Controller's volumes, attachments and exports (its database),
3. tgtd's targets and ACLs (tgtadm),
4. libvirt's domain disks and secrets (this host's hypervisor).

It reads the databases and daemons directly (an operator's tool on the
host, like nova-manage) and repairs through the services' gRPC APIs and
the reconciler, so a repair takes the same paths as a normal operation.
Run it as its own process: it binds the models to its own connections."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vmattach.common.config import Settings
from vmattach.common.db import open_database
from vmattach.common.errors import VmattachError
from vmattach.common.runner import CommandRunner

LOG = logging.getLogger(__name__)
VOLUME_SECRET_PREFIX = "volume-"
ALIAS_PREFIX = "ua-"


@dataclass(frozen=True)
class Divergence:
    kind: str
    volume_id: str
    server_id: str = ""
    detail: str = ""

    def __str__(self) -> str:
        where = f"volume {self.volume_id}" + (f" server {self.server_id}" if self.server_id else "")
        return f"{self.kind}: {where}: {self.detail}"


@dataclass
class Snapshot:
    bdms: list = field(default_factory=list)            # live BDM rows
    volumes: dict = field(default_factory=dict)         # id -> Volume
    attachments: list = field(default_factory=list)     # Controller attachment rows
    exports: dict = field(default_factory=dict)         # volume id -> Export
    targets: dict = field(default_factory=dict)         # tid -> tgt Target
    domains: dict = field(default_factory=dict)         # server id -> Domain
    secrets: list = field(default_factory=list)         # secret usages


def snapshot(settings: Settings, hypervisor=None, runner: CommandRunner | None = None) -> Snapshot:
    from vmattach.controller import models as cm
    from vmattach.controller.tgt import TgtAdm
    from vmattach.server import models as sm

    snap = Snapshot()
    facade_db = open_database(settings.database_url_for("servers"), sm.MODELS)
    with facade_db.connection_context():
        snap.bdms = list(sm.BlockDeviceMapping.select().where(sm.BlockDeviceMapping.deleted == 0))
    facade_db.close()
    controller_db = open_database(settings.database_url_for("controller"), cm.MODELS)
    with controller_db.connection_context():
        snap.volumes = {v.id: v for v in cm.Volume.select()}
        snap.attachments = list(cm.VolumeAttachment.select())
        snap.exports = {e.volume_id: e for e in cm.Export.select()}
    controller_db.close()
    snap.targets = TgtAdm(runner or CommandRunner(), settings.tgt_control_port).show()
    if hypervisor is None:
        from vmattach.node.libvirt_hypervisor import LibvirtHypervisor
        hypervisor = LibvirtHypervisor(settings.libvirt_uri)
    try:
        snap.domains = {d.uuid: d for d in hypervisor.list_domains()}
        snap.secrets = hypervisor.secret_usages()
    finally:
        hypervisor.close()
    return snap


def divergences(snap: Snapshot) -> list[Divergence]:
    from vmattach.controller.tgt import IQN_PREFIX
    from vmattach.controller.volumes import Connector

    found: list[Divergence] = []
    live = {(b.volume_id, b.instance_uuid): b for b in snap.bdms}
    attached = {(a.volume_id, a.instance_uuid): a for a in snap.attachments}

    # 1 <-> 2: the facade's rows against the Controller's attachments
    for (volume_id, server_id), bdm in live.items():
        if bdm.state != "attached":
            found.append(Divergence("operation-unfinished", volume_id, server_id,
                                    f"BDM {bdm.id} is {bdm.state} (last step {bdm.progress})"))
            continue
        att = attached.get((volume_id, server_id))
        if att is None or att.attach_status != "attached":
            found.append(Divergence("bdm-without-controller-attachment", volume_id, server_id,
                                    f"BDM {bdm.id} is attached; the Controller says "
                                    f"{att.attach_status if att else 'nothing'}"))
    for (volume_id, server_id), att in attached.items():
        if (volume_id, server_id) not in live:
            found.append(Divergence("controller-attachment-without-bdm", volume_id, server_id,
                                    f"the Controller has an attachment in {att.attach_status}"))
    for volume in snap.volumes.values():
        states = {a.attach_status for a in snap.attachments if a.volume_id == volume.id}
        expected = ("in-use" if "attached" in states or "detaching" in states
                    else "attaching" if states else "available")
        if volume.status in ("attaching", "detaching") and not states:
            found.append(Divergence("volume-status", volume.id, "",
                                    f"status {volume.status} with no attachment"))
        elif volume.status == "in-use" and expected != "in-use":
            found.append(Divergence("volume-status", volume.id, "",
                                    f"status in-use but attachments are {sorted(states)}"))
        elif volume.status == "available" and states:
            found.append(Divergence("volume-status", volume.id, "",
                                    f"status available but attachments are {sorted(states)}"))

    # 2 <-> 3: exports against tgtd
    by_iqn = {t.iqn: t for t in snap.targets.values()}
    for volume_id, export in snap.exports.items():
        initiators = {Connector.from_json(a.connector).initiator for a in snap.attachments
                      if a.volume_id == volume_id and a.connector}
        target = snap.targets.get(export.tid)
        if target is None or target.iqn != export.target_iqn:
            found.append(Divergence("export-missing-at-tgtd", volume_id, "",
                                    f"{export.target_iqn} (tid {export.tid}) is not in tgtd"))
            continue
        if not initiators:
            found.append(Divergence("export-without-connection", volume_id, "",
                                    f"{export.target_iqn} is exported with no connection"))
        if set(target.acls) != initiators:
            found.append(Divergence("acl-mismatch", volume_id, "",
                                    f"tgtd allows {sorted(target.acls)}, connections are "
                                    f"{sorted(initiators)}"))
    owned = {e.target_iqn for e in snap.exports.values()}
    for iqn, target in by_iqn.items():
        if iqn.startswith(IQN_PREFIX) and iqn not in owned:
            found.append(Divergence("target-without-export", iqn.removeprefix(IQN_PREFIX), "",
                                    f"tgtd has {iqn} (tid {target.tid}) that no export owns"))

    # 1 <-> 4: the facade's rows against libvirt's disks and secrets
    for server_id, domain in snap.domains.items():
        for disk in domain.disks:
            if not disk.alias.startswith(ALIAS_PREFIX):
                continue
            volume_id = disk.alias.removeprefix(ALIAS_PREFIX)
            if (volume_id, server_id) not in live:
                found.append(Divergence("disk-without-bdm", volume_id, server_id,
                                        f"the domain has disk {disk.device}"))
    for (volume_id, server_id), bdm in live.items():
        domain = snap.domains.get(server_id)
        if bdm.state == "attached" and domain is not None and \
                domain.disk_of_volume(volume_id) is None:
            found.append(Divergence("bdm-without-disk", volume_id, server_id,
                                    f"BDM {bdm.id} says {bdm.device_name}; the domain has no disk"))
    hosted = {v for (v, s) in live if s in snap.domains}
    for usage in snap.secrets:
        volume_id = usage.removeprefix(VOLUME_SECRET_PREFIX)
        if usage.startswith(VOLUME_SECRET_PREFIX) and volume_id not in hosted:
            found.append(Divergence("secret-without-bdm", volume_id, "",
                                    f"libvirt secret {usage} serves no attachment"))
    return found


def repair(found: list[Divergence], settings: Settings, snap: Snapshot) -> list[str]:
    """Fix each divergence through the services (and the reconciler);
    returns what it could not fix."""
    from vmattach.common.grpcutil import call
    from vmattach.controller.tgt import TgtAdm
    from vmattach.server.facade_app import build_facade
    from vmattach.server.reconciler import Reconciler
    from vmattach.v1 import controller_pb2 as cpb
    from vmattach.v1 import node_pb2 as npb
    from vmattach.v1 import types_pb2

    facade, close = build_facade(settings, settings.listen)
    failed: list[str] = []
    try:
        if any(d.kind == "operation-unfinished" for d in found):
            Reconciler(facade, settings.owner_lease).run_once()
        node = None
        for d in found:
            try:
                if d.kind == "controller-attachment-without-bdm":
                    for method, request in (
                            (facade.controller.ControllerUnpublishVolume,
                             cpb.ControllerUnpublishVolumeRequest(
                                 volume_id=d.volume_id, server_id=d.server_id)),
                            (facade.controller.MarkDetached, cpb.MarkDetachedRequest(
                                volume_id=d.volume_id, server_id=d.server_id)),
                            (facade.controller.UnreserveVolume, cpb.UnreserveVolumeRequest(
                                volume_id=d.volume_id, server_id=d.server_id))):
                        call(method, request, timeout=30)
                elif d.kind in ("export-without-connection", "acl-mismatch"):
                    for initiator in _extra_acls(d.volume_id, snap):
                        call(facade.controller.ControllerUnpublishVolume,
                             cpb.ControllerUnpublishVolumeRequest(
                                 volume_id=d.volume_id, server_id=_NIL,
                                 connector=types_pb2.Connector(initiator=initiator)), timeout=30)
                elif d.kind == "target-without-export":
                    target = next(t for t in snap.targets.values() if t.iqn.endswith(d.volume_id))
                    TgtAdm(CommandRunner(), settings.tgt_control_port).delete_target(target.tid, None)
                elif d.kind in ("disk-without-bdm", "secret-without-bdm"):
                    node = node or facade.nodes.node(_local_node_id(facade))
                    if d.kind == "disk-without-bdm":
                        call(node.stub.NodeUnpublishVolume, npb.NodeUnpublishVolumeRequest(
                            server_id=d.server_id, volume_id=d.volume_id), timeout=120)
                    call(node.stub.NodeUnstageVolume, npb.NodeUnstageVolumeRequest(
                        volume_id=d.volume_id, connection_info=types_pb2.ConnectionInfo(
                            driver_volume_type="iscsi", serial=d.volume_id,
                            data=types_pb2.ConnectionData(volume_id=d.volume_id))), timeout=30)
                elif d.kind in ("operation-unfinished", "volume-status",
                                "export-missing-at-tgtd"):
                    pass  # the reconciler above / the Controller's own export loop
                else:
                    failed.append(f"no automatic repair for {d}")
            except (VmattachError, StopIteration) as exc:
                failed.append(f"repair of {d} failed: {exc}")
    finally:
        close()
    return failed


_NIL = "00000000-0000-0000-0000-000000000000"


def _extra_acls(volume_id: str, snap: Snapshot) -> list[str]:
    """Initiators tgtd allows that no connection of the volume uses (all of
    them when there is no connection: the export then goes)."""
    from vmattach.controller.volumes import Connector
    export = snap.exports.get(volume_id)
    target = snap.targets.get(export.tid) if export else None
    used = {Connector.from_json(a.connector).initiator for a in snap.attachments
            if a.volume_id == volume_id and a.connector}
    extra = [i for i in (target.acls if target else []) if i not in used]
    return extra or ([] if used else [""])


def _local_node_id(facade) -> str:
    facade.nodes.refresh()
    handles = facade.nodes.handles()
    if not handles:
        raise VmattachError("no node answers")
    return handles[0].node_id


def run(settings: Settings, do_repair: bool) -> int:
    snap = snapshot(settings)
    found = divergences(snap)
    for d in found:
        print(d)
    if not found:
        print("audit: no divergence")
        return 0
    if not do_repair:
        print(f"audit: {len(found)} divergence(s)")
        return 1
    for problem in repair(found, settings, snap):
        print(problem)
    remaining = divergences(snapshot(settings))
    for d in remaining:
        print(f"after repair: {d}")
    print(f"audit: {len(found)} divergence(s), {len(remaining)} left after repair")
    return 1 if remaining else 0

