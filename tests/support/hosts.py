"""Several hosts on one machine, for tests: each host is a network
namespace with its own address, plugged by a veth link into one switch (a
Linux bridge in a namespace of its own), so that traffic between hosts
crosses a real link that a test can cut (`cut()`, i.e. `ip link set ...
down`) and restore. A hypervisor host also gets its own libvirtd.

The recipe of a hypervisor host (see docs/deployment.md):

    ip netns add NS; ip -n NS link set lo up
    ip netns exec NS unshare -m --propagation private bash -c '
        mount -t tmpfs tmpfs /run; mkdir -p /run/libvirt /run/lock
        mount --bind PRIVATE/lib   /var/lib/libvirt      # PRIVATE/lib/qemu exists
        mount --bind PRIVATE/log   /var/log/libvirt
        mount --bind PRIVATE/cache /var/cache/libvirt
        mount --bind PRIVATE/etc   /etc/libvirt          # a copy without secrets/domains
        virtlogd -d; libvirtd -d; exec sleep infinity'  # the sleep holds the namespaces

Processes entered into both namespaces (`nsenter --net=/run/netns/NS
--mount=/proc/HOLDER/ns/mnt CMD`) see that libvirtd at qemu:///system and
only its domains; QEMU runs in NS. From outside, the same daemon answers at
`qemu:///system?socket=/proc/HOLDER/root/run/libvirt/libvirt-sock`. The copy
of /etc/libvirt matters: persistent secrets and domains live there, and the
machine's own libvirtd (and other tests) keep theirs in the real one.

Every name carries the topology's tag (`h17` and a random suffix), so
several topologies (and other tests) can run on one machine at once; close()
stops only what this topology started, by pid, and deletes its namespaces."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

LOG = logging.getLogger(__name__)
# under /etc/libvirt: persistent secrets, domains, pools, filters of a daemon
STATE_DIRS = ("secrets", "qemu", "storage", "nwfilter")
SUBNET = "10.217.0"   # inside the topology's own namespaces only: never routed elsewhere


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (rc {proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return proc


class Host:
    """One host: a network namespace plugged into the topology's switch."""

    def __init__(self, topology: Topology, role: str, ip: str):
        self.topology, self.role, self.ip = topology, role, ip
        self.netns = f"vma-{topology.tag}-{role}"
        self.port = f"p-{role}"   # its link's end in the switch namespace

    def argv(self, *argv: str) -> list[str]:
        """argv run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30):
        return sh(*self.argv(*argv), check=check, timeout=timeout)

    def __repr__(self) -> str:
        return f"<Host {self.role} {self.netns} {self.ip}>"


class HypervisorHost(Host):
    """A host with a libvirtd (and virtlogd) of its own."""

    def __init__(self, topology: Topology, role: str, ip: str):
        super().__init__(topology, role, ip)
        self.private = topology.tmp / f"libvirt-{role}"
        self.holder: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """This host's libvirtd, as seen from the machine's own namespaces."""
        return f"qemu:///system?socket=/proc/{self.holder.pid}/root/run/libvirt/libvirt-sock"

    def enter(self, *argv: str) -> list[str]:
        """argv run inside this host's network and mount namespaces (where
        qemu:///system is this host's libvirtd)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}",
                f"--mount=/proc/{self.holder.pid}/ns/mnt", *argv]

    def start_libvirtd(self, timeout: float = 60) -> None:
        p = self.private
        for d in ("lib/qemu", "log", "cache"):
            (p / d).mkdir(parents=True, exist_ok=True)
        # the configuration without the machine's daemon's state (which that
        # daemon may be changing right now)
        shutil.copytree("/etc/libvirt", p / "etc", symlinks=True,
                        ignore=shutil.ignore_patterns(*STATE_DIRS))
        for d in STATE_DIRS:
            (p / "etc" / d).mkdir(exist_ok=True)
        script = (f"set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/libvirt /run/lock; "
                  f"mount --bind {p}/lib /var/lib/libvirt; mount --bind {p}/log /var/log/libvirt; "
                  f"mount --bind {p}/cache /var/cache/libvirt; mount --bind {p}/etc /etc/libvirt; "
                  f"virtlogd -d; libvirtd -d; exec sleep infinity")
        log = open(p / "holder.log", "ab")
        self.holder = subprocess.Popen(
            self.argv("unshare", "-m", "--propagation", "private", "bash", "-c", script),
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while sh("virsh", "-c", self.uri, "version", check=False).returncode != 0:
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd of {self.netns} did not start: "
                                   f"{(p / 'holder.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def _daemon_pid(self, name: str) -> int | None:
        try:
            return int(Path(f"/proc/{self.holder.pid}/root/run/{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_libvirtd(self) -> None:
        """Destroy this libvirtd's domains (all ours), stop it and virtlogd
        by their pids, then the holder."""
        if self.holder is None or self.holder.poll() is not None:
            return
        uuids = sh("virsh", "-c", self.uri, "list", "--uuid", check=False).stdout.split()
        for uuid in uuids:
            sh("virsh", "-c", self.uri, "destroy", uuid, check=False)
        for name in ("libvirtd", "virtlogd"):
            pid = self._daemon_pid(name)
            if pid is None:
                continue
            _terminate(pid)
        self.holder.terminate()
        self.holder.wait(timeout=10)


def _terminate(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


class Topology:
    """Hosts on one switch. add_host()/add_hypervisor() plug a new host in;
    cut(host)/restore(host) take its link down/up; close() undoes it all."""

    def __init__(self, tmp: Path, tag: str | None = None):
        self.tmp = Path(tmp)
        self.tag = tag or f"h17{secrets.token_hex(3)}"
        self.switch = f"vma-{self.tag}-sw"
        self.hosts: list[Host] = []
        self._undo: list[Callable[[], None]] = []

    def start(self) -> Topology:
        self._netns(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        return self

    def _netns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self._undo.append(lambda: sh("ip", "netns", "del", name, check=False))
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _plug(self, host: Host) -> Host:
        self._netns(host.netns)
        sh("ip", "link", "add", "name", "eth0", "netns", host.netns, "type", "veth",
           "peer", "name", host.port, "netns", self.switch)
        sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.switch, "link", "set", host.port, "master", "br0")
        sh("ip", "-n", self.switch, "link", "set", host.port, "up")
        self.hosts.append(host)
        return host

    def add_host(self, role: str, last_octet: int) -> Host:
        return self._plug(Host(self, role, f"{SUBNET}.{last_octet}"))

    def add_hypervisor(self, role: str, last_octet: int) -> HypervisorHost:
        host = HypervisorHost(self, role, f"{SUBNET}.{last_octet}")
        self._plug(host)
        self._undo.append(host.stop_libvirtd)
        host.start_libvirtd()
        return host

    def cut(self, host: Host) -> None:
        """Take the host's link down (`ip link set DEV down` at the switch)."""
        sh("ip", "-n", self.switch, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        sh("ip", "-n", self.switch, "link", "set", host.port, "up")

    def close(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - every step gets its turn
                LOG.error("topology %s: clean-up step failed: %s", self.tag, exc)
