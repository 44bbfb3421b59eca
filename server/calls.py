"""The facade's typed calls to the Controller and to a Node: one method per
RPC, plain arguments in, the useful part of the answer out. Each takes the
time it may use: the caller's Deadline for a forward step, or seconds for an
undo step (which gets UNDO_TIMEOUT even when the caller's time is up)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vmattach.common.enums import ACCESS_MODE
from vmattach.common.errors import DeadlineExceeded, NotFound, VmattachError
from vmattach.common.grpcutil import begin, call
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, node_pb2_grpc, types_pb2
from vmattach.v1 import node_pb2 as npb

LOG = logging.getLogger(__name__)

# Time given to each undo step, even when the caller's deadline has passed.
UNDO_TIMEOUT = 15.0
# A node's unpublish waits for the guest to release the disk: more time.
UNPUBLISH_TIMEOUT = UNDO_TIMEOUT * 4


class Deadline:
    """The time left on the incoming call, shared out to downstream calls."""

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    @classmethod
    def of(cls, context, cap: float) -> Deadline:
        # with no client deadline grpc reports a huge number (or None)
        remaining = context.time_remaining() if context is not None else None
        return cls(min(remaining, cap) if remaining is not None else cap)

    def left(self) -> float:
        return max(self.expires - time.monotonic(), 0.0)

    def remaining(self) -> float:
        """The time left for the next downstream call; DeadlineExceeded when none."""
        left = self.left()
        if left <= 0.001:
            raise DeadlineExceeded("deadline exceeded", reason="DEADLINE_EXCEEDED")
        return left


Time = Deadline | float


def _seconds(timeout: Time) -> float:
    return timeout.remaining() if isinstance(timeout, Deadline) else timeout


def _without_secret(info: types_pb2.ConnectionInfo) -> types_pb2.ConnectionInfo:
    """Disconnecting needs the target, never the CHAP secret: it does not travel."""
    bare = types_pb2.ConnectionInfo()
    bare.CopyFrom(info)
    bare.data.ClearField("auth_password")
    return bare


class ControllerCalls:
    """The Controller (Cinder's role) as the facade uses it."""

    def __init__(self, stub: controller_pb2_grpc.ControllerStub):
        self.stub = stub

    def get_volume(self, volume_id: str, timeout: Time) -> cpb.Volume:
        return call(self.stub.GetVolume, cpb.GetVolumeRequest(volume_id=volume_id),
                    timeout=_seconds(timeout))

    def create_attachment(self, volume_id: str, server_id: str, connector: types_pb2.Connector,
                          timeout: Time, attachment_id: str = "", mode: str = "rw",
                          project_id: str = "",
                          ) -> tuple[cpb.Volume, types_pb2.ConnectionInfo]:
        """attachment_create: os-reserve and initialize_connection for the
        connector in one step; the Controller's attachment gets attachment_id
        (the BDM's) and attach_mode mode; with project_id, a volume of another
        project is NotFound and stays as it was. The volume as reserved and
        the connection_info."""
        answer = call(self.stub.CreateAttachment, cpb.CreateAttachmentRequest(
            volume_id=volume_id, server_id=server_id, attachment_id=attachment_id,
            mode=ACCESS_MODE.to_pb(mode), project_id=project_id, connector=connector),
            timeout=_seconds(timeout))
        return answer.volume, answer.connection_info

    def delete_attachment(self, volume_id: str, server_id: str,
                          timeout: Time = UNDO_TIMEOUT) -> None:
        """attachment_delete: terminate_connection and os-detach (or
        os-unreserve) in one step, whatever the attachment's state; idempotent."""
        call(self.stub.DeleteAttachment,
             cpb.DeleteAttachmentRequest(volume_id=volume_id, server_id=server_id),
             timeout=_seconds(timeout))

    def publish(self, volume_id: str, server_id: str, connector: types_pb2.Connector,
                timeout: Time) -> types_pb2.ConnectionInfo:
        """initialize_connection again for the connector server_id's attachment
        was published for (idempotent): its connection_info."""
        return call(self.stub.ControllerPublishVolume, cpb.ControllerPublishVolumeRequest(
            volume_id=volume_id, server_id=server_id, connector=connector),
            timeout=_seconds(timeout)).connection_info

    def mark_attached(self, volume_id: str, server_id: str, device: str,
                      timeout: Time, mode: str = "rw") -> cpb.Volume:
        """os-attach; the volume as attached."""
        return call(self.stub.MarkAttached, cpb.MarkAttachedRequest(
            volume_id=volume_id, server_id=server_id, mountpoint=device,
            mode=ACCESS_MODE.to_pb(mode)),
            timeout=_seconds(timeout))

    def extend(self, volume_id: str, new_size_gb: int, timeout: Time) -> cpb.Volume:
        """os-extend: the file and the export grow (idempotent)."""
        return call(self.stub.ExtendVolume, cpb.ExtendVolumeRequest(
            volume_id=volume_id, new_size_gb=new_size_gb), timeout=_seconds(timeout))

    def delete_volume(self, volume_id: str, timeout: Time = UNDO_TIMEOUT) -> None:
        call(self.stub.DeleteVolume, cpb.DeleteVolumeRequest(volume_id=volume_id),
             timeout=_seconds(timeout))

    def begin_detaching(self, volume_id: str, server_id: str, timeout: Time) -> None:
        call(self.stub.BeginDetaching,
             cpb.BeginDetachingRequest(volume_id=volume_id, server_id=server_id),
             timeout=_seconds(timeout))

    def roll_detaching(self, volume_id: str, server_id: str,
                       timeout: Time = UNDO_TIMEOUT) -> None:
        """Back to in-use; a failure is only logged (the volume then shows
        `detaching` until the next detach or the audit)."""
        try:
            call(self.stub.RollDetaching,
                 cpb.RollDetachingRequest(volume_id=volume_id, server_id=server_id),
                 timeout=_seconds(timeout))
        except VmattachError as exc:
            LOG.error("roll detaching of %s failed: %s", volume_id, exc)


class NodeCalls:
    """One Node (os-brick's and libvirt's role) as the facade uses it."""

    def __init__(self, stub: node_pb2_grpc.NodeStub):
        self.stub = stub

    def begin_info(self, timeout: Time) -> Callable[[], npb.NodeGetInfoResponse]:
        """NodeGetInfo started now; the function returned waits for the node's
        answer, its connector in it (other work runs while the call is in
        flight)."""
        return begin(self.stub.NodeGetInfo, npb.NodeGetInfoRequest(), timeout=_seconds(timeout))

    def unstage(self, volume_id: str, info: types_pb2.ConnectionInfo,
                timeout: Time = UNDO_TIMEOUT) -> None:
        call(self.stub.NodeUnstageVolume, npb.NodeUnstageVolumeRequest(
            volume_id=volume_id, connection_info=_without_secret(info)),
            timeout=_seconds(timeout))

    def stage_and_publish(self, server_id: str, volume_id: str, device: str,
                          info: types_pb2.ConnectionInfo, timeout: Time,
                          in_one_call: bool = True) -> None:
        """Connect the node to the volume and attach its disk: one call
        (NodePublishVolume with stage, as Nova's driver attach_volume), or
        NodeStageVolume then NodePublishVolume for a node that cannot
        (NodeGetInfo's stage_in_publish false: an older Node)."""
        request = npb.NodePublishVolumeRequest(server_id=server_id, volume_id=volume_id,
                                               device=device, connection_info=info)
        if in_one_call:
            request.stage = True
        else:
            request.staged.CopyFrom(call(self.stub.NodeStageVolume, npb.NodeStageVolumeRequest(
                volume_id=volume_id, connection_info=info), timeout=_seconds(timeout)).staged)
        call(self.stub.NodePublishVolume, request, timeout=_seconds(timeout))

    def unpublish(self, server_id: str, volume_id: str, timeout: Time = UNPUBLISH_TIMEOUT,
                  unstage: types_pb2.ConnectionInfo | None = None) -> bool:
        """Detach the disk and wait for the guest; FailedPrecondition when the
        guest never releases it. A domain that no longer exists has no disk:
        done. With unstage (the volume's connection_info), the node unstages
        the volume too, in the same call (as Nova's driver detach_volume);
        returns whether it did (False: call unstage() later)."""
        request = npb.NodeUnpublishVolumeRequest(server_id=server_id, volume_id=volume_id)
        if unstage is not None:
            request.unstage = True
            request.connection_info.CopyFrom(_without_secret(unstage))
        try:
            return call(self.stub.NodeUnpublishVolume, request,
                        timeout=_seconds(timeout)).unstaged
        except NotFound as exc:
            if exc.reason != "SERVER_NOT_FOUND":
                raise
            LOG.info("server %s is gone: volume %s has no disk there", server_id, volume_id)
            return False

    def extend(self, server_id: str, volume_id: str, new_size_bytes: int,
               info: types_pb2.ConnectionInfo, timeout: Time) -> int:
        """Resize the server's disk of the volume; the capacity QEMU reports
        (0 for a domain that is not running)."""
        bare = types_pb2.ConnectionInfo()
        bare.CopyFrom(info)
        bare.data.ClearField("auth_password")  # a rescan needs the session, not the secret
        return call(self.stub.NodeExtendVolume, npb.NodeExtendVolumeRequest(
            server_id=server_id, volume_id=volume_id, new_size_bytes=new_size_bytes,
            connection_info=bare), timeout=_seconds(timeout)).size_bytes

    def servers(self, timeout: Time) -> list[types_pb2.Server]:
        """The domains on the node now, with their disks."""
        return list(call(self.stub.ListServers, npb.NodeListServersRequest(),
                         timeout=_seconds(timeout)).servers)

    def disk_of(self, server_id: str, volume_id: str, timeout: Time) -> bool:
        """Whether the domain shows a disk of the volume now (False also when
        the domain is gone)."""
        for server in self.servers(timeout):
            if server.server_id == server_id:
                return any(d.serial == volume_id or d.alias == f"ua-{volume_id}"
                           for d in server.disks)
        return False
