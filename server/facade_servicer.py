"""vmattach.v1.Servers: validate, call the Facade, build the answer."""

from __future__ import annotations

import json

from google.protobuf import timestamp_pb2

from vmattach.common import auth
from vmattach.common.enums import ACCESS_MODE, ATTACHMENT_STATE, BUS, SERVER_STATE
from vmattach.common.validate import page_size, require_size_gb, require_uuid
from vmattach.server.bdms import BdmStore
from vmattach.server.calls import Deadline
from vmattach.server.devices import guest_path_hint
from vmattach.server.facade import AttachRequest, Facade
from vmattach.server.models import BlockDeviceMapping, ServerRecord
from vmattach.v1 import servers_pb2 as pb
from vmattach.v1 import servers_pb2_grpc, types_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Servers"].full_name


def _ts(value) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if value is not None:
        ts.FromDatetime(value)
    return ts


def attachment_to_pb(bdm: BlockDeviceMapping) -> pb.VolumeAttachment:
    prefix = bdm.device_name.removeprefix("/dev/")[:2]
    return pb.VolumeAttachment(
        attachment_id=bdm.attachment_id, server_id=bdm.instance_uuid, volume_id=bdm.volume_id,
        device=bdm.device_name, tag=bdm.tag or "",
        delete_on_termination=bdm.delete_on_termination,
        guest_path_hint=guest_path_hint(prefix, bdm.volume_id), state=ATTACHMENT_STATE.to_pb(bdm.state),
        created_at=_ts(bdm.created_at), mode=ACCESS_MODE.to_pb(BdmStore.mode_of(bdm)),
        progress=bdm.progress or "")


def server_to_pb(record: ServerRecord) -> types_pb2.Server:
    return types_pb2.Server(
        server_id=record.server_id, name=record.name, state=SERVER_STATE.to_pb(record.state),
        device_prefix=record.device_prefix, root_device=record.root_device,
        disks=[types_pb2.ServerDisk(device=d["device"], serial=d["serial"], bus=BUS.to_pb(d.get("bus")),
                                    alias=d.get("alias", "")) for d in json.loads(record.disks)],
        node_id=record.node_id, updated_at=_ts(record.updated_at), project_id=record.project_id)


class ServersServicer(servers_pb2_grpc.ServersServicer):
    def __init__(self, facade: Facade):
        self.f = facade

    def AttachVolume(self, request, context):
        req = AttachRequest(
            server_id=require_uuid(request.server_id, "server_id"),
            volume_id=require_uuid(request.volume_id, "volume_id"),
            device=request.device, tag=request.tag,
            delete_on_termination=request.delete_on_termination,
            request_id=request.request_id and require_uuid(request.request_id, "request_id"),
            mode=ACCESS_MODE.to_word(request.mode, default="rw"))
        return attachment_to_pb(self.f.attach(req, Deadline.of(context, self.f.call_cap)))

    def DetachVolume(self, request, context):
        self.f.detach(require_uuid(request.server_id, "server_id"),
                      require_uuid(request.volume_id, "volume_id"),
                      Deadline.of(context, self.f.call_cap))
        return pb.DetachVolumeResponse()

    def GetVolumeAttachment(self, request, context):
        return attachment_to_pb(self.f.get(require_uuid(request.server_id, "server_id"),
                                           require_uuid(request.volume_id, "volume_id")))

    def ListVolumeAttachments(self, request, context):
        server_id = request.server_id and require_uuid(request.server_id, "server_id")
        volume_id = request.volume_id and require_uuid(request.volume_id, "volume_id")
        rows, token = self.f.list(server_id, page_size(request.page_size), request.page_token,
                                  volume_id)
        return pb.ListVolumeAttachmentsResponse(
            attachments=[attachment_to_pb(b) for b in rows], next_page_token=token)

    def ListServers(self, request, context):
        rows, token = self.f.nodes.list_servers(page_size(request.page_size), request.page_token,
                                                auth.current().list_scope(request.all_projects))
        return pb.ListServersResponse(servers=[server_to_pb(r) for r in rows],
                                      next_page_token=token)

    def GetServer(self, request, context):
        return server_to_pb(self.f.nodes.visible_server(require_uuid(request.server_id,
                                                                      "server_id")))

    def ExtendVolume(self, request, context):
        size_gb, servers = self.f.extend(require_uuid(request.volume_id, "volume_id"),
                                         require_size_gb(request.new_size_gb, "new_size_gb"),
                                         Deadline.of(context, self.f.call_cap))
        return pb.ServersExtendVolumeResponse(size_gb=size_gb, server_ids=servers)

    def ListNodes(self, request, context):
        return pb.ListNodesResponse(nodes=[
            pb.NodeStatus(node_id=state.name, address=state.address, reachable=state.reachable,
                          servers=servers, attachments=attachments,
                          last_seen=_ts(state.last_seen) if state.last_seen else None,
                          last_error=state.last_error[:500])
            for state, servers, attachments in self.f.nodes.statuses()])
