"""What operators follow vmattach with: request ids, log lines (text or
JSON), Prometheus metrics and (optional) OpenTelemetry spans.

A request id comes with a call's `x-request-id` metadata or is made up by
the first service that sees the call; it is kept in a context variable for
the call's thread, printed in every log line, sent on with every call the
service makes (grpcutil.channel's interceptor) and returned in every error's
ErrorInfo metadata (grpcutil._status)."""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram

from vmattach.common.errors import InvalidArgument
from vmattach.common.rules import prefix, quote

REQUEST_ID_HEADER = "x-request-id"
# what a caller's request id may be (it lands in log lines): bounded, no spaces
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("vmattach_request_id",
                                                                  default="")
LOG_FORMATS = ("text", "json")
# calls that are not worth an INFO line each (load balancers poll them)
QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                  "grpc.reflection.v1.ServerReflection")


def request_id() -> str:
    """The request id of the call this thread is serving ("" outside one)."""
    return _request_id.get()


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


def accepted_request_id(value: str | None) -> str:
    """The caller's id when it is a sane one, else a new one."""
    if value and REQUEST_ID_RE.fullmatch(value):
        return value
    return new_request_id()


@contextlib.contextmanager
def request_context(rid: str) -> Iterator[str]:
    token = _request_id.set(rid)
    try:
        yield rid
    finally:
        _request_id.reset(token)


# -- logs --------------------------------------------------------------------------------

class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id() or "-"
        return True


# extra= fields a log call may add that the JSON line carries as they are
JSON_EXTRA = ("grpc_service", "grpc_method", "grpc_code", "duration_ms", "step", "operation")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, and
    the gRPC fields of a call's line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key in JSON_EXTRA:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def setup_logging(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """The root logger of a vmattach process: one handler on stderr."""
    if fmt not in LOG_FORMATS:
        raise InvalidArgument(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {quote(fmt, 20)}",
                              reason="INVALID_SETTING")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# -- metrics (prometheus_client's default registry; served by --metrics-listen) ----------

# the names and labels of go-grpc-prometheus / py-grpc-prometheus, so that the usual
# gRPC dashboards work
GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method", "grpc_code"]
SERVER_HANDLED = Counter("grpc_server_handled_total", "RPCs completed by this server",
                         GRPC_LABELS)
SERVER_SECONDS = Histogram("grpc_server_handling_seconds",
                           "time this server took to answer an RPC", GRPC_LABELS)
CLIENT_HANDLED = Counter("grpc_client_handled_total",
                         "RPCs this process made that completed", GRPC_LABELS)
CLIENT_SECONDS = Histogram("grpc_client_handling_seconds",
                           "time the RPCs this process made took", GRPC_LABELS)
STEP_SECONDS = Histogram("vmattach_attach_step_seconds",
                         "time each saga step of an attach or detach took (the step names"
                         " differ between the two)", ["step"])
OPERATIONS = Counter("vmattach_operations_total",
                     "attaches and detaches by result (OK or the gRPC code)",
                     ["operation", "result"])
RECOVERED = Counter("vmattach_reconciler_recovered_total",
                    "orphaned operations the reconciler finished or undid",
                    ["operation", "outcome"])
ROUND_SECONDS = Histogram("vmattach_background_round_seconds",
                          "time each round of a background loop took, its pauses included (a"
                          " paced round takes about ten times its CPU time)", ["round"],
                          buckets=(0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))


def split_method(full: str) -> tuple[str, str]:
    """"/pkg.Service/Method" -> ("pkg.Service", "Method")."""
    _, service, method = (full.split("/") + ["", ""])[:3]
    return service or "unknown", method or "unknown"


# (side, method, code) -> the two metrics of such calls: looked up once each. The
# methods are the served ones and the ones this process calls, the codes gRPC's.
_CALL_METRICS: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _call_metrics(side: str, full_method: str, code: str) -> tuple[Any, Any]:
    key = (side, full_method, code)
    found = _CALL_METRICS.get(key)
    if found is None:
        handled, seconds = ((SERVER_HANDLED, SERVER_SECONDS) if side == "server"
                            else (CLIENT_HANDLED, CLIENT_SECONDS))
        labels = ("unary", *split_method(full_method), code)
        found = _CALL_METRICS[key] = (handled.labels(*labels), seconds.labels(*labels))
    return found


def observe_server_call(full_method: str, code: str, seconds: float) -> None:
    handled, took = _call_metrics("server", full_method, code)
    handled.inc()
    took.observe(seconds)


def observe_client_call(full_method: str, code: str, seconds: float) -> None:
    handled, took = _call_metrics("client", full_method, code)
    handled.inc()
    took.observe(seconds)


@contextlib.contextmanager
def timed_step(step: str) -> Iterator[None]:
    """One saga step: its time in vmattach_attach_step_seconds and, with
    tracing on, a span of its own."""
    start = time.perf_counter()
    with span(f"vmattach.step.{step}", step=step):
        try:
            yield
        finally:
            STEP_SECONDS.labels(step).observe(time.perf_counter() - start)


def count_operation(operation: str):
    """Decorate attach/detach: vmattach_operations_total{operation,result}."""
    import functools

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            result = "OK"
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                from vmattach.common.errors import status_code
                try:
                    result = status_code(exc).name
                except Exception:  # noqa: BLE001 - not a VmattachError
                    result = "INTERNAL"
                raise
            finally:
                OPERATIONS.labels(operation, result).inc()
        return wrapper
    return decorate


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"metrics_listen must be HOST:PORT, not {quote(listen)}",
                              reason="INVALID_SETTING")
    return host, int(port)


def start_metrics_server(listen: str) -> tuple[str, int, object]:
    """Serve /metrics (Prometheus text format) on HOST:PORT in a thread;
    returns (host, port, server) — port 0 picks a free one."""
    from prometheus_client import start_http_server
    host, port = parse_listen(listen)
    try:
        server, _thread = start_http_server(port, addr=host.strip("[]"))
    except OSError as exc:
        raise InvalidArgument(f"cannot serve metrics on {prefix(listen)}: {exc.strerror}",
                              reason="INVALID_SETTING") from None
    return host, server.server_port, server


# -- traces (OpenTelemetry; off unless the tracing setting names an exporter) --------------

_tracer = None


def setup_tracing(exporter: str, service_name: str = "vmattach") -> None:
    """Spans for every gRPC call (opentelemetry-instrumentation-grpc) and one
    per saga step. exporter: "" (off), "console" or "otlp"."""
    global _tracer
    if not exporter:
        return
    if exporter not in ("console", "otlp"):
        raise InvalidArgument(f"tracing must be empty, console or otlp, not {quote(exporter, 20)}",
                              reason="INVALID_SETTING")
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import (
            GrpcInstrumentorClient,
            GrpcInstrumentorServer,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise InvalidArgument("tracing needs the [tracing] extra (in vmattach's checkout:"
                              f" pip install '.[tracing]'; {exc.name} is missing)",
                              reason="INVALID_SETTING") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise InvalidArgument("tracing=otlp needs opentelemetry-exporter-otlp-proto-grpc",
                                  reason="INVALID_SETTING") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    GrpcInstrumentorServer().instrument()
    GrpcInstrumentorClient().instrument()
    use_tracer(trace.get_tracer("vmattach"))


def use_tracer(tracer) -> None:
    """Spans for the saga steps go to tracer (None: no spans)."""
    global _tracer
    _tracer = tracer


# what span() gives with tracing off: one context that does nothing, shared
_NO_SPAN = contextlib.nullcontext()


def span(name: str, **attributes) -> contextlib.AbstractContextManager:
    """A span named name with attributes (and the request id) while the block
    runs; nothing with tracing off."""
    if _tracer is None:
        return _NO_SPAN
    return _span(_tracer, name, attributes)


@contextlib.contextmanager
def _span(tracer, name: str, attributes: dict) -> Iterator[None]:
    with tracer.start_as_current_span(name) as current:
        for key, value in attributes.items():
            current.set_attribute(f"vmattach.{key}", value)
        if request_id():
            current.set_attribute("vmattach.request_id", request_id())
        yield
