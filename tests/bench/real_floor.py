"""The real stack's floor: the tgtd and libvirt operations of one attach and
one detach, done directly, with no vmattach in between (no gRPC, no
database, no orchestration), on the same tgtd, libvirtd and guest as the
real-stack figure (tests/bench/run.py: real_stack).

    attach  tgtadm: target new, logicalunit new (LUN 1), account new,
            account bind, target bind (the initiator's ACL);
            virsh: secret-define, secret-set-value, attach-device (the
            iSCSI disk with CHAP through QEMU's initiator, scsi bus)
    detach  virsh: detach-device (libvirt waits for QEMU's DEVICE_DELETED),
            secret-undefine; tgtadm: target delete --force, account delete

Each operation runs after the one before it. The bench takes turns: a run
of vmattach's cycles, then a run of these on the same guest (another
device), and so on, so that both see the machine as it is at that moment.

tgtd's requests go either as a tgtadm command each (tgt="tgtadm", what an
operator runs by hand, and the Controller with `tgt_control = "tgtadm"`) or
written to tgtd's control socket (tgt="socket", what the Controller does by
default: controller/tgtd_socket.py, the same bytes tgtadm writes). libvirt
is driven through one long-lived `virsh` shell (commands on its standard
input), so that each operation is one libvirt call without a process start;
the project imports the libvirt bindings in one module only
(node/libvirt_hypervisor.py)."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import string
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

MARK = "<vmattach-floor-done>"
INITIATOR = "iqn.2004-10.org.vmattach:bench-floor"


class VirshShell:
    """One `virsh -c URI` reading commands from its standard input. Without a
    terminal it echoes each command after its prompt; the end of a command's
    output is the output of `echo --xml` of a marker (escaped, so that the
    echo of the command itself does not match)."""

    def __init__(self, uri: str):
        self.proc = subprocess.Popen(["virsh", "-q", "-c", uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, *words: str) -> str:
        line = " ".join(_quote(w) for w in words)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{line}\necho --xml '{MARK}'\n".encode())
        self.proc.stdin.flush()
        done = MARK.replace("<", "&lt;").replace(">", "&gt;")
        out = b""
        fd = self.proc.stdout.fileno()
        while done.encode() not in out:
            got = os.read(fd, 65536)
            if not got:
                raise RuntimeError(f"virsh ended during {line!r}: {out.decode()}")
            out += got
        text = out.decode().split(done)[0]
        if "error:" in text:
            raise RuntimeError(f"virsh {line!r}: {text.strip()}")
        return text

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _quote(word: str) -> str:
    return word if word and all(c.isalnum() or c in "-_./:=@" for c in word) else f"'{word}'"


def _tgt_requests(tgt: str, control_port: int) -> Callable[..., None]:
    """tgtadm(*args): one request to tgtd, by a tgtadm command or on its socket."""
    from vmattach.common.runner import CommandRunner
    from vmattach.controller.tgtd_socket import TgtdSocketRunner
    runner = TgtdSocketRunner(CommandRunner()) if tgt == "socket" else CommandRunner()

    def tgtadm(*args: str) -> None:
        runner.run(["tgtadm", "--control-port", str(control_port), "--lld", "iscsi", *args],
                   timeout=30)
    return tgtadm


def _disk_xml(iqn: str, host: str, port: int, user: str, usage: str, serial: str,
              device: str) -> str:
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none")
    src = ET.SubElement(disk, "source", protocol="iscsi", name=f"{iqn}/1")
    ET.SubElement(src, "host", name=host, port=str(port))
    ET.SubElement(ET.SubElement(src, "initiator"), "iqn", name=INITIATOR)
    auth = ET.SubElement(disk, "auth", username=user)
    ET.SubElement(auth, "secret", type="iscsi", usage=usage)
    ET.SubElement(disk, "target", dev=device, bus="scsi")
    ET.SubElement(disk, "serial").text = serial
    ET.SubElement(disk, "alias", name=f"ua-{serial}")
    return ET.tostring(disk, encoding="unicode")


@contextlib.contextmanager
def direct_ops(uri: str, domain: str, portal: str, control_port: int, work: Path,
               tid: int = 900, device: str = "sdc", tgt: str = "tgtadm",
               ) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """The direct attach() and detach() of one volume of its own (target tid,
    the guest's device), warmed up; whatever is attached is detached when
    the block ends. Its device is not vmattach's (sdb), so that the two can
    take turns on one guest."""
    host, port = portal.rsplit(":", 1)
    backing = work / f"floor-volume-{tid}.img"
    tgtadm = _tgt_requests(tgt, control_port)
    with open(backing, "wb") as fh:
        fh.truncate(1 << 30)  # sparse, 1 GiB like a vmattach volume of size_gb 1
    serial = str(uuid.uuid4())
    iqn = f"iqn.2010-10.org.openstack:volume-{serial}"
    usage = f"volume-{serial}"
    alphabet = string.ascii_letters + string.digits
    user = "".join(secrets.choice(alphabet) for _ in range(20))
    password = "".join(secrets.choice(alphabet) for _ in range(20))
    secret_file = work / f"floor-secret-{tid}.xml"
    secret_uuid = str(uuid.uuid4())
    secret = ET.Element("secret", ephemeral="no", private="yes")
    ET.SubElement(secret, "uuid").text = secret_uuid
    ET.SubElement(ET.SubElement(secret, "usage", type="iscsi"), "target").text = usage
    secret_file.write_text(ET.tostring(secret, encoding="unicode"))
    disk_file = work / f"floor-disk-{tid}.xml"
    disk_file.write_text(_disk_xml(iqn, host, int(port), user, usage, serial, device))
    value_file = work / f"floor-secret-{tid}.b64"  # virsh refuses a secret on its command line
    value_file.write_text(base64.b64encode(password.encode()).decode())
    virsh = VirshShell(uri)

    def attach() -> None:
        tgtadm("--mode", "target", "--op", "new", "--tid", str(tid),
                "--targetname", iqn)
        tgtadm("--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                "--lun", "1", "--backing-store", str(backing))
        tgtadm("--mode", "account", "--op", "new", "--user", user,
                "--password", password)
        tgtadm("--mode", "account", "--op", "bind", "--tid", str(tid),
                "--user", user)
        tgtadm("--mode", "target", "--op", "bind", "--tid", str(tid),
                "--initiator-name", INITIATOR)
        virsh.run("secret-define", str(secret_file))
        virsh.run("secret-set-value", secret_uuid, "--file", str(value_file))
        ids.append(secret_uuid)
        virsh.run("attach-device", domain, str(disk_file), "--live")

    def detach() -> None:
        virsh.run("detach-device", domain, str(disk_file), "--live")
        virsh.run("secret-undefine", ids.pop())
        tgtadm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
        tgtadm("--mode", "account", "--op", "delete", "--user", user)

    ids: list[str] = []
    try:
        for _ in range(2):  # warm up
            attach()
            detach()
        yield attach, detach
    finally:
        try:
            if ids:
                detach()
        finally:
            virsh.close()
