"""gRPC plumbing shared by every vmattach process: the server (health,
reflection, the error interceptor), and turning a received status back into
the exception hierarchy."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from vmattach.common import auth, fields
from vmattach.common import observability as obs
from vmattach.common.errors import (
    DOMAIN,
    InvalidArgument,
    ResourceExhausted,
    VmattachError,
    error_class,
    status_code,
)
from vmattach.common.health import Health, Probes
from vmattach.common.redact import mask, redacted, secrets_of
from vmattach.common.rules import prefix
from vmattach.common.tls import TlsFiles
from vmattach.common.turns import Turns, outside, result

LOG = logging.getLogger(__name__)
AUDIT = logging.getLogger("vmattach.audit")
MAX_LOGGED = 8192  # characters of a request or a traceback in one log line


def _ids(msg) -> list[str]:
    """The top-level *_id fields of a message, for the audit trail (ids are
    never secrets; anything long is cut)."""
    if not isinstance(msg, Message):
        return []
    return [f"{f.name}={prefix(v, 64)}" for f, v in msg.ListFields()
            if f.name.endswith("_id") and isinstance(v, str)]


class _Answer(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


# A status vmattach answers itself (e.g. UNAVAILABLE naming a lost node, after
# the rollback ran) is never retried by the client's transparent retries,
# which are meant for a server that could not be reached at all (gRFC A6).
NO_RETRY = ("grpc-retry-pushback-ms", "-1")


# An answer's status travels in its trailers, which gRPC caps at 8 KiB by
# default: a message or a detail that quoted a long input would turn the
# documented code into RESOURCE_EXHAUSTED. Every text of a status is cut.
MAX_MESSAGE = 1024
MAX_DETAIL = 256


def _status(code: grpc.StatusCode, message: str, reason: str,
            metadata: dict[str, str] | None = None,
            violations: Iterable[tuple[str, str]] = ()) -> grpc.Status:
    metadata = {prefix(k, 64): prefix(v, MAX_DETAIL) for k, v in list((metadata or {}).items())[:16]}
    if obs.request_id():  # every error says which request it was
        metadata["request_id"] = obs.request_id()
    info = error_details_pb2.ErrorInfo(reason=prefix(reason, 64), domain=DOMAIN, metadata=metadata)
    details = [any_pb2.Any()]
    details[0].Pack(info)
    violations = list(violations)[:8]
    if violations:  # which request fields were refused (google.rpc.BadRequest)
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=prefix(f, 128),
                                                        description=prefix(d, MAX_DETAIL, escape=False))
            for f, d in violations])
        details.append(any_pb2.Any())
        details[1].Pack(bad)
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0],
                                                    message=prefix(message, MAX_MESSAGE, escape=False),
                                                    details=details))
    return _Answer(status.code, status.details, (*status.trailing_metadata, NO_RETRY))


def _metadata_value(context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


# Threads of a server beyond the sum of its services' limits: the health
# check, reflection and the refusals of calls over a limit always find one.
SPARE_THREADS = 8
# Calls a server holds at once (running or waiting for a thread), as a
# multiple of its threads; beyond it gRPC itself answers RESOURCE_EXHAUSTED
# ("Concurrent RPC limit exceeded!") before any thread is taken.
QUEUE_FACTOR = 2


class CallLimits:
    """At most limits[service] calls of each service in flight at once on one
    server; one more is refused at once with ResourceExhausted instead of
    waiting for a thread. Services without a limit (health, reflection) are
    never refused here: the server has SPARE_THREADS threads beyond the sum
    of the limits for them."""

    def __init__(self, limits: dict[str, int]):
        self.limits = dict(limits)
        self._lock = threading.Lock()
        self._running = dict.fromkeys(self.limits, 0)

    def threads(self) -> int:
        return sum(self.limits.values()) + SPARE_THREADS

    def running(self, service: str) -> int:
        return self._running.get(service, 0)

    def enter(self, service: str) -> bool:
        """Take a slot of service (True) or raise ResourceExhausted; False for
        a service without a limit (nothing to give back)."""
        limit = self.limits.get(service)
        if limit is None:
            return False
        with self._lock:
            if self._running[service] >= limit:
                raise ResourceExhausted(
                    f"{service} is answering {limit} calls already, its limit; try again later",
                    reason="TOO_MANY_CALLS", metadata={"service": service, "limit": str(limit)})
            self._running[service] += 1
        return True

    def leave(self, service: str) -> None:
        with self._lock:
            self._running[service] -= 1


class ErrorInterceptor(grpc.ServerInterceptor):
    """Authenticates every call (with an Authenticator: common/auth.py) and
    makes its caller current; gives the call its request id (common/
    observability.py); maps VmattachError to its status (with an ErrorInfo
    detail), any other exception to INTERNAL with an incident id; logs every
    call once (health checks at DEBUG), counts it in grpc_server_handled_total
    / grpc_server_handling_seconds, and writes one audit line per
    state-changing or refused call. With CallLimits, a call of a service
    that has its limit of calls in flight is refused (RESOURCE_EXHAUSTED)
    before anything else is done for it."""

    def __init__(self, authenticator: auth.Authenticator | None = None,
                 limits: CallLimits | None = None, turns: Turns | None = None):
        self.authenticator = authenticator
        self.limits = limits
        self.turns = turns
        # method -> its wrapped handler: the wrapping depends on nothing but the method
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None or handler.unary_unary is None:
                return handler
            wrapped = self._handlers[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler, method: str):
        inner = handler.unary_unary
        deserialize = handler.request_deserializer

        authenticator = self.authenticator
        limits = self.limits
        rule = auth.rule_of(method)
        service, short = obs.split_method(method)
        level = logging.DEBUG if service in obs.QUIET_SERVICES else logging.INFO
        # a health check is answered at once, not after the calls waiting for their turn
        turn = self.turns.turn if self.turns is not None and service not in obs.QUIET_SERVICES \
            else contextlib.nullcontext

        def unary(request, context):
            rid = obs.accepted_request_id(_metadata_value(context, obs.REQUEST_ID_HEADER))
            with obs.request_context(rid), turn():
                return _unary(request, context)

        def _unary(request, context):
            start = time.perf_counter()
            outcome = "OK"
            caller = auth.current()
            acting = None
            response = None
            slot = False
            try:
                if limits is not None:
                    slot = limits.enter(service)
                if authenticator is not None:
                    caller = auth.ANONYMOUS
                    caller = authenticator.authenticate(method, context)
                    acting = auth.acting_as(caller)
                if deserialize is not None:  # here, so that garbage is INVALID_ARGUMENT, not INTERNAL
                    try:
                        request = deserialize(request)
                    except (DecodeError, RecursionError, ValueError):
                        raise InvalidArgument(f"the request is not a valid {method} message",
                                              reason="MALFORMED_REQUEST") from None
                if isinstance(request, Message):
                    fields.check(request)  # every field within its bounds (common/fields.py)
                response = inner(request, context)
                return response
            except VmattachError as exc:
                code = status_code(exc)
                outcome = code.name
                caller = getattr(exc, "caller", caller)
                # a backend may have echoed a secret of the request into its message
                hidden = secrets_of(request) if isinstance(request, Message) else []
                context.abort_with_status(_status(
                    code, mask(exc.message, hidden), exc.reason,
                    {k: mask(v, hidden) for k, v in exc.metadata.items()},
                    [(f, mask(d, hidden)) for f, d in getattr(exc, "violations", ())]))
            except Exception as exc:
                incident = uuid.uuid4().hex[:12]
                outcome = "INTERNAL"
                hidden = secrets_of(request) if isinstance(request, Message) else []
                LOG.error("%s failed (incident %s); request: %s\n%s", method, incident,
                          prefix(redacted(request), MAX_LOGGED, escape=False)
                          if isinstance(request, Message) else "(undecoded)",
                          prefix(mask("".join(traceback.format_exception(exc)), hidden), MAX_LOGGED,
                                 escape=False))
                context.abort_with_status(_status(
                    grpc.StatusCode.INTERNAL, f"internal error (incident {incident})", "INTERNAL"))
            finally:
                if slot and limits is not None:
                    limits.leave(service)
                if acting is not None:
                    auth.done_acting(acting)
                elapsed = time.perf_counter() - start
                obs.observe_server_call(method, outcome, elapsed)
                if LOG.isEnabledFor(level):
                    LOG.log(level, "%s %s %.1fms", method, outcome, elapsed * 1000,
                            extra={"grpc_service": service, "grpc_method": short,
                                   "grpc_code": outcome, "duration_ms": round(elapsed * 1000, 1)})
                if (rule.changes or outcome in ("UNAUTHENTICATED", "PERMISSION_DENIED")) \
                        and AUDIT.isEnabledFor(logging.INFO):
                    ids = dict.fromkeys(_ids(request) + _ids(response))
                    AUDIT.info("caller=[%s] rpc=%s %s result=%s", caller.describe(), method,
                               " ".join(ids), outcome)

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
    # what its health status depends on (common/health.py): name -> check
    probes: Probes = field(default_factory=dict)


def new_server(address: str, max_workers: int = 32,
               interceptors: Iterable[grpc.ServerInterceptor] = (), *,
               credentials: grpc.ServerCredentials | None = None,
               authenticator: auth.Authenticator | None = None,
               limits: CallLimits | None = None,
               turns: Turns | None = None) -> tuple[grpc.Server, int]:
    """A server bound to address (port 0: a free port); not started yet.
    Extra interceptors (tests record or delay calls with them) run outside
    the error mapping. With credentials it speaks TLS; with an authenticator
    every call is authenticated and authorised (common/auth.py). With limits
    (CallLimits) it has their threads (the sum of the services' limits and
    SPARE_THREADS, instead of max_workers) and holds at most QUEUE_FACTOR
    times as many calls at once. With turns, its calls run their Python one
    at a time (common/turns.py)."""
    maximum = None
    if limits is not None:
        max_workers = limits.threads()
        maximum = QUEUE_FACTOR * max_workers
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[*interceptors, ErrorInterceptor(authenticator, limits, turns)],
                         options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=maximum)
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind" (its C core logged why)
        port = 0
    if port == 0:
        raise InvalidArgument(f"cannot listen on {prefix(address)}: the port is in use (another"
                              " vmattach serve?) or the address is not one of this host's",
                              reason="INVALID_SETTING")
    return server, port


def start_server(server: grpc.Server, services: Iterable[Service],
                 health_status: Health | None = None) -> health.HealthServicer:
    """Add services, the health service and reflection, then start. The
    health service answers what health_status says of the services (each
    SERVING when there is none)."""
    services = list(services)
    health_servicer = health.HealthServicer()
    for svc in services:
        svc.add(svc.servicer, server)
    (health_status or Health()).serve_on(health_servicer, [svc.name for svc in services])
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


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = (credentials, wait_for_ready,
                                                                   compression)


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (a token) to every call of a channel."""

    def __init__(self, pairs):
        self.pairs = tuple(pairs)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [*(details.metadata or ()), *self.pairs]
        return continuation(_CallDetails(details.method, details.timeout, metadata,
                                         details.credentials, details.wait_for_ready,
                                         details.compression), request)


class ClientInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Every outgoing call: the request id of the call being served (when
    there is one) in its x-request-id metadata, and its outcome in
    grpc_client_handled_total / grpc_client_handling_seconds. On a channel
    to another process (remote), a call's wait is outside the caller's turn
    (common/turns.py)."""

    def __init__(self, remote: bool = False):
        self.remote = remote

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details = client_call_details
        rid = obs.request_id()
        if rid:
            metadata = [(k, v) for k, v in (details.metadata or ())
                        if k != obs.REQUEST_ID_HEADER]
            metadata.append((obs.REQUEST_ID_HEADER, rid))
            details = _CallDetails(details.method, details.timeout, metadata,
                                   details.credentials, details.wait_for_ready,
                                   details.compression)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        start = time.perf_counter()

        def observe(done) -> None:  # at once for a blocking call; a future's when it ends
            try:
                code = done.code().name
            except Exception:  # noqa: BLE001 - a call object without a code: count it as UNKNOWN
                code = "UNKNOWN"
            obs.observe_client_call(method, code, time.perf_counter() - start)

        if self.remote:
            with outside():  # a blocking call waits for its answer in there
                outcome = continuation(details, request)
        else:  # answered in this thread (common/inprocess.py), in this call's turn
            outcome = continuation(details, request)
        outcome.add_done_callback(observe)
        return outcome


def channel(address: str, retries: bool = True, *, tls: TlsFiles | None = None,
            metadata=(), options: list[tuple[str, int | str]] | None = None) -> grpc.Channel:
    """A channel to address: TLS when tls is enabled, and metadata (e.g. the
    authorization header) on every call; options: more gRPC channel
    arguments (e.g. reconnect back-off)."""
    options = [("grpc.enable_retries", 1 if retries else 0), *(options or [])]
    if retries:
        options.append(("grpc.service_config", RETRY_SERVICE_CONFIG))
    if tls is not None and (tls.enabled or tls.ca):
        ch = grpc.secure_channel(address, tls.channel_credentials(), options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    return intercepted(ch, metadata, remote=True)


def intercepted(ch: grpc.Channel, metadata=(), remote: bool = False) -> grpc.Channel:
    """ch with vmattach's client interceptors: metadata (e.g. the
    authorization header) on every call, request ids and call metrics;
    remote: ch leads to another process (ClientInterceptor)."""
    if metadata:
        ch = grpc.intercept_channel(ch, MetadataInterceptor(metadata))
    return grpc.intercept_channel(ch, ClientInterceptor(remote))


def error_from_rpc(err: grpc.RpcError) -> VmattachError:
    """The VmattachError for a status received from a vmattach service."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    reason, metadata = code.name, {}
    violations: list[tuple[str, str]] = []
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [(v.field, v.description) for v in bad.field_violations]
    error = error_class(code)(message or code.name, reason=reason, metadata=metadata)
    if violations and isinstance(error, InvalidArgument):
        error.violations, error.field = violations, violations[0][0]
    return error


def call(method, request, *, timeout: float | None = None, metadata=None):
    """Call a unary stub method; a failure raises the matching VmattachError."""
    try:
        return method(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        raise error_from_rpc(err) from None


def begin(method, request, *, timeout: float | None = None, metadata=None) -> Callable[[], Any]:
    """Start a unary call now; the function returned waits for its answer (a
    failure raises the matching VmattachError), so that other work runs
    while the call is in flight. A method with a begin() of its own (a
    guarded node stub's) starts itself."""
    own = getattr(method, "begin", None)
    if own is not None:
        return own(request, timeout=timeout, metadata=metadata)
    future = method.future(request, timeout=timeout, metadata=metadata)

    def answer():
        try:
            return result(future)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
    return answer


