"""Fixtures shared by the whole suite: private state directories, a private
tgtd, and vmattach servers started in-process on port 0."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from controller.tgtd import TgtDaemon
from server.app import Running, start
from server.config import Settings

# `make test` sets this: there a missing real stack is a failure, not a skip.
REQUIRE_REALSTACK = os.environ.get("VMATTACH_REQUIRE_REALSTACK") == "1"


def realstack_missing(*commands: str) -> str | None:
    for command in commands:
        if shutil.which(command) is None:
            return f"{command} is not installed (run scripts/setup-host.sh)"
    if "virsh" in commands:
        proc = subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return "libvirtd is not reachable on qemu:///system (run scripts/setup-host.sh)"
    return None


def need(*commands: str) -> None:
    reason = realstack_missing(*commands)
    if reason:
        if REQUIRE_REALSTACK:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def tgtd(tmp_path):
    """A tgtd of this test only, on a free portal port and a private control port."""
    need("tgtd", "tgtadm")
    daemon = TgtDaemon(log_path=tmp_path / "tgtd.log").start()
    yield daemon
    daemon.stop()


def make_settings(tmp_path, **overrides) -> Settings:
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    values = dict(listen="127.0.0.1:0", state_dir=str(state), log_level="WARNING")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def serve():
    """serve(settings) starts vmattach in this process; stopped after the test."""
    started: list[Running] = []

    def _serve(settings: Settings, **kw) -> Running:
        running = start(settings, **kw)
        started.append(running)
        return running

    yield _serve
    for running in reversed(started):
        running.stop(grace=1)


@pytest.fixture
def controller(tmp_path, tgtd, serve):
    """A Controller on a real tgtd; .address, .settings, .running, .tgtd."""
    settings = make_settings(tmp_path, services="controller", tgt_portal=tgtd.portal,
                             tgt_control_port=tgtd.control_port)
    running = serve(settings)

    class C:
        pass
    c = C()
    c.settings, c.running, c.tgtd = settings, running, tgtd
    c.address = f"127.0.0.1:{running.port}"
    return c
