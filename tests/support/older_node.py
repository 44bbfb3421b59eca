"""OlderNode: a gRPC server interceptor for tests that makes a Node server
answer as a Node from before NodeGetInfo's `stage_in_publish` (a mixed fleet
during an upgrade). Such a Node does not know the fields added with it, and
proto3 drops fields a reader does not know: its requests arrive without
NodePublishVolume's `stage` and NodeUnpublishVolume's `unstage` and
`connection_info`, and its answers carry no `stage_in_publish` and no
`unstaged`. A fake at the outermost boundary, under tests/ only."""

from __future__ import annotations

import grpc

from vmattach.v1 import node_pb2 as pb

# method -> (request fields it never sees, answer fields it never sets), by message
_UNKNOWN = {
    "/vmattach.v1.Node/NodeGetInfo": (
        (pb.NodeGetInfoRequest, ()), (pb.NodeGetInfoResponse, ("stage_in_publish",))),
    "/vmattach.v1.Node/NodePublishVolume": (
        (pb.NodePublishVolumeRequest, ("stage",)), (pb.NodePublishVolumeResponse, ())),
    "/vmattach.v1.Node/NodeUnpublishVolume": (
        (pb.NodeUnpublishVolumeRequest, ("unstage", "connection_info")),
        (pb.NodeUnpublishVolumeResponse, ("unstaged",))),
}


def _without(message, kind, fields):
    """message (or its bytes, as the handlers below the project's interceptors
    take and give them) without fields."""
    parsed = kind.FromString(message) if isinstance(message, bytes) else message
    for name in fields:
        parsed.ClearField(name)
    return parsed.SerializeToString() if isinstance(message, bytes) else parsed


class OlderNode(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        unknown = _UNKNOWN.get(handler_call_details.method)
        if handler is None or unknown is None:
            return handler
        (request_kind, request_fields), (answer_kind, answer_fields) = unknown
        behaviour = handler.unary_unary

        def as_older(request, context):
            answer = behaviour(_without(request, request_kind, request_fields), context)
            return _without(answer, answer_kind, answer_fields)

        return grpc.unary_unary_rpc_method_handler(
            as_older, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
