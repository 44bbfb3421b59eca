"""vmattach.v1.Node: validate, call NodeManager, build the answer."""

from __future__ import annotations

import time

from vmattach.common.enums import ACCESS_MODE, AUTH_METHOD, BUS, DRIVER_VOLUME_TYPE, SERVER_STATE
from vmattach.common.errors import InvalidArgument
from vmattach.common.validate import require_uuid
from vmattach.common.version import version
from vmattach.node.connectors import ConnectionInfo, StagedVolume
from vmattach.node.hypervisor import Disk, Domain
from vmattach.node.manager import NodeManager
from vmattach.v1 import node_pb2 as pb
from vmattach.v1 import node_pb2_grpc, types_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Node"].full_name


def connection_info_from_pb(msg: types_pb2.ConnectionInfo) -> ConnectionInfo:
    if not msg.driver_volume_type:
        raise InvalidArgument("connection_info.driver_volume_type is required")
    d = msg.data
    return ConnectionInfo(
        driver_volume_type=DRIVER_VOLUME_TYPE.to_word(msg.driver_volume_type),
        target_portal=d.target_portal, target_iqn=d.target_iqn, target_lun=d.target_lun,
        auth_method=AUTH_METHOD.to_word(d.auth_method, default=""),
        auth_username=d.auth_username, auth_password=d.auth_password,
        access_mode=ACCESS_MODE.to_word(d.access_mode, default="rw"), device_path=d.device_path,
        serial=msg.serial,
        multiattach=msg.multiattach)


def staged_from_pb(msg: pb.StagedVolume) -> StagedVolume:
    return StagedVolume(msg.volume_id, DRIVER_VOLUME_TYPE.to_word(msg.driver_volume_type),
                        msg.device_path, msg.secret_usage)


def staged_to_pb(staged: StagedVolume) -> pb.StagedVolume:
    return pb.StagedVolume(volume_id=staged.volume_id,
                           driver_volume_type=DRIVER_VOLUME_TYPE.to_pb(staged.driver_volume_type),
                           device_path=staged.device_path, secret_usage=staged.secret_usage)


def disk_to_pb(disk: Disk) -> types_pb2.ServerDisk:
    return types_pb2.ServerDisk(device=disk.device, serial=disk.serial, bus=BUS.to_pb(disk.bus),
                                alias=disk.alias)


def server_to_pb(domain: Domain) -> types_pb2.Server:
    root = domain.root_disk
    return types_pb2.Server(server_id=domain.uuid, name=domain.name,
                            state=SERVER_STATE.to_pb(domain.state),
                            device_prefix=domain.device_prefix,
                            root_device=root.device if root else "",
                            disks=[disk_to_pb(d) for d in domain.disks],
                            project_id=domain.project_id)


def _volume_id(request) -> str:
    return require_uuid(request.volume_id, "volume_id")


def _connection_info(request) -> ConnectionInfo:
    if not request.HasField("connection_info"):
        raise InvalidArgument("connection_info is required")
    return connection_info_from_pb(request.connection_info)


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, manager: NodeManager):
        self.m = manager

    def NodeGetInfo(self, request, context):
        info = self.m.info()
        c = info.connector
        return pb.NodeGetInfoResponse(
            node_id=info.node_id, max_volumes_per_server=info.max_volumes_per_server,
            version=version(), stage_in_publish=True,
            connector=types_pb2.Connector(ip=c.ip, host=c.host, initiator=c.initiator,
                                          platform=c.platform, os_type=c.os_type,
                                          multipath=c.multipath))

    def ListServers(self, request, context):
        return pb.NodeListServersResponse(servers=[server_to_pb(d) for d in self.m.list_servers()])

    def ListSecrets(self, request, context):
        return pb.NodeListSecretsResponse(usages=self.m.list_secrets())

    def NodeStageVolume(self, request, context):
        staged = self.m.stage(_volume_id(request), _connection_info(request))
        return pb.NodeStageVolumeResponse(staged=staged_to_pb(staged))

    def NodeUnstageVolume(self, request, context):
        self.m.unstage(_volume_id(request), _connection_info(request))
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request, context):
        staged = staged_from_pb(request.staged) if request.HasField("staged") else None
        disk = self.m.publish(require_uuid(request.server_id, "server_id"), _volume_id(request),
                              request.device, _connection_info(request), staged,
                              stage=request.stage)
        return pb.NodePublishVolumeResponse(disk=disk_to_pb(disk))

    def NodeUnpublishVolume(self, request, context):
        unstaged = self.m.unpublish(require_uuid(request.server_id, "server_id"),
                                    _volume_id(request),
                                    _connection_info(request) if request.unstage else None)
        return pb.NodeUnpublishVolumeResponse(unstaged=unstaged)

    def NodeExtendVolume(self, request, context):
        size = self.m.extend(require_uuid(request.server_id, "server_id"), _volume_id(request),
                             request.new_size_bytes, _connection_info(request))
        return pb.NodeExtendVolumeResponse(size_bytes=size)

    def NodeWatchServers(self, request, context):
        # wait_seconds: 0-60 (common/fields.py)
        # in slices of a second: a cancelled call (the caller went, or this server
        # stops) frees its thread at once
        deadline = time.monotonic() + request.wait_seconds
        while True:
            left = deadline - time.monotonic()
            events, last, lost = self.m.events.wait(max(request.after_seq, 0), min(left, 1.0))
            if events or lost or left <= 1.0 or not context.is_active():
                break
        return pb.NodeWatchServersResponse(
            epoch=self.m.events.epoch, last_seq=last, events_lost=lost,
            events=[pb.NodeServerEvent(seq=e.seq, server_id=e.server_id, event=e.event)
                    for e in events])
