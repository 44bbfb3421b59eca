"""The health service tells the truth: real servers on port 0 (in this
process, and `vmattach serve` as a child process) whose backends go away
and come back: a private tgtd killed and started again, a SQLite database
file replaced, a PostgreSQL role that may no longer log in, the hypervisor
unreachable (the fake one, at the outermost boundary). And a shutdown is
NOT_SERVING for a watcher before the port closes."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import threading
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import FreshPostgres, make_settings, need_postgres
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.tgtd import TgtDaemon
from tests.support.vmattach_process import ServeProcess
from vmattach.v1 import node_pb2, node_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CONTROLLER, NODE, SERVERS = "vmattach.v1.Controller", "vmattach.v1.Node", "vmattach.v1.Servers"
INTERVAL = 0.2
# "within a few probe intervals", with room for a loaded machine
WITHIN = 10 * INTERVAL + 3


def status(health, service: str = "") -> int:
    return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(health, expected: dict[str, int], within: float = WITHIN) -> float:
    """Poll until every service has its expected status; the seconds it took."""
    started = time.monotonic()
    while True:
        seen = {name: status(health, name) for name in expected}
        if seen == expected:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"after {within}s: {seen}, wanted {expected}"
        time.sleep(0.05)


def restart(tgtd: TgtDaemon) -> TgtDaemon:
    """The same tgtd (portal and control port) started again."""
    return TgtDaemon(portal_port=tgtd.portal_port, control_port=tgtd.control_port,
                     log_path=tgtd.log_path).start()


@pytest.fixture
def health_of():
    channels = []

    def _open(port: int):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(ch)
        return health_pb2_grpc.HealthStub(ch)

    yield _open
    for ch in channels:
        ch.close()


@pytest.fixture
def stack(tmp_path, tgtd, serve, health_of):
    """All three services in one process (fake hypervisor), probed every INTERVAL."""
    hv = FakeHypervisor()
    settings = make_settings(tmp_path, tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             health_interval=INTERVAL, reconcile_interval=INTERVAL)
    running = serve(settings, hypervisor=hv)
    health = health_of(running.port)
    wait_for(health, {"": SERVING, CONTROLLER: SERVING, NODE: SERVING, SERVERS: SERVING})
    return running, hv, health, settings


def test_tgtd_gone_is_controller_not_serving_and_back_is_serving(stack, tgtd, caplog):
    running, _, health, _ = stack
    caplog.set_level(logging.INFO)
    tgtd.kill()
    took = wait_for(health, {"": NOT_SERVING, CONTROLLER: NOT_SERVING, NODE: SERVING,
                             SERVERS: SERVING})
    assert took < WITHIN
    time.sleep(5 * INTERVAL)  # several rounds of the export reconciler while tgtd is gone
    again = restart(tgtd)
    try:
        wait_for(health, {"": SERVING, CONTROLLER: SERVING, NODE: SERVING, SERVERS: SERVING})
        # the health probe can see tgtd back before the reconciler's next round runs
        deadline = time.monotonic() + WITHIN
        while time.monotonic() < deadline and not any(
                "ensure-exports round works again" in r.getMessage() for r in caplog.records):
            time.sleep(INTERVAL / 4)
    finally:
        running.stop(grace=1)
        again.stop()
    # the reconciler said it once, in one line, and said when it worked again
    failed = [r for r in caplog.records if "ensure-exports round failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert failed[0].levelno == logging.WARNING and failed[0].exc_info is None
    assert "tgt" in failed[0].getMessage()
    assert any("ensure-exports round works again" in r.getMessage() for r in caplog.records)
    went = [r for r in caplog.records if r.getMessage().startswith(f"health: {CONTROLLER} is NOT")]
    assert len(went) == 1 and "tgtd unreachable" in went[0].getMessage()


def test_database_file_gone_is_that_service_not_serving(stack):
    """The facade's SQLite file replaced by a directory (a disk that went
    away): the facade is NOT_SERVING, the Controller and the Node are not."""
    _, _, health, settings = stack
    path = settings.database_url_for("servers").removeprefix("sqlite:///")
    os.rename(path, path + ".away")
    os.mkdir(path)
    try:
        wait_for(health, {"": NOT_SERVING, SERVERS: NOT_SERVING, CONTROLLER: SERVING,
                          NODE: SERVING})
    finally:
        os.rmdir(path)
        os.rename(path + ".away", path)
    wait_for(health, {"": SERVING, SERVERS: SERVING, CONTROLLER: SERVING, NODE: SERVING})


def test_token_database_gone_is_controller_not_serving(tmp_path, tgtd, serve, health_of):
    """With user tokens (the default), the Controller's public calls need
    their database: its file gone is NOT_SERVING too."""
    settings = make_settings(tmp_path, services="controller", auth="token",
                             tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                             health_interval=INTERVAL)
    running = serve(settings)
    health = health_of(running.port)
    wait_for(health, {"": SERVING, CONTROLLER: SERVING})
    path = settings.database_url_for("auth").removeprefix("sqlite:///")
    os.rename(path, path + ".away")
    os.mkdir(path)
    try:
        wait_for(health, {"": NOT_SERVING, CONTROLLER: NOT_SERVING})
    finally:
        os.rmdir(path)
        os.rename(path + ".away", path)
    wait_for(health, {"": SERVING, CONTROLLER: SERVING})


def test_hypervisor_unreachable_is_node_not_serving(stack):
    _, hv, health, _ = stack
    hv.reachable = False
    wait_for(health, {"": NOT_SERVING, NODE: NOT_SERVING, CONTROLLER: SERVING, SERVERS: SERVING})
    hv.reachable = True
    wait_for(health, {"": SERVING, NODE: SERVING, CONTROLLER: SERVING, SERVERS: SERVING})


@pytest.mark.postgres
def test_postgresql_refusing_the_controller_is_not_serving(tmp_path, tgtd, serve, health_of):
    """The Controller on PostgreSQL as a role of its own; the role may no
    longer log in (and its sessions end): NOT_SERVING; allowed again: SERVING."""
    need_postgres()
    fresh = FreshPostgres(schema=True)
    role = f"vmattach_health_{uuid.uuid4().hex[:8]}"
    admin = fresh.connect()
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE ROLE "{role}" LOGIN')
            cur.execute(f'GRANT ALL ON SCHEMA "{fresh.name}" TO "{role}"')
        url = fresh.url.replace("://postgres@", f"://{role}@", 1)
        settings = make_settings(tmp_path, services="controller", tgt_portal=tgtd.portal,
                                 tgt_control_port=tgtd.control_port, database_url=url,
                                 health_interval=INTERVAL)
        running = serve(settings)
        health = health_of(running.port)
        wait_for(health, {"": SERVING, CONTROLLER: SERVING})
        with admin.cursor() as cur:
            cur.execute(f'ALTER ROLE "{role}" NOLOGIN')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE usename = %s", (role,))
        wait_for(health, {"": NOT_SERVING, CONTROLLER: NOT_SERVING})
        with admin.cursor() as cur:
            cur.execute(f'ALTER ROLE "{role}" LOGIN')
        wait_for(health, {"": SERVING, CONTROLLER: SERVING})
        running.stop(grace=1)
    finally:
        fresh.drop()
        with admin.cursor() as cur:
            cur.execute(f'DROP OWNED BY "{role}"')
            cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()


def watch(health, service: str = "") -> tuple[queue.Queue, threading.Thread]:
    """A Health.Watch stream read on a thread: (time, status) pairs in a queue,
    then (time, None) when the stream ends."""
    seen: queue.Queue = queue.Queue()
    stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)

    def read():
        try:
            for answer in stream:
                seen.put((time.monotonic(), answer.status))
        except grpc.RpcError:
            pass
        seen.put((time.monotonic(), None))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return seen, thread


def test_shutdown_is_not_serving_for_a_watcher_before_the_port_closes(stack):
    running, _, health, _ = stack
    seen, reader = watch(health)
    assert seen.get(timeout=10)[1] == SERVING
    stopping = threading.Thread(target=running.stop, kwargs={"grace": 2})
    stopping.start()
    at, first = seen.get(timeout=10)
    assert first == NOT_SERVING
    stopping.join(30)
    closed = time.monotonic()
    assert at < closed
    reader.join(10)
    with pytest.raises(grpc.RpcError) as err:
        status(health)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_vmattach_serve_is_not_serving_without_its_tgtd(tmp_path, health_of):
    """The real CLI, all three services (libvirt's own test driver for the
    Node): tgtd killed -> the Controller and the whole process NOT_SERVING
    with one warning line in the log; SIGTERM -> NOT_SERVING for a watcher."""
    if shutil.which("tgtd") is None:
        pytest.skip("tgtd is not installed")
    tgtd = TgtDaemon(log_path=tmp_path / "tgtd.log").start()
    try:
        proc = ServeProcess(["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                             "--tgt-portal", tgtd.portal, "--tgt-control-port",
                             str(tgtd.control_port), "--libvirt-uri", "test:///default",
                             "--health-interval", str(INTERVAL), "--reconcile-interval",
                             str(INTERVAL)], tmp_path / "serve.log")
    except BaseException:
        tgtd.stop()
        raise
    try:
        port = int(proc.address.rsplit(":", 1)[1])
        health = health_of(port)
        wait_for(health, {"": SERVING, CONTROLLER: SERVING, NODE: SERVING, SERVERS: SERVING})
        tgtd.kill()
        wait_for(health, {"": NOT_SERVING, CONTROLLER: NOT_SERVING, NODE: SERVING,
                          SERVERS: SERVING})
        time.sleep(5 * INTERVAL)
        log = proc.log()
        assert log.count("ensure-exports round failed") == 1, log
        assert "Traceback" not in log, log
        seen, _ = watch(health, NODE)
        assert seen.get(timeout=10)[1] == SERVING
        assert proc.terminate(timeout=60) == 0
        statuses = []
        while (item := seen.get(timeout=10))[1] is not None:
            statuses.append(item[1])
        assert statuses == [NOT_SERVING]
    finally:
        proc.stop()
        tgtd.stop()


DELAY = 2.0  # the shutdown delay of the two tests below


def serving_until_closed(health, node, started: float) -> tuple[list[int], float]:
    """After a stop began at `started`: poll Check (and call the Node after
    each answer) until the server stops answering; (the statuses seen, when
    it stopped). A call that raced the closing may end CANCELLED."""
    statuses = []
    while True:
        try:
            statuses.append(status(health))
            node.NodeGetInfo(node_pb2.NodeGetInfoRequest(), timeout=5)
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
            return statuses, time.monotonic() - started
        assert time.monotonic() - started < DELAY + 30, "the port never closed"
        time.sleep(0.05)


def test_shutdown_delay_keeps_serving_not_serving_then_closes(tmp_path, serve, health_of):
    running = serve(make_settings(tmp_path, services="node", shutdown_delay=DELAY),
                    hypervisor=FakeHypervisor())
    health = health_of(running.port)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    assert status(health) == SERVING
    started = time.monotonic()
    stopping = threading.Thread(target=running.stop, kwargs={"grace": 1})
    stopping.start()
    statuses, closed = serving_until_closed(health, node_pb2_grpc.NodeStub(channel), started)
    stopping.join(30)
    channel.close()
    with pytest.raises(grpc.RpcError) as err:
        status(health)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the port is closed
    # NOT_SERVING from the start of the stop, every call answered, for DELAY seconds
    assert statuses and set(statuses) <= {SERVING, NOT_SERVING} and statuses[-1] == NOT_SERVING
    assert statuses.count(SERVING) <= 1  # at most the answer that raced the stop's first step
    assert closed >= DELAY
    assert not stopping.is_alive()


def test_vmattach_serve_keeps_answering_for_its_shutdown_delay_after_sigterm(tmp_path, health_of):
    """The real CLI (the Node on libvirt's test driver), the delay from the
    environment: after SIGTERM, health NOT_SERVING and calls answered, then
    the port closes and the process exits 0."""
    proc = ServeProcess(["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                         "--services", "node", "--libvirt-uri", "test:///default",
                         "--initiator-iqn", "iqn.2000-01.x:n"], tmp_path / "serve.log",
                        env={"VMATTACH_SHUTDOWN_DELAY": str(DELAY)})
    try:
        port = int(proc.address.rsplit(":", 1)[1])
        health = health_of(port)
        wait_for(health, {"": SERVING, NODE: SERVING})
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            statuses, closed = serving_until_closed(health, node_pb2_grpc.NodeStub(channel),
                                                    started)
        assert proc.proc.wait(timeout=30) == 0
        with pytest.raises(grpc.RpcError) as err:
            status(health)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the port is closed
        assert NOT_SERVING in statuses and statuses[-1] == NOT_SERVING
        assert closed >= DELAY
        assert f"stopping in {DELAY:g} s" in proc.log_path.read_text()
    finally:
        proc.stop()
