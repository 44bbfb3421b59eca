"""The bench's FAKE tgtd in a process of its own, and the command runner
that talks to it (the outermost boundary: docs/architecture.md, "Rules the
code keeps"). The bench server's Controller runs its tgtadm commands
through RemoteTgtRunner; the targets live here, in BenchTgtRunner
(tests/bench/fakes.py), so that the all-in-one's peak RSS is vmattach's own
memory, not that of a fake holding a cell's 100,000 targets.

    python -m tests.bench.fake_tgtd --name NAME [--preload CONTROLLER_DB]

prints `ready N` (N targets pre-loaded) and serves until SIGTERM or stdin
closes. One command per request on a Unix stream socket (NAME in the
abstract namespace: no file, no path length limit): the argv as one
JSON line; the answer one JSON line [returncode, stdout bytes, stderr] and
then stdout. Commands run one at a time, as tgtd runs them; a listing is
made under that lock and sent outside it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence

from tests.bench.fakes import BenchTgtRunner
from vmattach.common.runner import CommandError, Result

CHUNK = 1 << 16


def serve(path: str, runner: BenchTgtRunner) -> socketserver.ThreadingUnixStreamServer:
    lock = threading.Lock()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                argv = json.loads(line)
                with lock:
                    result = runner.run(argv, check=False)
                out = result.stdout.encode()
                try:
                    self.wfile.write(json.dumps([result.returncode, len(out), result.stderr])
                                     .encode() + b"\n")
                    self.wfile.write(out)
                    self.wfile.flush()
                except OSError:  # the runner stopped reading a listing early
                    return

    class Server(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True

    server = Server(path, Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="fake-tgtd").start()
    return server


class RemoteTgtRunner:
    """The runner of the bench server's Controller: each tgtadm command goes
    to the fake tgtd process (a connection per caller at a time, kept for
    the next one). lines() reads a listing a chunk at a time. Like tgtd's
    control socket, which it stands for, it runs no command side by side."""

    overlap = False

    def __init__(self, path: str):
        self.path = path
        self._idle: list[tuple[socket.socket, object]] = []
        self._lock = threading.Lock()

    def _connection(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        return sock, sock.makefile("rb")

    def _send(self, conn, argv: Sequence[str]) -> tuple[int, int, str]:
        sock, rfile = conn
        sock.sendall(json.dumps(list(argv)).encode() + b"\n")
        rc, size, err = json.loads(rfile.readline())
        return rc, size, err

    def _release(self, conn) -> None:
        with self._lock:
            self._idle.append(conn)

    def run(self, argv: Sequence[str], *, secrets: Sequence[str] = (), check: bool = True,
            timeout: float | None = None) -> Result:
        conn = self._connection()
        rc, size, err = self._send(conn, argv)
        out = conn[1].read(size).decode()
        self._release(conn)
        result = Result(rc, out, err)
        if check and rc != 0:
            raise CommandError(argv, result, secrets)
        return result

    @contextlib.contextmanager
    def lines(self, argv: Sequence[str], *, timeout: float | None = None
              ) -> Iterator[Iterator[str]]:
        conn = self._connection()
        rc, size, err = self._send(conn, argv)
        left = [size]

        def read() -> Iterator[str]:
            rest = b""
            while left[0]:
                chunk = conn[1].read(min(CHUNK, left[0]))
                left[0] -= len(chunk)
                *whole, rest = (rest + chunk).split(b"\n")
                for line in whole:
                    yield line.decode()
            if rest:
                yield rest.decode()

        try:
            yield read()
        finally:
            if left[0]:  # stopped early: the rest of the answer is on this connection
                conn[0].close()
            else:
                self._release(conn)
        if rc != 0:
            raise CommandError(argv, Result(rc, "", err))

    def close(self) -> None:
        with self._lock:
            for sock, rfile in self._idle:
                rfile.close()  # type: ignore[attr-defined]
                sock.close()
            self._idle.clear()


@contextlib.contextmanager
def fake_tgtd(preload: str | None = None) -> Iterator[RemoteTgtRunner]:
    """Start the fake tgtd process (its targets pre-loaded from a Controller
    database, if any); a runner talking to it; stopped on leaving."""
    name = f"vmattach-bench-tgtd-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    args = [sys.executable, "-m", "tests.bench.fake_tgtd", "--name", name]
    if preload:
        args += ["--preload", preload]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"the fake tgtd did not start: {line!r}")
        runner = RemoteTgtRunner("\0" + name)
        yield runner
        runner.close()
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--preload", default="")
    args = p.parse_args(argv)
    runner = BenchTgtRunner()
    loaded = runner.preload(args.preload) if args.preload else 0
    serve("\0" + args.name, runner)
    print(f"ready {loaded}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    # the bench server holds our stdin: when it dies, so do we
    threading.Thread(target=lambda: (sys.stdin.read(), stopped.set()), daemon=True).start()
    stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
