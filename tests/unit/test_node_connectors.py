"""Volume connectors: the kernel iSCSI command sequence (with a recording
fake runner), QEMU-native iSCSI secrets (with the fake hypervisor), file
volumes, and the factory."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from tests.support.fake_hypervisor import FakeHypervisor
from tests.support.fake_runner import FakeRunner
from tests.support.node_helpers import (
    CHAP_PASSWORD,
    CHAP_USER,
    NODE_IQN,
    PORTAL,
    file_info,
    iscsi_info,
    new_id,
    target_iqn,
)
from vmattach.common.errors import BackendError, FailedPrecondition, InvalidArgument, NotFound
from vmattach.common.runner import CommandError
from vmattach.node.connectors import FileConnector, KernelIscsiConnector, QemuIscsiConnector, make_factory
from vmattach.node.connectors.base import Portal, parse_portal
from vmattach.node.hypervisor import BlockSource, FileSource, IscsiSource


def node_cmd(iqn: str, *args: str) -> list[str]:
    return ["iscsiadm", "-m", "node", "-T", iqn, "-p", PORTAL, *args]


def kernel_stage_commands(iqn: str, login: bool = True) -> list[list[str]]:
    """os-brick's connect_volume sequence, as the brief spells it."""
    def update(key: str, value: str) -> list[str]:
        return node_cmd(iqn, "--op", "update", "-n", key, "-v", value)
    return [
        node_cmd(iqn, "--interface", "default", "--op", "new"),
        ["iscsiadm", "-m", "session"],
        update("node.session.scan", "manual"),
        update("node.session.auth.authmethod", "CHAP"),
        update("node.session.auth.username", CHAP_USER),
        update("node.session.auth.password", CHAP_PASSWORD),
        *([node_cmd(iqn, "--login")] if login else []),
        update("node.startup", "automatic"),
    ]


@pytest.fixture
def runner():
    return FakeRunner().on("iscsiadm", "-m", "session", returncode=21,
                           stderr="iscsiadm: No active sessions.")


def kernel(runner, exists=lambda path: True, timeout=0.0) -> KernelIscsiConnector:
    return KernelIscsiConnector(runner, device_timeout=timeout, exists=exists)


# -- kernel iSCSI ----------------------------------------------------------------------

def test_kernel_stage_runs_os_brick_sequence_and_returns_by_path(runner):
    vid = new_id()
    seen = []
    staged = kernel(runner, exists=lambda p: seen.append(p) or True).stage(vid, iscsi_info(vid))
    assert runner.argvs == kernel_stage_commands(target_iqn(vid))
    path = f"/dev/disk/by-path/ip-{PORTAL}-iscsi-{target_iqn(vid)}-lun-1"
    assert staged.device_path == path and seen == [path]
    assert staged.driver_volume_type == "iscsi" and staged.secret_usage == ""


def test_kernel_stage_passes_password_as_secret_and_never_logs_it(runner, caplog):
    vid = new_id()
    with caplog.at_level(logging.DEBUG):
        kernel(runner).stage(vid, iscsi_info(vid))
    password_calls = [c for c in runner.calls if CHAP_PASSWORD in c.argv]
    assert len(password_calls) == 1 and password_calls[0].secrets == [CHAP_PASSWORD]
    assert all(CHAP_PASSWORD not in c.argv for c in runner.calls if c not in password_calls)
    assert "node.session.auth.password -v ***" in caplog.text
    assert CHAP_PASSWORD not in caplog.text


def test_kernel_stage_failure_message_masks_password(runner):
    vid = new_id()
    runner.on(*node_cmd(target_iqn(vid), "--op", "update", "-n", "node.session.auth.password"),
              returncode=7, stderr=f"bad value {CHAP_PASSWORD}")
    with pytest.raises(CommandError) as err:
        kernel(runner).stage(vid, iscsi_info(vid))
    assert CHAP_PASSWORD not in err.value.message and "***" in err.value.message


def test_kernel_stage_skips_login_when_session_exists():
    vid = new_id()
    iqn = target_iqn(vid)
    runner = FakeRunner().on("iscsiadm", "-m", "session",
                             stdout=f"tcp: [4] {PORTAL},1 {iqn} (non-flash)\n")
    kernel(runner).stage(vid, iscsi_info(vid))
    assert runner.argvs == kernel_stage_commands(iqn, login=False)


def test_kernel_stage_accepts_already_logged_in(runner):
    vid = new_id()
    runner.on(*node_cmd(target_iqn(vid), "--login"), returncode=15)
    assert kernel(runner).stage(vid, iscsi_info(vid)).device_path


def test_kernel_stage_device_never_appears_is_backend_error(runner):
    vid = new_id()
    with pytest.raises(BackendError, match="did not appear"):
        kernel(runner, exists=lambda p: False, timeout=0).stage(vid, iscsi_info(vid))


class StagedHost:
    """The host side of a staged LUN: its by-path link to /dev/sdc and
    /sys/block/sdc, which goes once "1" was written to its device/delete."""

    def __init__(self, runner: FakeRunner, volume_id: str, removable: bool = True):
        self.link = f"/dev/disk/by-path/ip-{PORTAL}-iscsi-{target_iqn(volume_id)}-lun-1"
        self.present = {self.link, "/sys/block/sdc"}
        self.removable = removable
        runner.respond(self._tee)

    def _tee(self, argv):
        if argv[:3] == ["tee", "-a", "/sys/block/sdc/device/delete"] and self.removable:
            self.present.clear()
        return None

    def connector(self, runner: FakeRunner, timeout: float = 0.0) -> KernelIscsiConnector:
        return KernelIscsiConnector(runner, device_timeout=timeout, exists=self.present.__contains__,
                                    resolve={self.link: "/dev/sdc"}.__getitem__)


def test_kernel_unstage_flushes_and_deletes_the_scsi_disk_then_logs_out(runner):
    """os-brick's disconnect_volume: flush the buffers, delete the SCSI device,
    wait until it is gone, then log out and delete the node record."""
    vid = new_id()
    host = StagedHost(runner, vid)
    host.connector(runner).unstage(vid, iscsi_info(vid, auth_password=""))
    iqn = target_iqn(vid)
    assert runner.argvs == [["blockdev", "--flushbufs", "/dev/sdc"],
                            ["tee", "-a", "/sys/block/sdc/device/delete"],
                            node_cmd(iqn, "--logout"), node_cmd(iqn, "--op", "delete")]
    assert runner.calls[1].input == "1"
    assert host.present == set()


def test_kernel_unstage_whose_flush_fails_keeps_the_session(runner):
    vid = new_id()
    host = StagedHost(runner, vid)
    runner.on("blockdev", returncode=1, stderr="blockdev: cannot flush /dev/sdc")
    with pytest.raises(CommandError, match="cannot flush"):
        host.connector(runner).unstage(vid, iscsi_info(vid))
    assert runner.argvs == [["blockdev", "--flushbufs", "/dev/sdc"]]
    assert "/sys/block/sdc" in host.present


def test_kernel_unstage_of_a_disk_the_kernel_keeps_does_not_log_out(runner):
    vid = new_id()
    host = StagedHost(runner, vid, removable=False)
    with pytest.raises(BackendError, match="was not removed"):
        host.connector(runner).unstage(vid, iscsi_info(vid))
    assert [argv[0] for argv in runner.argvs] == ["blockdev", "tee"]


def test_kernel_unstage_refuses_a_link_to_something_else(runner):
    vid = new_id()
    connector = KernelIscsiConnector(runner, device_timeout=0, exists=lambda p: True,
                                     resolve=lambda p: "/etc/passwd")
    with pytest.raises(BackendError, match="not a SCSI disk"):
        connector.unstage(vid, iscsi_info(vid))
    assert runner.calls == []


def test_kernel_unstage_without_a_disk_logs_out_and_deletes_the_node_record(runner):
    vid = new_id()
    kernel(runner, exists=lambda p: False).unstage(vid, iscsi_info(vid))
    iqn = target_iqn(vid)
    assert runner.argvs == [node_cmd(iqn, "--logout"), node_cmd(iqn, "--op", "delete")]


def test_kernel_unstage_of_unstaged_volume_is_ok():
    vid = new_id()
    runner = FakeRunner().on("iscsiadm", returncode=21, stderr="No matching sessions found")
    kernel(runner, exists=lambda p: False).unstage(vid, iscsi_info(vid))
    assert len(runner.calls) == 2


def test_kernel_disk_source_is_the_block_device(runner):
    vid = new_id()
    staged = kernel(runner).stage(vid, iscsi_info(vid))
    source = kernel(runner).disk_source(vid, iscsi_info(vid), staged)
    assert source == BlockSource(staged.device_path)
    with pytest.raises(FailedPrecondition, match="not staged"):
        kernel(runner, exists=lambda p: False).disk_source(vid, iscsi_info(vid), None)


@pytest.mark.parametrize("overrides, message", [
    (dict(target_portal="127.0.0.1:99999"), "target_portal"),
    (dict(target_portal="a b"), "target_portal"),
    (dict(target_iqn="not-an-iqn"), "target_iqn"),
    (dict(target_iqn="iqn.2010-10.org.openstack:x y"), "target_iqn"),
    (dict(auth_password=""), "CHAP needs"),
    (dict(auth_method="kerberos"), "not supported"),
    (dict(target_lun=-1), "target_lun"),
])
def test_bad_connection_info_is_invalid_argument_and_runs_nothing(runner, overrides, message):
    vid = new_id()
    with pytest.raises(InvalidArgument, match=message):
        kernel(runner).stage(vid, iscsi_info(vid, **overrides))
    assert runner.calls == []


def test_parse_portal():
    assert parse_portal("10.0.0.1:3261") == Portal("10.0.0.1", 3261)
    assert parse_portal("host.example") == Portal("host.example", 3260)
    assert str(parse_portal("[fe80::1]:3260")) == "[fe80::1]:3260"


# -- QEMU-native iSCSI -----------------------------------------------------------------

def test_qemu_stage_defines_private_secret_and_is_idempotent():
    hv = FakeHypervisor()
    connector = QemuIscsiConnector(hv, NODE_IQN)
    vid = new_id()
    first = connector.stage(vid, iscsi_info(vid))
    again = connector.stage(vid, iscsi_info(vid, auth_password="NewPassw0rd"))
    assert first == again and first.secret_usage == f"volume-{vid}" and first.device_path == ""
    # a volume's secret is never overwritten: a request cannot replace it with its own
    assert hv.secrets[f"volume-{vid}"].value == CHAP_PASSWORD.encode()
    assert "NewPassw0rd" not in repr(hv.secrets[f"volume-{vid}"])


def test_qemu_disk_source_and_unstage():
    hv = FakeHypervisor()
    connector = QemuIscsiConnector(hv, NODE_IQN)
    vid = new_id()
    staged = connector.stage(vid, iscsi_info(vid))
    source = connector.disk_source(vid, iscsi_info(vid), staged)
    assert source == IscsiSource(target_iqn=target_iqn(vid), lun=1, host="127.0.0.1", port=3260,
                                 initiator_iqn=NODE_IQN, auth_username=CHAP_USER,
                                 secret_usage=f"volume-{vid}")
    connector.unstage(vid, iscsi_info(vid))
    connector.unstage(vid, iscsi_info(vid))  # not staged: OK
    assert hv.secrets == {}
    # (a volume not staged: the attach of its disk finds no secret; test_node_manager)


def test_qemu_without_chap_needs_no_secret():
    hv = FakeHypervisor()
    vid = new_id()
    info = iscsi_info(vid, auth_method="", auth_username="", auth_password="")
    connector = QemuIscsiConnector(hv, NODE_IQN)
    assert connector.stage(vid, info).secret_usage == ""
    assert connector.disk_source(vid, info, None).secret_usage == ""
    assert hv.secrets == {}


# -- file ------------------------------------------------------------------------------

def test_file_stage_checks_the_path(tmp_path):
    vid = new_id()
    path = tmp_path / "volume.img"
    files = FileConnector([tmp_path])
    with pytest.raises(NotFound):
        files.stage(vid, file_info(path))
    path.write_bytes(b"x")
    staged = files.stage(vid, file_info(path))
    assert staged.device_path == str(path) and staged.driver_volume_type == "file"
    assert files.disk_source(vid, file_info(path), staged) == FileSource(str(path))
    files.unstage(vid, file_info(path))
    assert path.exists()


@pytest.mark.parametrize("path", ["", "relative.img", "/tmp/../etc/passwd"])
def test_file_bad_path_is_invalid_argument(path):
    with pytest.raises(InvalidArgument):
        FileConnector(["/tmp"]).stage(new_id(), file_info(path))


def test_file_outside_the_volume_directories_is_refused(tmp_path):
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    outside = tmp_path / "host-secret.img"
    outside.write_bytes(b"host data")
    files = FileConnector([volumes])
    for path in (outside, "/etc/passwd", "/etc/shadow", volumes):
        with pytest.raises(InvalidArgument, match="volume directory"):
            files.stage(new_id(), file_info(str(path)))
    with pytest.raises(InvalidArgument, match="volume directory"):
        FileConnector().stage(new_id(), file_info(str(outside)))  # no directory: nothing


def test_file_symlinks_devices_and_fifos_are_refused(tmp_path):
    volumes = tmp_path / "volumes"
    (volumes / "sub").mkdir(parents=True)
    outside = tmp_path / "host-secret.img"
    outside.write_bytes(b"host data")
    (volumes / "link.img").symlink_to(outside)
    (volumes / "dev.img").symlink_to("/dev/null")
    (volumes / "dirlink").symlink_to(tmp_path)
    os.mkfifo(volumes / "fifo.img")
    os.mknod(volumes / "null.img", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    files = FileConnector([volumes])
    for name in ("link.img", "dev.img", "dirlink/host-secret.img", "fifo.img", "null.img", "sub"):
        with pytest.raises(InvalidArgument, match="symlink|regular file") as err:
            files.stage(new_id(), file_info(str(volumes / name)))
        assert err.value.reason == "FILE_NOT_ALLOWED"
    (volumes / "sub" / "ok.img").write_bytes(b"x")
    assert files.stage(new_id(), file_info(str(volumes / "sub" / "ok.img"))).device_path


# -- factory ---------------------------------------------------------------------------

def test_factory_picks_connector_per_type():
    hv, runner = FakeHypervisor(), FakeRunner()
    assert isinstance(make_factory("qemu", hv, runner, NODE_IQN).get("iscsi"), QemuIscsiConnector)
    assert isinstance(make_factory("kernel", hv, runner, NODE_IQN).get("iscsi"),
                      KernelIscsiConnector)
    assert isinstance(make_factory("qemu", hv, runner, NODE_IQN).get("file"), FileConnector)
    with pytest.raises(InvalidArgument, match="not supported"):
        make_factory("qemu", hv, runner, NODE_IQN).get("rbd")
    with pytest.raises(InvalidArgument, match="iscsi_connector"):
        make_factory("fc", hv, runner, NODE_IQN)
