"""What the gRPC health service of a process answers (grpc.health.v1).

Each service names the probes of its backends (the Controller: tgtd and its
database; the Node: its hypervisor; the facade: its database). A periodic
round runs them: a service whose probe fails is NOT_SERVING under its own
name until a round passes again; the overall status ("") is NOT_SERVING
while any service of the server is. From the start of a shutdown every
status is NOT_SERVING and stays so (docs/operations.md, "Limits and
health")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from grpc_health.v1 import health, health_pb2

from vmattach.common.periodic import every
from vmattach.common.rules import prefix

LOG = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""
# A probe: what it checks ("tgtd", "database", ...) and a function that
# raises when that is not reachable.
Probes = dict[str, Callable[[], object]]


class Health:
    """The statuses of the services of one process, on every health servicer
    (one per listening port) that serves them."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self._lock = threading.Lock()
        self._serving: dict[str, bool] = {}
        self._servicers: list[tuple[health.HealthServicer, list[str]]] = []
        self._stop = threading.Event()
        self._stopping = False

    def serve_on(self, servicer: health.HealthServicer, names: Iterable[str]) -> None:
        """servicer answers for these services (and "" for all of them)."""
        names = list(names)
        with self._lock:
            self._servicers.append((servicer, names))
            for name in names:
                self._serving.setdefault(name, True)
            self._publish()

    def _publish(self) -> None:
        """(lock held) Every servicer's statuses as they are now."""
        for servicer, names in self._servicers:
            for name in names:
                servicer.set(name, SERVING if self._serving[name] else NOT_SERVING)
            overall = all(self._serving[name] for name in names)
            servicer.set(OVERALL, SERVING if overall else NOT_SERVING)

    def serving(self, name: str) -> bool:
        with self._lock:
            return self._serving.get(name, False) and not self._stopping

    def set(self, name: str, serving: bool, why: str = "") -> None:
        with self._lock:
            if self._stopping:
                return
            before = self._serving.get(name)
            self._serving[name] = serving
            self._publish()
        if before is not None and before != serving:
            if serving:
                LOG.info("health: %s is SERVING again", name)
            else:
                LOG.warning("health: %s is NOT_SERVING: %s", name, why)

    def probe(self, name: str, probes: Probes) -> bool:
        """Run a service's probes now and set its status; True when all pass."""
        for what, check in probes.items():
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
                self.set(name, False, f"{what} unreachable: {prefix(exc, 300)}")
                return False
        self.set(name, True)
        return True

    def watch(self, services: Iterable[tuple[str, Probes]]) -> None:
        """Probe each service every interval seconds, each on its own thread
        (a probe that hangs delays no other service's status)."""
        for name, probes in services:
            if probes:
                every(self.interval, lambda n=name, p=probes: self.probe(n, p), self._stop,
                      f"health-{name.rsplit('.', 1)[-1].lower()}")

    def shutdown(self) -> None:
        """NOT_SERVING for every service and overall, for good; probes stop."""
        with self._lock:
            self._stopping = True
            servicers = [s for s, _ in self._servicers]
        self._stop.set()
        for servicer in servicers:
            servicer.enter_graceful_shutdown()
        LOG.info("health: NOT_SERVING (shutting down)")
