"""`vmattach audit` (clients/cli.py, unchanged) with libvirt replaced by the
state a tests/support/fake_node_server.py process dumped (SIGUSR1):

    VMATTACH_TEST_HYPERVISOR_DUMP=FILE python -m tests.support.audit_with_dump \\
        audit --database-url ... --tgt-control-port ...

Tests only: the audit reads the hypervisor of its own host, and the fake one
lives in the other process."""

from __future__ import annotations

import json
import os
import sys

from vmattach.node.hypervisor import Disk, Domain


class DumpedHypervisor:
    """The read-only part of node.hypervisor.Hypervisor the audit uses."""

    def __init__(self, uri: str = ""):
        with open(os.environ["VMATTACH_TEST_HYPERVISOR_DUMP"]) as fh:
            self._state = json.load(fh)

    def list_domains(self) -> list[Domain]:
        return [Domain(d["uuid"], d["name"], d["state"], d["active"], d["persistent"],
                       tuple(Disk(**k) for k in d["disks"])) for d in self._state["domains"]]

    def secret_usages(self) -> list[str]:
        return list(self._state["secrets"])

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    import vmattach.node.libvirt_hypervisor
    vmattach.node.libvirt_hypervisor.LibvirtHypervisor = DumpedHypervisor
    from vmattach.clients.cli import main as cli_main
    return cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
