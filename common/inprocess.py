"""Calls between the services of one process without a network hop.

In `vmattach serve` with the facade and the Controller or a Node in one
process, a facade call to them through a gRPC port (`internal_calls =
"grpc"`: a loopback server of the process's own) is serialised, framed,
sent over TCP, taken by a thread of that server's pool and answered the
same way back. An `InProcessChannel` answers the same unary calls in the
caller's thread: the request is serialised and parsed as on the wire, then
the same server interceptors (common/grpcutil.ErrorInterceptor: limits,
authentication, field bounds, error mapping, metrics, logs and audit) and
the same handlers run, each call in a fresh contextvars context, as a gRPC
server runs them. A failure comes back as a `grpc.RpcError` with the code,
details and trailing metadata a gRPC call would have received, so the
caller cannot tell the two apart: its client interceptors, error mapping
and retries stay the same (common/grpcutil.call, begin).

With tracing on, each call is a span named by its method (opentelemetry's
gRPC instrumentation sees no call to make one).

What differs from a call over the network, by design:
- a deadline is checked when the handler returns, not while it runs: a
  handler that outlives it makes the caller wait, then DEADLINE_EXCEEDED
  (so a rollback after it never runs beside the call it undoes; the
  handlers bound their own waits: tgtd's requests, the guest's detach,
  libvirt's keepalive);
- there is no transport, so no UNAVAILABLE from one, and `future()`
  answers before it returns (the work is done in the caller's thread).
Only unary-unary methods are answered this way: vmattach's services have no
others between them (the health service's Watch is called from outside).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import grpc

from vmattach.common import observability as obs


class _Metadatum(NamedTuple):
    key: str
    value: str | bytes


class _HandlerCallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: tuple):
        self.method = method
        self.invocation_metadata = invocation_metadata


class _Aborted(Exception):
    """ServicerContext.abort: ends the handler with the status set on the context."""


class _Status:
    """A call's status as grpc.Call and grpc.ServicerContext both read it."""

    _code: grpc.StatusCode | None
    _details: str | None
    _trailing: tuple

    def trailing_metadata(self):
        return self._trailing

    def code(self):
        return self._code

    def details(self):
        return self._details


class _Context(_Status, grpc.ServicerContext):
    """The ServicerContext of one in-process call."""

    def __init__(self, metadata: tuple, deadline: float | None):
        self._metadata = metadata
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple = ()
        self._callbacks: list[Callable[[], None]] = []
        self._cancelled = False

    # -- what a handler reads ---------------------------------------------------------
    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return "in-process"

    def peer_identities(self):
        return None

    def peer_identity_key(self):
        return None

    def auth_context(self) -> dict:
        return {}  # as a plain-text connection: no certificate

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def is_active(self) -> bool:
        return not self._cancelled and (self._deadline is None or time.monotonic() < self._deadline)

    # -- what a handler sets ----------------------------------------------------------
    def abort(self, code, details):
        self._code, self._details = code, details
        raise _Aborted()

    def abort_with_status(self, status):
        self._trailing = tuple(status.trailing_metadata or ())
        self.abort(status.code, status.details)

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def set_trailing_metadata(self, trailing_metadata):
        self._trailing = tuple(trailing_metadata)

    def send_initial_metadata(self, initial_metadata):
        pass

    def set_compression(self, compression):
        pass

    def disable_next_message_compression(self):
        pass

    def add_callback(self, callback) -> bool:
        self._callbacks.append(callback)
        return True

    def cancel(self):
        self._cancelled = True

    def done(self) -> None:
        self._cancelled = True
        for callback in self._callbacks:
            callback()


class _Outcome(_Status, grpc.Call, grpc.Future):
    """The finished call: an answer or, as an RpcError, its status (a
    grpc.Call and grpc.Future both, as grpcio's own finished calls are)."""

    def __init__(self, response: Any = None, code: grpc.StatusCode = grpc.StatusCode.OK,
                 details: str = "", trailing: tuple = ()):
        self._response, self._code, self._details, self._trailing = (response, code, details,
                                                                     trailing)

    # grpc.Call
    def initial_metadata(self):
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self):
        return None

    def add_callback(self, callback) -> bool:
        return False

    # grpc.Future
    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout=None):
        return self._response

    def exception(self, timeout=None):
        return None

    def traceback(self, timeout=None):
        return None

    def add_done_callback(self, fn) -> None:
        fn(self)


class _Failed(grpc.RpcError, _Outcome):
    """A call that ended with a status other than OK: raised by result()."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        _Outcome.__init__(self, None, code, details, trailing)
        Exception.__init__(self, code, details)

    def result(self, timeout=None):
        raise self

    def exception(self, timeout=None):
        return self

    def __str__(self) -> str:
        return f"<in-process call: {self._code} {self._details!r}>"


class Dispatcher:
    """The unary handlers of some services and the server interceptors that
    a gRPC server of them would run, outermost first (new_server's order)."""

    def __init__(self, services: Iterable, interceptors: Sequence[grpc.ServerInterceptor]):
        registry = _Registry()
        for svc in services:
            svc.add(svc.servicer, registry)
        self._methods = registry.methods
        self._interceptors = list(interceptors)

    def handler(self, method: str, metadata: tuple) -> grpc.RpcMethodHandler | None:
        details = _HandlerCallDetails(method, metadata)

        def at(index: int, call_details):
            if index == len(self._interceptors):
                return self._methods.get(call_details.method)
            return self._interceptors[index].intercept_service(
                lambda d: at(index + 1, d), call_details)

        return at(0, details)

    def call(self, method: str, request: bytes, timeout: float | None, metadata) -> _Outcome:
        """Answer one call as a server would: its answer's bytes, or its status."""
        if timeout is not None and timeout <= 0:
            return _Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        deadline = None if timeout is None else time.monotonic() + timeout
        md = tuple(_Metadatum(k, v) for k, v in (metadata or ()))
        context = _Context(md, deadline)
        try:
            return contextvars.Context().run(self._run, method, request, context)
        finally:
            context.done()

    def _run(self, method: str, request: bytes, context: _Context) -> _Outcome:
        handler = self.handler(method, context.invocation_metadata())
        if handler is None or handler.unary_unary is None:
            return _Failed(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        failure, aborted, response = None, False, None
        try:
            message = (handler.request_deserializer(request)
                       if handler.request_deserializer is not None else request)
            response = handler.unary_unary(message, context)
        except _Aborted:
            aborted = True
        except Exception as exc:  # noqa: BLE001 - as grpcio: UNKNOWN, the exception's text
            failure = f"Exception calling application: {exc}"
        if context._deadline is not None and time.monotonic() >= context._deadline:
            # over the network the caller's deadline would have ended the call first,
            # whatever the handler answered after it
            return _Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if failure is not None and context._code is None:
            return _Failed(grpc.StatusCode.UNKNOWN, failure)
        if failure is None and not aborted and context._code in (None, grpc.StatusCode.OK):
            answer = (handler.response_serializer(response)
                      if handler.response_serializer is not None else response)
            return _Outcome(answer, trailing=context._trailing)
        code = context._code or grpc.StatusCode.UNKNOWN
        if code is grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN  # aborted with OK: grpcio answers UNKNOWN too
        return _Failed(code, context._details or "", context._trailing)


class _Registry:
    """What a generated add_*Servicer_to_server gives a server."""

    def __init__(self):
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers as add_registered_method_handlers'


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):
    def __init__(self, dispatcher: Dispatcher, method: str, serialize, deserialize):
        self._dispatcher, self._method = dispatcher, method
        self._serialize, self._deserialize = serialize, deserialize

    def _outcome(self, request, timeout, metadata) -> _Outcome:
        raw = self._serialize(request) if self._serialize is not None else request
        # opentelemetry's gRPC instrumentation sees no call here: a span of its own
        with obs.span(self._method, call="in-process"):
            outcome = self._dispatcher.call(self._method, raw, timeout, metadata)
        if not isinstance(outcome, _Failed) and self._deserialize is not None:
            outcome._response = self._deserialize(outcome._response)
        return outcome

    def __call__(self, request, timeout=None, metadata=None, credentials=None,
                 wait_for_ready=None, compression=None):
        return self._outcome(request, timeout, metadata).result()

    def with_call(self, request, timeout=None, metadata=None, credentials=None,
                  wait_for_ready=None, compression=None):
        outcome = self._outcome(request, timeout, metadata)
        return outcome.result(), outcome

    def future(self, request, timeout=None, metadata=None, credentials=None,
               wait_for_ready=None, compression=None):
        return self._outcome(request, timeout, metadata)


class InProcessChannel(grpc.Channel):
    """A channel whose unary calls a Dispatcher answers in the caller's
    thread; addresses: the HOST:PORTs of this process's servers of the same
    services, which it stands for."""

    def __init__(self, dispatcher: Dispatcher, addresses: Iterable[str] = ()):
        self._dispatcher = dispatcher
        self.addresses = frozenset(addresses)

    def unary_unary(self, method, request_serializer=None, response_deserializer=None,
                    _registered_method=False):
        return _UnaryUnary(self._dispatcher, method, request_serializer, response_deserializer)

    def _streams(self, *args, **kwargs):
        raise NotImplementedError("an in-process channel answers unary calls only")

    unary_stream = stream_unary = stream_stream = _streams

    def subscribe(self, callback, try_to_connect=False):
        callback(grpc.ChannelConnectivity.READY)

    def unsubscribe(self, callback):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        return False
