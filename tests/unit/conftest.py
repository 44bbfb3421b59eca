"""tests/unit needs nothing outside the test process: no network (gRPC
servers or channels, sockets), no PostgreSQL, no libvirtd, no external
command. Every test here runs with those doors shut, so a test that needs
one fails at once (its place is tests/integration or tests/realstack)."""

from __future__ import annotations

import socket
import subprocess

import grpc
import psycopg2
import pytest


class TouchedTheHost(AssertionError):
    pass


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise TouchedTheHost(f"a unit test used {what}; move it to tests/integration")
    return refuse


@pytest.fixture(autouse=True)
def nothing_external(monkeypatch):
    for name in ("server", "insecure_channel", "secure_channel"):
        monkeypatch.setattr(grpc, name, _refuse(f"grpc.{name}"))
    monkeypatch.setattr(psycopg2, "connect", _refuse("PostgreSQL"))
    monkeypatch.setattr(socket.socket, "connect", _refuse("a socket"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("an external command"))
    try:
        import libvirt
    except ImportError:
        pass
    else:
        for name in ("open", "openAuth", "openReadOnly"):
            monkeypatch.setattr(libvirt, name, _refuse(f"libvirt.{name}"))


@pytest.fixture
def database_url(tmp_path):
    """Unit tests run on SQLite only (a file of this test); the same tests on
    PostgreSQL are tests/integration/test_postgresql_variants.py."""
    return f"sqlite:///{tmp_path / 'vmattach-test.db'}"
