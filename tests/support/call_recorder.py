"""CallRecorder: a gRPC server interceptor for tests (pass it to
vmattach.clients.serve.start(..., interceptors=[recorder])) that records every
vmattach call a server receives and can make chosen calls go wrong:

- fail(name): answer INTERNAL without running the handler (nothing happened);
- answer_late(name): run the handler (its effect is done), then hold the
  answer until the caller's deadline has passed: the caller sees
  DEADLINE_EXCEEDED for a call that took effect ("timed out but happened").

Names are "Service.Method" ("Controller.ReserveVolume", "Node.NodeStageVolume").
A fake at the outermost boundary, under tests/ only."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc

PACKAGE = "/vmattach.v1."
# how long past the caller's deadline a late answer is held
LATE_MARGIN = 0.5


@dataclass(frozen=True)
class Recorded:
    name: str
    outcome: str  # "ok", "failed" (injected), "late" (answered after the deadline), or a code


class CallRecorder(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[Recorded] = []
        self._actions: dict[str, list[str]] = {}

    # -- set-up ---------------------------------------------------------------------------

    def fail(self, name: str, times: int = 1) -> None:
        """The next `times` calls of name answer INTERNAL; the handler never runs."""
        self._arm(name, "fail", times)

    def answer_late(self, name: str, times: int = 1) -> None:
        """The next `times` calls of name run, then answer after the caller's deadline."""
        self._arm(name, "late", times)

    def _arm(self, name: str, action: str, times: int) -> None:
        with self._lock:
            self._actions.setdefault(name, []).extend([action] * times)

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()
            self._actions.clear()

    # -- reading --------------------------------------------------------------------------

    def calls(self, *services: str) -> list[Recorded]:
        """The recorded calls, in arrival order (of the given services only)."""
        with self._lock:
            return [c for c in self._calls
                    if not services or c.name.split(".", 1)[0] in services]

    def names(self, *services: str) -> list[str]:
        return [c.name for c in self.calls(*services)]

    # -- the interceptor ------------------------------------------------------------------

    def _take(self, name: str) -> str | None:
        with self._lock:
            pending = self._actions.get(name)
            return pending.pop(0) if pending else None

    def _record(self, name: str, outcome: str) -> None:
        with self._lock:
            self._calls.append(Recorded(name, outcome))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(PACKAGE):
            return handler
        name = method[len(PACKAGE):].replace("/", ".")
        inner = handler.unary_unary

        def unary(request, context):
            action = self._take(name)
            if action == "fail":
                self._record(name, "failed")
                context.abort(grpc.StatusCode.INTERNAL, f"injected failure of {name}")
            try:
                response = inner(request, context)
            except Exception:
                code = context.code() if hasattr(context, "code") else None
                self._record(name, getattr(code, "name", None) or "error")
                raise
            if action == "late":
                self._record(name, "late")
                time.sleep(max(context.time_remaining() or 0.0, 0.0) + LATE_MARGIN)
            else:
                self._record(name, "ok")
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
