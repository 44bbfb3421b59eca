"""The SQL statements one attach and one detach cost, across the three
services (the Controller's and the facade's databases; the Node has none),
counted by SQLite itself (tests/support/sql_counter.py: a trace callback on
every connection, BEGIN and COMMIT included). The budgets pin what
issue 15 brought them down to, so that they cannot creep back; what each
statement is for is in the comments of controller/volumes.py and
server/bdms.py. A count, not a timing."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import make_settings
from tests.support import sql_counter
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.fake_tgt import FakeTgtRunner
from vmattach.clients.client import VmattachClient
from vmattach.v1 import types_pb2

# statements per attach / detach (its export is made again at each attach and
# goes at each detach)
ATTACH_BUDGET = 10
DETACH_BUDGET = 8
# of which BEGIN and COMMIT: one write transaction per operation, the
# Controller's call that holds the volume's lock across tgtd's requests
# (create attachment; delete attachment). Every other write is one
# compare-and-swap statement of its own.
TRANSACTIONS = 1


@pytest.fixture
def counted(tmp_path, serve):
    """An all-in-one vmattach (fake hypervisor, fake tgtd) whose SQLite
    statements are counted; no periodic work runs meanwhile."""
    counter = sql_counter.install()  # the connections are opened on first use
    try:
        hv = FakeHypervisor()
        running = serve(make_settings(
            tmp_path, services="controller,servers,node", node_id="node-1",
            initiator_iqn="iqn.2004-10.org.vmattach:sql-count", reconcile_interval=3600,
            server_refresh_interval=3600), runner=FakeTgtRunner(), hypervisor=hv)
        client = VmattachClient(f"127.0.0.1:{running.port}", timeout=60)
        yield counter, client, hv
        client.close()
    finally:
        counter.uninstall()


def test_one_attach_and_one_detach_stay_within_their_sql_budgets(counted):
    counter, client, hv = counted
    server_id = hv.add_domain().uuid
    volume_id = client.create_volume(f"sql-{uuid.uuid4().hex[:8]}", 1).volume_id
    client.attach_volume(server_id, volume_id)  # the first: the server cached, CHAP made
    client.detach_volume(server_id, volume_id)

    before = counter.snapshot()
    client.attach_volume(server_id, volume_id)
    mid = counter.snapshot()
    client.detach_volume(server_id, volume_id)
    after = counter.snapshot()

    attach, detach = sql_counter.diff(mid, before), sql_counter.diff(after, mid)
    assert sum(attach.values()) <= ATTACH_BUDGET, attach
    assert sum(detach.values()) <= DETACH_BUDGET, detach
    for spent in (attach, detach):
        assert spent.get("BEGIN", 0) == spent.get("COMMIT", 0) == TRANSACTIONS, spent
        assert "ROLLBACK" not in spent
    # and they did what they cost
    volume = client.get_volume(volume_id)
    assert (volume.status, len(volume.attachments)) == (types_pb2.VOLUME_STATUS_AVAILABLE, 0)
    assert list(client.list_attachments(server_id)) == []
    assert hv.get_domain(server_id).disk_of_volume(volume_id) is None


def test_a_refused_attach_changes_nothing(counted):
    """The compare-and-swap at reserve still refuses a volume attached
    elsewhere, and the refused attach rolls back (no row left behind)."""
    counter, client, hv = counted
    first, second = hv.add_domain().uuid, hv.add_domain().uuid
    volume_id = client.create_volume(f"sql-{uuid.uuid4().hex[:8]}", 1).volume_id
    client.attach_volume(first, volume_id)
    with pytest.raises(Exception) as info:
        client.attach_volume(second, volume_id)
    assert "already attached" in str(info.value)
    assert list(client.list_attachments(second)) == []
    volume = client.get_volume(volume_id)
    assert (volume.status, [a.server_id for a in volume.attachments]) == \
        (types_pb2.VOLUME_STATUS_IN_USE, [first])
