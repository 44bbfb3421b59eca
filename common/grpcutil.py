"""gRPC plumbing shared by every vmattach process: the server (health,
reflection, the error interceptor), and turning a received status back into
the exception hierarchy."""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from vmattach.common.errors import DOMAIN, InvalidArgument, VmattachError, error_class, status_code
from vmattach.common.redact import mask, redacted, secrets_of

LOG = logging.getLogger(__name__)


def _status(code: grpc.StatusCode, message: str, reason: str,
            metadata: dict[str, str] | None = None) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps VmattachError to its status (with an ErrorInfo detail), any other
    exception to INTERNAL with an incident id; logs every call once."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method
        deserialize = handler.request_deserializer

        def unary(request, context):
            start = time.perf_counter()
            outcome = "OK"
            try:
                if deserialize is not None:  # here, so that garbage is INVALID_ARGUMENT, not INTERNAL
                    try:
                        request = deserialize(request)
                    except DecodeError:
                        raise InvalidArgument(f"the request is not a valid {method} message",
                                              reason="MALFORMED_REQUEST") from None
                return inner(request, context)
            except VmattachError as exc:
                code = status_code(exc)
                outcome = code.name
                # a backend may have echoed a secret of the request into its message
                hidden = secrets_of(request) if isinstance(request, Message) else []
                context.abort_with_status(_status(
                    code, mask(exc.message, hidden), exc.reason,
                    {k: mask(v, hidden) for k, v in exc.metadata.items()}))
            except Exception as exc:
                incident = uuid.uuid4().hex[:12]
                outcome = "INTERNAL"
                hidden = secrets_of(request) if isinstance(request, Message) else []
                LOG.error("%s failed (incident %s); request: %s\n%s", method, incident,
                          redacted(request) if isinstance(request, Message) else "(undecoded)",
                          mask("".join(traceback.format_exception(exc)), hidden))
                context.abort_with_status(_status(
                    grpc.StatusCode.INTERNAL, f"internal error (incident {incident})", "INTERNAL"))
            finally:
                if LOG.isEnabledFor(logging.INFO):
                    LOG.info("%s %s %.1fms", method, outcome, (time.perf_counter() - start) * 1000)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=None,
            response_serializer=handler.response_serializer)


@dataclass
class Service:
    """One gRPC service to host: its full name, the generated add_* function
    and the servicer instance."""
    name: str
    add: Callable
    servicer: object
    on_stop: list[Callable[[], None]] = field(default_factory=list)


def new_server(address: str, max_workers: int = 32,
               interceptors: Iterable[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, int]:
    """A server bound to address (port 0: a free port); not started yet.
    Extra interceptors (tests record or delay calls with them) run outside
    the error mapping."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[*interceptors, ErrorInterceptor()],
                         options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def start_server(server: grpc.Server, services: Iterable[Service]) -> health.HealthServicer:
    """Add services, the health service and reflection, then start."""
    services = list(services)
    health_servicer = health.HealthServicer()
    for svc in services:
        svc.add(svc.servicer, server)
        health_servicer.set(svc.name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [svc.name for svc in services]
    names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    server.start()
    return health_servicer


def create_server(services: Iterable[Service], address: str = "127.0.0.1:0",
                  max_workers: int = 32) -> tuple[grpc.Server, int]:
    """Start a server with services (plus health and reflection) on address;
    returns the server and the bound port."""
    server, port = new_server(address, max_workers)
    start_server(server, services)
    return server, port


# Client side -----------------------------------------------------------------

# Retries on UNAVAILABLE for every method, through gRPC's service config.
RETRY_SERVICE_CONFIG = """{
  "methodConfig": [{
    "name": [{}],
    "retryPolicy": {
      "maxAttempts": 4,
      "initialBackoff": "0.05s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}"""


def channel(address: str, retries: bool = True) -> grpc.Channel:
    options: list[tuple[str, int | str]] = [("grpc.enable_retries", 1 if retries else 0)]
    if retries:
        options.append(("grpc.service_config", RETRY_SERVICE_CONFIG))
    return grpc.insecure_channel(address, options=options)


def error_from_rpc(err: grpc.RpcError) -> VmattachError:
    """The VmattachError for a status received from a vmattach service."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    reason, metadata = code.name, {}
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
    return error_class(code)(message or code.name, reason=reason, metadata=metadata)


def call(method, request, *, timeout: float | None = None, metadata=None):
    """Call a unary stub method; a failure raises the matching VmattachError."""
    try:
        return method(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        raise error_from_rpc(err) from None


