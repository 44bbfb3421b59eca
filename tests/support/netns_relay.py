"""A TCP relay from this machine's loopback into a network namespace, for
tests: the test process (in the host's own namespace) reaches services
that listen only inside the namespaces of a tests/support/hosts.py
topology, while every service-to-service byte stays on the veth links.

    python -m tests.support.netns_relay /run/netns/NS HOST:PORT [HOST:PORT ...]

binds one listener per target on 127.0.0.1 (a free port each) in the
namespace it starts in, prints `relaying PORT [PORT ...]`, enters NS (before
any other thread exists, so that every connection it opens is made from
inside NS) and forwards each accepted connection to its target. Stop it
with SIGTERM. Tests only."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000


def enter_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def main(argv: list[str]) -> int:
    netns, *targets = argv
    listeners = []
    for _ in targets:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        listeners.append(s)
    enter_netns(netns)
    print("relaying " + " ".join(str(s.getsockname()[1]) for s in listeners), flush=True)
    for s, target in zip(listeners, targets, strict=True):
        host, _, port = target.rpartition(":")
        threading.Thread(target=_serve, args=(s, (host, int(port))), daemon=True).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
