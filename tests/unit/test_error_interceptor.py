"""The error interceptor wraps each served method once: later calls of the
method reuse its handler, and a method the server does not have is never
kept (a caller naming endless methods cannot grow the server's memory)."""

from __future__ import annotations

import grpc

from vmattach.common.grpcutil import ErrorInterceptor


class Details:
    def __init__(self, method: str):
        self.method = method
        self.invocation_metadata = ()


def test_a_served_method_is_wrapped_once():
    looked_up = []
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")

    def continuation(details):
        looked_up.append(details.method)
        return handler

    interceptor = ErrorInterceptor()
    first = interceptor.intercept_service(continuation, Details("/vmattach.v1.Servers/AttachVolume"))
    again = interceptor.intercept_service(continuation, Details("/vmattach.v1.Servers/AttachVolume"))
    other = interceptor.intercept_service(continuation, Details("/vmattach.v1.Servers/DetachVolume"))
    assert first is again and first is not handler and other is not first
    assert looked_up == ["/vmattach.v1.Servers/AttachVolume", "/vmattach.v1.Servers/DetachVolume"]


def test_unknown_methods_are_not_kept():
    interceptor = ErrorInterceptor()
    for k in range(1000):
        assert interceptor.intercept_service(lambda details: None, Details(f"/x.Y/M{k}")) is None
    # the next lookup of a served method still goes to the server's handlers
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    assert interceptor.intercept_service(lambda details: handler, Details("/x.Y/M1")) is not None
    assert len(interceptor._handlers) == 1
