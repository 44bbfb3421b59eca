"""`make demo`: the whole attach path on this machine, checked step by step.

Starts a private tgtd and `vmattach serve` (all services, one state
directory, the secure default: every call needs a token), creates a user
token for its own project, boots the small Linux test guest (owned by that
project in Nova's domain metadata), creates a 1 GiB volume with a
known pattern, attaches it with the CLI, shows the attachment, the BDM row,
the disk in the domain XML, the initiator logged in at the target and the
guest's own view of the disk; detaches it and shows that everything is
clean. The last line starts with DEMO OK only when every check passed; it
stops everything it started."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.support.guest import TestGuest, virsh
from tests.support.tgtd import TgtDaemon

VMATTACH = str(Path(sys.executable).with_name("vmattach"))
PATTERN_BYTES = 4 << 20
PROJECT = "demo-" + uuid.uuid4().hex[:8]


class Demo:
    def __init__(self, state: Path):
        self.state = state
        self.failures: list[str] = []
        self.token = ""

    def check(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def cli(self, *args: str, token: str | None = None) -> tuple[int, str]:
        proc = subprocess.run([VMATTACH, "--address", self.address,
                               "--token", self.token if token is None else token, *args],
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, (proc.stdout + proc.stderr).strip()

    def new_token(self, project: str, role: str) -> str:
        """`vmattach token create` on the running server's state directory."""
        proc = subprocess.run([VMATTACH, "token", "create", "--project", project, "--role", role,
                               "--state-dir", str(self.state), "--log-level", "WARNING"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise RuntimeError(f"vmattach token create failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def run(self) -> int:
        with TgtDaemon(log_path=self.state / "tgtd.log") as tgtd:
            self.tgtd = tgtd
            server = subprocess.Popen(
                [VMATTACH, "serve", "--listen", "127.0.0.1:0", "--state-dir", str(self.state),
                 "--tgt-portal", tgtd.portal, "--tgt-control-port", str(tgtd.control_port),
                 "--log-level", "WARNING"],
                stdout=subprocess.PIPE, stderr=open(self.state / "vmattach.log", "w"), text=True)
            try:
                first = server.stdout.readline().strip()
                self.address = first.split()[-1] if first else ""
                print(f"vmattach: {first} (state {self.state}, tgtd portal {tgtd.portal})")
                self.section(f"vmattach token create --project {PROJECT} --role member")
                self.token = self.new_token(PROJECT, "member")
                self.check(self.token.startswith("vmat."), "a user token, shown once")
                rc, out = self.cli("volume", "list", token="")
                self.check(rc == 1 and "(reason NO_TOKEN)" in out, "no token: UNAUTHENTICATED")
                with TestGuest.start(kind="linux", project_id=PROJECT) as guest:
                    print(f"guest: {guest.name} ({guest.uuid}) booted in {guest.boot_seconds:.1f} s")
                    self.scenario(guest)
            finally:
                server.terminate()
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    server.kill()
        if self.failures:
            print(f"\nDEMO FAILED: {len(self.failures)} check(s) failed: {'; '.join(self.failures)}")
            return 1
        print(f"\nDEMO OK attach {self.attach_ms:.0f} ms, detach {self.detach_ms:.0f} ms")
        return 0

    def tgt_show(self) -> str:
        return subprocess.run(["tgtadm", "--control-port", str(self.tgtd.control_port), "--lld",
                               "iscsi", "--mode", "target", "--op", "show"],
                              capture_output=True, text=True).stdout

    def domain_disks(self, guest) -> list[ET.Element]:
        xml = ET.fromstring(virsh(guest.uri, "dumpxml", guest.uuid).stdout)
        return [d for d in xml.findall("devices/disk") if d.findtext("serial")]

    def scenario(self, guest) -> None:
        self.section("create a 1 GiB volume")
        rc, out = self.cli("--json", "volume", "create", f"demo-{guest.name}", "--size", "1")
        self.check(rc == 0, "vmattach volume create")
        volume = json.loads(out)
        volume_id = volume["volume_id"]
        path = self.state / "volumes" / f"volume-{volume_id}.img"
        pattern = os.urandom(PATTERN_BYTES)
        with open(path, "r+b") as fh:
            fh.write(pattern)
        digest = hashlib.sha256(pattern).hexdigest()
        print(f"  volume {volume_id}: wrote {PATTERN_BYTES >> 20} MiB, sha256 {digest[:16]}...")

        self.section(f"vmattach volume attach {guest.uuid} {volume_id}")
        start = time.perf_counter()
        rc, out = self.cli("--json", "volume", "attach", guest.uuid, volume_id)
        self.attach_ms = (time.perf_counter() - start) * 1000
        self.check(rc == 0, f"attach returned in {self.attach_ms:.0f} ms")
        if rc:
            print(out)
            return
        attachment = json.loads(out)
        print(json.dumps(attachment, indent=2))

        self.section("the block_device_mapping row")
        db = sqlite3.connect(self.state / "servers.db")
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT id, device_name, volume_id, instance_uuid, source_type,"
                              " destination_type, state, deleted, connection_info FROM"
                              " block_device_mapping WHERE attachment_id = ?",
                              (attachment["attachment_id"],)).fetchone())
        for key, value in row.items():
            print(f"  {key}: {value}")
        self.check(row["state"] == "attached" and row["deleted"] == 0, "BDM row attached")
        self.check('"auth_password"' not in row["connection_info"],
                   "no plain-text CHAP password in the BDM row")

        self.section("the disk in the domain XML")
        disks = self.domain_disks(guest)
        for disk in disks:
            print("  " + ET.tostring(disk, encoding="unicode").strip().replace("\n", "\n  "))
        self.check(any(d.findtext("serial") == volume_id and
                       d.find("target").get("dev") == attachment["device"].removeprefix("/dev/")
                       for d in disks), "domain has the disk with the volume's serial")

        self.section("the initiator logged in at the target")
        show = self.tgt_show()
        print("  " + show.strip().replace("\n", "\n  "))
        self.check(f"volume-{volume_id}" in show and "Initiator: iqn." in show,
                   "target exported, node's initiator logged in (I_T nexus)")

        self.section("another project sees neither the volume nor the server")
        other = self.new_token("other-" + PROJECT, "member")
        rc, out = self.cli("volume", "show", volume_id, token=other)
        self.check(rc == 1 and "(reason VOLUME_NOT_FOUND)" in out,
                   "another project's volume show: NOT_FOUND")
        rc, out = self.cli("server", "show", guest.uuid, token=other)
        self.check(rc == 1 and "(reason SERVER_NOT_FOUND)" in out,
                   "another project's server show: NOT_FOUND")

        self.section("the guest's own view")
        seen = guest.wait_disk(volume_id, timeout=30)
        hint = attachment["guest_path_hint"]
        rc, target = guest.run(f"readlink -f {hint}")
        print(f"  guest disk: name {seen['name']}, serial {seen['serial']},"
              f" size {seen['size']} bytes, sha256 of the first 4 MiB {seen['sha256'][:16]}...")
        print(f"  in the guest, {hint} -> {target.strip()}")
        self.check(rc == 0 and target.strip() == f"/dev/{seen['name']}",
                   "the attachment's path hint names the disk in the guest")
        self.check(volume_id.startswith(seen["serial"]), "guest sees the volume's serial")
        self.check(seen["size"] == 1 << 30, "guest sees 1 GiB")
        self.check(seen["sha256"] == digest, "guest reads the pattern written on the host")

        self.section(f"vmattach volume detach {guest.uuid} {volume_id}")
        start = time.perf_counter()
        rc, out = self.cli("volume", "detach", guest.uuid, volume_id)
        self.detach_ms = (time.perf_counter() - start) * 1000
        self.check(rc == 0, f"detach returned in {self.detach_ms:.0f} ms {out}")
        guest.wait_disk_gone(volume_id, timeout=30)
        self.check(True, "the guest no longer has the disk")

        self.section("everything is clean")
        rc, out = self.cli("--json", "volume", "show", volume_id)
        self.check(rc == 0 and json.loads(out)["status"] == "available", "volume available")
        live = db.execute("SELECT count(*) FROM block_device_mapping WHERE volume_id = ? AND"
                          " deleted = 0", (volume_id,)).fetchone()[0]
        self.check(live == 0, "no live BDM row")
        self.check(f"volume-{volume_id}" not in self.tgt_show(), "no target at tgtd")
        secrets = virsh(guest.uri, "secret-list").stdout
        self.check(f"volume-{volume_id}" not in secrets, "no libvirt secret")
        self.check(not self.domain_disks(guest), "no disk in the domain")
        rc, out = self.cli("volume", "delete", volume_id)
        self.check(rc == 0, "volume deleted")


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="vmattach-demo-"))
    print(f"vmattach demo, state directory {state}")
    try:
        rc = Demo(state).run()
    except Exception as exc:  # noqa: BLE001 - the demo reports, never hides, a failure
        print(f"\nDEMO FAILED: {type(exc).__name__}: {exc} (logs in {state})")
        return 1
    if rc == 0:
        shutil.rmtree(state, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
