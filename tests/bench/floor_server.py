"""The floor's server: our gRPC set-up (server.grpcutil: the thread pool,
the error interceptor, health and reflection) serving nothing but the
health service. Prints `listening on 127.0.0.1:PORT`; SIGTERM stops it."""

from __future__ import annotations

import signal
import threading

from vmattach.common.grpcutil import create_server


def main() -> None:
    server, port = create_server([], "127.0.0.1:0")
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
