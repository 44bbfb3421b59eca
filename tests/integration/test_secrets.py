"""Secrets at rest: a facade replica on another state directory reads the
BDM rows with the shared key file, and `vmattach rotate-key` re-encrypts
every stored secret while attached volumes still detach."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from cryptography.fernet import Fernet, InvalidToken

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.vmattach_process import VMATTACH, ServeProcess
from vmattach.clients.client import VmattachClient
from vmattach.common.secretbox import read_keys
from vmattach.v1 import types_pb2

pytestmark = pytest.mark.realstack  # the Controller runs on a real (private) tgtd


@pytest.fixture
def shared(tmp_path, tgtd, serve):
    """The all-in-one on state directory A with a shared key file and a
    database file another process can open too."""
    key = tmp_path / "shared" / "secret.key"
    key.parent.mkdir(mode=0o700)
    db_url = f"sqlite:///{tmp_path / 'shared' / 'vmattach.db'}"
    settings = make_settings(tmp_path / "a", tgt_portal=tgtd.portal,
                             tgt_control_port=tgtd.control_port, node_id="node-1",
                             initiator_iqn="iqn.2004-10.org.vmattach:secrets-node",
                             detach_timeout=0.5, detach_retries=2, reconcile_interval=3600,
                             secret_key_file=str(key), database_url=db_url)
    hv = FakeHypervisor()
    running = serve(settings, hypervisor=hv)
    address = f"127.0.0.1:{running.port}"
    with VmattachClient(address, timeout=60) as client:
        yield settings, hv, address, client, key


def sealed_secrets(db_path) -> list[str]:
    import sqlite3
    db = sqlite3.connect(db_path)
    try:
        bdm = [json.loads(c)["data"]["auth_password_encrypted"] for c, in db.execute(
            "SELECT connection_info FROM block_device_mapping WHERE deleted = 0")]
        chap = [s for s, in db.execute("SELECT chap_secret FROM controller_volume"
                                       " WHERE chap_secret IS NOT NULL")]
    finally:
        db.close()
    return bdm + chap


def test_a_replica_on_another_state_directory_decrypts_with_the_shared_key(shared, tmp_path):
    settings, hv, address, client, key = shared
    server = hv.add_domain().uuid
    volume = client.create_volume(f"replica-{uuid.uuid4().hex[:6]}", 1).volume_id
    client.attach_volume(server, volume)
    replica = ServeProcess(["--services", "servers", "--listen", "127.0.0.1:0",
                            "--state-dir", str(tmp_path / "b"),
                            "--database-url", settings.database_url,
                            "--secret-key-file", str(key), "--controller-address", address,
                            "--nodes", address, "--reconcile-interval", "3600",
                            "--log-level", "WARNING"], tmp_path / "replica.log")
    try:
        with VmattachClient(replica.address, controller_address=address, timeout=60) as other:
            other.detach_volume(server, volume)  # unseals the row replica A wrote
        assert client.get_volume(volume).status == types_pb2.VOLUME_STATUS_AVAILABLE
        assert not (tmp_path / "b" / "servers-secret.key").exists()  # only the shared key
    finally:
        replica.stop()
    assert "cannot be decrypted" not in replica.log_path.read_text()


def test_rotate_key_re_encrypts_everything_and_attached_volumes_still_detach(shared, tmp_path):
    settings, hv, address, client, key = shared
    servers = [hv.add_domain().uuid for _ in range(2)]
    volumes = [client.create_volume(f"rot-{uuid.uuid4().hex[:6]}", 1).volume_id for _ in servers]
    for s, v in zip(servers, volumes, strict=True):
        client.attach_volume(s, v)
    db_path = settings.database_url.removeprefix("sqlite:///")
    [old_key] = read_keys(key)
    before = sealed_secrets(db_path)
    assert len(before) == 4 and all(Fernet(old_key).decrypt(t.encode()) for t in before)
    proc = subprocess.run([VMATTACH, "rotate-key", "--state-dir", settings.state_dir,
                           "--database-url", settings.database_url,
                           "--secret-key-file", str(key)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "controller: 2 secret(s)" in proc.stdout and "servers: 2 secret(s)" in proc.stdout
    keys = read_keys(key)
    assert len(keys) == 2 and keys[1] == old_key  # the new key first; the old one still reads
    after = sealed_secrets(db_path)
    for token in after:
        Fernet(keys[0]).decrypt(token.encode())
        with pytest.raises(InvalidToken):
            Fernet(old_key).decrypt(token.encode())
    # the running process re-reads the key file: detach and attach again work
    for s, v in zip(servers, volumes, strict=True):
        client.detach_volume(s, v)
        assert client.get_volume(v).status == types_pb2.VOLUME_STATUS_AVAILABLE
    client.attach_volume(servers[0], volumes[0])
    client.detach_volume(servers[0], volumes[0])
