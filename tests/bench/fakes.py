"""The benchmark's fakes, at the outermost boundary only (docs/architecture.md, "Rules the code keeps"):
the in-memory hypervisor of tests/support/fake_hypervisor.py and the fake tgtd of
tests/support/fake_tgt.py. Never imported by production code."""

from __future__ import annotations

import collections
import json

from tests.bench.common import node_id, server_uuid
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.fake_tgt import FakeTarget, FakeTgtRunner, _err, _ok
from vmattach.node.hypervisor import Disk, volume_alias


def attached_volume_uuid(node: int, index: int) -> str:
    """The pre-filled volume attached (as vdb) to domain `index` of `node`."""
    import uuid

    from tests.bench.common import NAMESPACE
    return str(uuid.uuid5(NAMESPACE, f"node-{node}/server-{index}/attached"))


def fake_hypervisor(node: int, domains: int, prefilled: bool) -> FakeHypervisor:
    """`domains` running fake domains; with prefilled, each has the disk of its
    pre-filled attachment (what the databases say is attached)."""
    hv = FakeHypervisor()
    for i in range(domains):
        disks = ()
        if prefilled:
            vol = attached_volume_uuid(node, i)
            disks = (Disk("vdb", "virtio", vol, volume_alias(vol)),)
        hv.add_domain(f"{node_id(node)}-vm{i}", uuid=server_uuid(node, i), disks=disks)
    return hv


class BenchTgtRunner(FakeTgtRunner):
    """FakeTgtRunner that keeps only its last calls (the test fake records all
    of them, which would grow the server's memory with every cycle)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.deque(maxlen=64)
        # tgtd finds a target by IQN and an account's targets without a scan; the
        # test fake scans all of them, which at the scale part's 10,000 targets made
        # the fake, not vmattach, a sixth of the server's time per cycle
        self._by_iqn: dict[str, int] = {}
        self._bound: dict[str, set[int]] = collections.defaultdict(set)

    def _tgtadm(self, o: dict[str, str]):
        mode, op = o.get("--mode"), o.get("--op")
        if (mode, op) in self._failures:
            return super()._tgtadm(o)
        if mode == "target" and op == "new":
            tid, iqn = int(o["--tid"]), o["--targetname"]
            other = self.targets.get(self._by_iqn.get(iqn, -1))
            if tid in self.targets or (other is not None and other.iqn == iqn):
                return _err("this target already exists")
            self.targets[tid] = FakeTarget(tid, iqn)
            self._by_iqn[iqn] = tid
            return _ok()
        if mode == "account" and op == "delete":
            user = o["--user"]
            if user not in self.accounts:
                return _err("can't find the account")
            del self.accounts[user]
            for tid in self._bound.pop(user, ()):
                target = self.targets.get(tid)
                if target is not None and user in target.accounts:
                    target.accounts.remove(user)
            return _ok()
        result = super()._tgtadm(o)
        if mode == "account" and op == "bind" and result.returncode == 0:
            self._bound[o["--user"]].add(int(o["--tid"]))
        return result

    def preload(self, db_path: str) -> int:
        """The targets the pre-filled database says exist, as a tgtd that kept
        running across the Controller's restart would have them."""
        from peewee import fn

        from vmattach.common.db import open_database
        from vmattach.controller.models import MODELS, Export, Volume, VolumeAttachment
        db = open_database(f"sqlite:///{db_path}", MODELS)
        acls: dict[str, list[str]] = collections.defaultdict(list)
        with db.connection_context():
            for att in (VolumeAttachment.select(VolumeAttachment.volume, VolumeAttachment.connector)
                        .where(VolumeAttachment.connector.is_null(False)).tuples()):
                acls[att[0]].append(json.loads(att[1])["initiator"])
            rows = (Export.select(fn.COALESCE(Export.target_tid, Export.tid), Export.target_iqn,
                                  Volume.id, Volume.path, Volume.chap_username)
                    .join(Volume).tuples())
            for tid, iqn, vid, path, user in rows:
                self.targets[tid] = FakeTarget(tid, iqn, {1: path}, [user] if user else [],
                                               acls.get(vid, []))
                self._by_iqn[iqn] = tid
                if user:
                    self.accounts[user] = "x"
                    self._bound[user].add(tid)
        db.close()
        return len(self.targets)
