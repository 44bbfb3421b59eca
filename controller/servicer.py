"""vmattach.v1.Controller: validate, call VolumeManager, build the answer."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from vmattach.common import auth
from vmattach.common.enums import ACCESS_MODE, ATTACH_STATUS, AUTH_METHOD, DRIVER_VOLUME_TYPE, VOLUME_STATUS
from vmattach.common.validate import page_size, require_size_gb, require_uuid
from vmattach.controller.models import Volume, VolumeAttachment
from vmattach.controller.volumes import ConnectionInfo, Connector, VolumeManager
from vmattach.v1 import controller_pb2 as pb
from vmattach.v1 import controller_pb2_grpc, types_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name


def _ts(value) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def connector_from_pb(msg: types_pb2.Connector) -> Connector:
    return Connector(initiator=msg.initiator, ip=msg.ip, host=msg.host, platform=msg.platform,
                     os_type=msg.os_type, multipath=msg.multipath)


def connector_to_pb(c: Connector) -> types_pb2.Connector:
    return types_pb2.Connector(initiator=c.initiator, ip=c.ip, host=c.host, platform=c.platform,
                               os_type=c.os_type, multipath=c.multipath)


def connection_info_to_pb(info: ConnectionInfo) -> types_pb2.ConnectionInfo:
    return types_pb2.ConnectionInfo(
        driver_volume_type=DRIVER_VOLUME_TYPE.to_pb(info.driver_volume_type), serial=info.volume_id,
        data=types_pb2.ConnectionData(
            target_portal=info.target_portal, target_iqn=info.target_iqn,
            target_lun=info.target_lun, target_discovered=info.target_discovered,
            auth_method=AUTH_METHOD.to_pb(info.auth_method), auth_username=info.auth_username,
            auth_password=info.auth_password, access_mode=ACCESS_MODE.to_pb(info.access_mode),
            encrypted=info.encrypted, volume_id=info.volume_id),
        multiattach=info.multiattach)


def volume_to_pb(volume: Volume, attachments: list[VolumeAttachment]) -> pb.Volume:
    """The public view of a volume: never its CHAP credentials."""
    msg = pb.Volume(volume_id=volume.id, name=volume.name, size_gb=volume.size_gb,
                    status=VOLUME_STATUS.to_pb(volume.status),
                    attach_status=ATTACH_STATUS.to_pb(volume.attach_status),
                    multiattach=volume.multiattach, created_at=_ts(volume.created_at),
                    updated_at=_ts(volume.updated_at), project_id=volume.project_id)
    for att in attachments:
        record = msg.attachments.add(attachment_id=att.id, server_id=att.instance_uuid,
                                     mountpoint=att.mountpoint, attach_status=ATTACH_STATUS.to_pb(att.attach_status),
                                     attach_mode=ACCESS_MODE.to_pb(att.attach_mode))
        connector = Connector.from_json(att.connector)
        if connector:
            record.connector.CopyFrom(connector_to_pb(connector))
    return msg


class ControllerServicer(controller_pb2_grpc.ControllerServicer):
    def __init__(self, manager: VolumeManager):
        self.m = manager

    def CreateVolume(self, request, context):
        return volume_to_pb(self.m.create(request.name, request.size_gb, request.multiattach,
                                          auth.current().project), [])

    def GetVolume(self, request, context):
        return volume_to_pb(*self.m.get(require_uuid(request.volume_id, "volume_id")))

    def ListVolumes(self, request, context):
        volumes, attachments, token = self.m.list(page_size(request.page_size), request.page_token,
                                                  auth.current().list_scope(request.all_projects))
        return pb.ListVolumesResponse(
            volumes=[volume_to_pb(v, attachments[v.id]) for v in volumes], next_page_token=token)

    def DeleteVolume(self, request, context):
        self.m.delete(require_uuid(request.volume_id, "volume_id"))
        return pb.DeleteVolumeResponse()

    def _ids(self, request) -> tuple[str, str]:
        return (require_uuid(request.volume_id, "volume_id"),
                require_uuid(request.server_id, "server_id"))

    @staticmethod
    def _reservation(request) -> tuple[str, str, str]:
        """A reserve's attachment id, mode and project."""
        attachment_id = request.attachment_id and require_uuid(request.attachment_id,
                                                               "attachment_id")
        return (attachment_id, ACCESS_MODE.to_word(request.mode, default="rw"),
                request.project_id)

    def ReserveVolume(self, request, context):
        return volume_to_pb(*self.m.reserve(*self._ids(request), *self._reservation(request)))

    def CreateAttachment(self, request, context):
        view, info = self.m.create_attachment(*self._ids(request),
                                              connector_from_pb(request.connector),
                                              *self._reservation(request))
        return pb.CreateAttachmentResponse(volume=volume_to_pb(*view),
                                           connection_info=connection_info_to_pb(info))

    def DeleteAttachment(self, request, context):
        return volume_to_pb(*self.m.delete_attachment(*self._ids(request)))

    def UnreserveVolume(self, request, context):
        return volume_to_pb(*self.m.unreserve(*self._ids(request)))

    def ControllerPublishVolume(self, request, context):
        info = self.m.publish(*self._ids(request), connector_from_pb(request.connector))
        return pb.ControllerPublishVolumeResponse(connection_info=connection_info_to_pb(info))

    def ControllerUnpublishVolume(self, request, context):
        self.m.unpublish(*self._ids(request), connector_from_pb(request.connector))
        return pb.ControllerUnpublishVolumeResponse()

    def MarkAttached(self, request, context):
        volume_id, server_id = self._ids(request)
        return volume_to_pb(*self.m.mark_attached(volume_id, server_id, request.mountpoint,
                                                 ACCESS_MODE.to_word(request.mode, default="rw")))

    def BeginDetaching(self, request, context):
        return volume_to_pb(*self.m.begin_detaching(*self._ids(request)))

    def RollDetaching(self, request, context):
        return volume_to_pb(*self.m.roll_detaching(*self._ids(request)))

    def MarkDetached(self, request, context):
        return volume_to_pb(*self.m.mark_detached(*self._ids(request)))

    def ListExports(self, request, context):
        states, strays = self.m.export_states()
        return pb.ListExportsResponse(
            exports=[pb.ExportState(
                volume_id=e.volume_id, target_iqn=e.target_iqn, tid=e.tid, at_tgtd=e.at_tgtd,
                allowed_initiators=e.allowed_initiators,
                connection_initiators=e.connection_initiators) for e in states],
            stray_targets=[pb.StrayTarget(tid=t.tid, target_iqn=t.target_iqn,
                                          volume_id=t.volume_id) for t in strays])

    def ReconcileExports(self, request, context):
        done = self.m.reconcile_exports(prune=request.prune)
        return pb.ReconcileExportsResponse(targets_created=done.targets_created,
                                           targets_removed=done.targets_removed,
                                           acls_changed=done.acls_changed)

    def ExtendVolume(self, request, context):
        return volume_to_pb(*self.m.extend(require_uuid(request.volume_id, "volume_id"),
                                           require_size_gb(request.new_size_gb, "new_size_gb")))
