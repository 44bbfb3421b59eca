"""A small typed Python client over the generated stubs.

Retries on UNAVAILABLE come from gRPC's service config (common/grpcutil.py);
errors arrive as the exception classes of common/errors.py."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from vmattach.common.enums import ACCESS_MODE
from vmattach.common.errors import Unavailable
from vmattach.common.grpcutil import call, channel
from vmattach.common.tls import TlsFiles
from vmattach.common.validate import require_mode
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, servers_pb2_grpc, types_pb2
from vmattach.v1 import servers_pb2 as spb


class VmattachClient:
    def __init__(self, address: str, controller_address: str | None = None,
                 timeout: float = 120.0, token: str = "", tls: TlsFiles | None = None):
        """token: a user token (vmattach token create), sent as `authorization:
        Bearer`; tls: the CA (and the client certificate) when vmattach speaks TLS."""
        self.timeout = timeout
        metadata = [("authorization", f"Bearer {token}")] if token else []
        # reconnect soon after a refused connection: a server that is starting listens in a moment
        options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
        self._channel = channel(address, tls=tls, metadata=metadata, options=options)
        self._addresses = {address: self._channel}
        self._controller_channel = self._channel
        if controller_address and controller_address != address:
            self._controller_channel = channel(controller_address, tls=tls, metadata=metadata,
                                               options=options)
            self._addresses[controller_address] = self._controller_channel
        self.servers = servers_pb2_grpc.ServersStub(self._channel)
        self.controller = controller_pb2_grpc.ControllerStub(self._controller_channel)

    def wait_connected(self, timeout: float) -> None:
        """Wait up to timeout seconds for a connection to every address (as
        grpcurl does before its call): a server started a moment ago in the
        background answers; Unavailable names an address nothing answered at.
        timeout 0: no wait (the first call fails at once instead)."""
        if timeout <= 0:
            return
        for address, ch in self._addresses.items():
            try:
                grpc.channel_ready_future(ch).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise Unavailable(f"could not reach vmattach at {address}: no connection within"
                                  f" {timeout:g} s",
                                  reason="UNREACHABLE", metadata={"address": address}) from None

    def close(self) -> None:
        self._channel.close()
        if self._controller_channel is not self._channel:
            self._controller_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request):
        return call(method, request, timeout=self.timeout)

    # volumes (Controller)
    def create_volume(self, name: str, size_gb: int, multiattach: bool = False) -> cpb.Volume:
        return self._call(self.controller.CreateVolume,
                          cpb.CreateVolumeRequest(name=name, size_gb=size_gb, multiattach=multiattach))

    def get_volume(self, volume_id: str) -> cpb.Volume:
        return self._call(self.controller.GetVolume, cpb.GetVolumeRequest(volume_id=volume_id))

    def _pages(self, method, request, field: str) -> Iterator:
        """Every item of a paginated List call, page after page."""
        while True:
            page = self._call(method, request)
            yield from getattr(page, field)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def list_volumes(self, page_size: int = 100, all_projects: bool = False) -> Iterator[cpb.Volume]:
        return self._pages(self.controller.ListVolumes, cpb.ListVolumesRequest(
            page_size=page_size, all_projects=all_projects), "volumes")

    def delete_volume(self, volume_id: str) -> None:
        self._call(self.controller.DeleteVolume, cpb.DeleteVolumeRequest(volume_id=volume_id))

    # attachments and servers (Servers facade)
    def attach_volume(self, server_id: str, volume_id: str, device: str = "", tag: str = "",
                      delete_on_termination: bool = False,
                      request_id: str = "", mode: str = "") -> spb.VolumeAttachment:
        """mode: "rw" or "ro" (empty: the server's default, rw)."""
        return self._call(self.servers.AttachVolume, spb.AttachVolumeRequest(
            server_id=server_id, volume_id=volume_id, device=device, tag=tag,
            delete_on_termination=delete_on_termination, request_id=request_id,
            mode=ACCESS_MODE.to_pb(require_mode(mode))))

    def extend_volume(self, volume_id: str, new_size_gb: int) -> spb.ServersExtendVolumeResponse:
        """Grow a volume, attached or not (the Servers facade: every server's
        disk shows the new size when this returns)."""
        return self._call(self.servers.ExtendVolume, spb.ServersExtendVolumeRequest(
            volume_id=volume_id, new_size_gb=new_size_gb))

    def detach_volume(self, server_id: str, volume_id: str) -> None:
        self._call(self.servers.DetachVolume,
                   spb.DetachVolumeRequest(server_id=server_id, volume_id=volume_id))

    def get_attachment(self, server_id: str, volume_id: str) -> spb.VolumeAttachment:
        return self._call(self.servers.GetVolumeAttachment,
                          spb.GetVolumeAttachmentRequest(server_id=server_id, volume_id=volume_id))

    def list_attachments(self, server_id: str = "", page_size: int = 100,
                         volume_id: str = "") -> Iterator[spb.VolumeAttachment]:
        """A server's attachments, or a volume's (all its servers) with volume_id."""
        return self._pages(self.servers.ListVolumeAttachments, spb.ListVolumeAttachmentsRequest(
            server_id=server_id, volume_id=volume_id, page_size=page_size), "attachments")

    def list_servers(self, page_size: int = 100,
                     all_projects: bool = False) -> Iterator[types_pb2.Server]:
        return self._pages(self.servers.ListServers, spb.ListServersRequest(
            page_size=page_size, all_projects=all_projects), "servers")

    def get_server(self, server_id: str) -> types_pb2.Server:
        return self._call(self.servers.GetServer, spb.GetServerRequest(server_id=server_id))

    def list_nodes(self) -> list[spb.NodeStatus]:
        return list(self._call(self.servers.ListNodes, spb.ListNodesRequest()).nodes)
