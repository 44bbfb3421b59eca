"""OpenTelemetry (optional, off by default): with a tracer set, an attach
gives one span per saga step, each with the call's request id, and the
all-in-one's in-process calls one each, inside the step that made it;
without one, none."""

from __future__ import annotations

import pytest

from tests.integration.test_facade import Stack
from vmattach.common import observability as obs

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
export = pytest.importorskip("opentelemetry.sdk.trace.export")

ATTACH_STEPS = ["bdm_insert", "get_connector", "create_attachment", "node_publish",
                "mark_attached", "bdm_attached"]


@pytest.fixture
def spans():
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    obs.use_tracer(provider.get_tracer("test"))
    yield exporter
    obs.use_tracer(None)


def test_an_attach_has_one_span_per_saga_step(tmp_path, tgtd, serve, spans):
    stack = Stack(tmp_path, tgtd, serve)
    server, volume = stack.server(), stack.volume()
    stack.client.attach_volume(server, volume)
    every = spans.get_finished_spans()
    finished = [s for s in every if s.name.startswith("vmattach.step.")]
    names = [s.name for s in finished]
    assert names == [f"vmattach.step.{step}" for step in ATTACH_STEPS]
    calls = {s.name: s for s in every if s.name.startswith("/vmattach.v1.")}
    assert set(calls) >= {"/vmattach.v1.Node/NodeGetInfo", "/vmattach.v1.Controller/CreateAttachment",
                          "/vmattach.v1.Node/NodePublishVolume", "/vmattach.v1.Controller/MarkAttached"}
    assert all(s.attributes["vmattach.call"] == "in-process" for s in calls.values())
    step_of = {s.context.span_id: s.attributes["vmattach.step"] for s in finished}
    assert step_of[calls["/vmattach.v1.Controller/CreateAttachment"].parent.span_id] == \
        "create_attachment"
    assert step_of[calls["/vmattach.v1.Node/NodePublishVolume"].parent.span_id] == "node_publish"
    rids = {s.attributes["vmattach.request_id"] for s in finished}
    assert len(rids) == 1 and rids.pop().startswith("req-")
    assert [s.attributes["vmattach.step"] for s in finished] == ATTACH_STEPS

    spans.clear()
    obs.use_tracer(None)  # the default: no spans at all
    stack.client.detach_volume(server, volume)
    assert spans.get_finished_spans() == ()
