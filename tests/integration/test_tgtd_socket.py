"""The Controller's default way to drive tgtd (controller/tgtd_socket.py):
tgtadm's requests written to tgtd's control socket, no process per request.
On a real, private tgtd, every TgtAdm operation gives what it gives through
tgtadm commands: the same listing, the same answers, the same failures."""

from __future__ import annotations

import logging
import socket
import threading
import uuid

import pytest

from vmattach.common.config import load
from vmattach.common.errors import BackendError, InvalidArgument
from vmattach.common.runner import CommandError, CommandRunner
from vmattach.controller.tgt import TgtAdm
from vmattach.controller.tgtd_socket import TgtdSocketRunner

INITIATOR = "iqn.1993-08.org.debian:01:sockettest"


@pytest.fixture
def both(tgtd):
    """(tgtadm commands, the socket) on the test's tgtd."""
    commands = TgtAdm(CommandRunner(), tgtd.control_port)
    direct = TgtAdm(TgtdSocketRunner(CommandRunner()), tgtd.control_port)
    yield commands, direct
    commands.close()
    direct.close()


def backing(tmp_path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"\0" * (1 << 20))
    return str(path)


def iqn() -> str:
    return f"iqn.2010-10.org.openstack:volume-{uuid.uuid4()}"


def listing(tgt: TgtAdm) -> str:
    return tgt.runner.run(tgt._argv("--mode", "target", "--op", "show")).stdout


def test_a_target_made_through_the_socket_is_the_one_tgtadm_makes(both, tmp_path):
    commands, direct = both
    name = iqn()
    direct.create_target(1, name, backing(tmp_path, "a"), "user1", "secret-one-1", INITIATOR)
    made = commands.find(1)
    assert made is not None and made.iqn == name
    assert made.luns == {1: str(tmp_path / "a")}
    assert made.accounts == ["user1"] and made.acls == [INITIATOR]
    # the listing reads the same either way, line for line
    assert listing(direct) == listing(commands)
    with direct.targets() as targets:
        assert [t.tid for t in targets] == [1]
    assert direct.has_target(1) and not direct.has_target(2)
    assert direct.has_lun(1)


def test_repeats_and_removals_answer_as_through_tgtadm(both, tmp_path):
    commands, direct = both
    direct.create_target(3, iqn(), backing(tmp_path, "b"), "user3", "secret-three", INITIATOR)
    assert direct.ensure_account("user3", "secret-three") is False  # "already exists": kept
    direct.allow(3, INITIATOR)  # already allowed: fine
    direct.allow(3, "iqn.1993-08.org.debian:01:other")
    direct.disallow(3, "iqn.1993-08.org.debian:01:other")
    assert commands.find(3).acls == [INITIATOR]
    direct.reload_lun(3, str(tmp_path / "b"))
    assert commands.has_lun(3)
    direct.delete_target(3, "user3")
    assert not commands.has_target(3)
    direct.delete_target(3, "user3")  # gone already: fine
    assert "user3" not in listing(commands)


@pytest.mark.parametrize("args", [
    ("--mode", "target", "--op", "show", "--tid", "77"),
    ("--mode", "target", "--op", "delete", "--force", "--tid", "77"),
    ("--mode", "logicalunit", "--op", "delete", "--tid", "77", "--lun", "1"),
    ("--mode", "account", "--op", "delete", "--user", "nobody"),
    ("--mode", "account", "--op", "bind", "--tid", "77", "--user", "nobody"),
    ("--mode", "target", "--op", "unbind", "--tid", "5", "--initiator-name", INITIATOR),
    ("--mode", "target", "--op", "new", "--tid", "5", "--targetname", "taken"),
    ("--mode", "logicalunit", "--op", "new", "--tid", "5", "--lun", "1", "--backing-store", "B"),
    ("--mode", "account", "--op", "new", "--user", "user5", "--password", "secret-five"),
])
def test_a_refused_request_fails_as_tgtadm_does(both, tmp_path, args):
    commands, direct = both
    commands.create_target(5, "taken", backing(tmp_path, "B"), "user5", "secret-five")
    args = tuple(str(tmp_path / "B") if a == "B" else a for a in args)
    by_command = commands.runner.run(commands._argv(*args), check=False)
    by_socket = direct.runner.run(direct._argv(*args), check=False)
    assert by_command.returncode != 0
    assert (by_socket.returncode, by_socket.stdout, by_socket.stderr) == \
        (by_command.returncode, by_command.stdout, by_command.stderr)


def test_a_long_listing_comes_a_line_at_a_time(both, tmp_path):
    commands, direct = both
    path = backing(tmp_path, "many")
    for tid in range(1, 61):
        direct.create_target(tid, iqn(), path, f"user{tid}", f"secret-{tid}")
    with direct.runner.lines(direct._argv("--mode", "target", "--op", "show")) as lines:
        got = list(lines)
    assert got == listing(commands).splitlines()
    assert len(got) > 60 * 20
    with direct.targets() as targets:  # leaving early is fine
        assert next(targets).tid == 1
    with pytest.raises(CommandError, match="can't find the target"):
        with direct.runner.lines(direct._argv("--mode", "target", "--op", "show", "--tid", "99")):
            pass


def test_values_tgtd_would_misread_are_refused_before_sending(both):
    _, direct = both
    for bad in ("user,password=x", "user\0x"):
        with pytest.raises(BackendError, match="--user may not hold"):
            direct.ensure_account(bad, "secret-x")
    for args in (("--tid", "x"), ("--tid", str(2**31)), ("--lun", "-1")):
        with pytest.raises(BackendError, match="unsupported tgtadm command"):
            direct.runner.run(direct._argv("--mode", "logicalunit", "--op", "delete", *args))
    with pytest.raises(BackendError, match="unsupported tgtadm argument '--name'"):
        direct.runner.run(direct._argv("--mode", "target", "--op", "update", "--tid", "1",
                                       "--name", "x", "--value", "y"))


def test_the_password_is_never_shown(both, caplog):
    _, direct = both
    caplog.set_level(logging.DEBUG, logger="vmattach")
    direct.ensure_account("userpw", "do-not-show-me")
    with pytest.raises(CommandError) as failed:
        direct.runner.run(direct._argv("--mode", "account", "--op", "new", "--user", "userpw",
                                       "--password", "do-not-show-me"), secrets=["do-not-show-me"])
    assert "already exists" in str(failed.value)
    assert "do-not-show-me" not in str(failed.value) + caplog.text
    assert "--password ***" in caplog.text


def test_no_tgtd_there_is_a_clear_backend_error(tmp_path):
    direct = TgtAdm(TgtdSocketRunner(CommandRunner(), socket_dir=str(tmp_path)), 4321)
    with pytest.raises(BackendError, match=f"cannot reach tgtd at {tmp_path}/socket.4321"):
        direct.ping()


def test_a_silent_tgtd_times_out(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(tmp_path / "socket.4321"))
        silent.listen()
        held: list[socket.socket] = []
        threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
        direct = TgtAdm(TgtdSocketRunner(CommandRunner(timeout=0.3), socket_dir=str(tmp_path)),
                        4321)
        with pytest.raises(BackendError) as failed:
            direct.ping()
        assert failed.value.reason == "COMMAND_TIMEOUT"
        for conn in held:
            conn.close()


def test_other_commands_run_as_commands():
    runner = TgtdSocketRunner(CommandRunner())
    assert runner.run(["sh", "-c", "echo hi"]).stdout == "hi\n"
    with runner.lines(["printf", "a\\nb\\n"]) as lines:
        assert list(lines) == ["a", "b"]


def test_the_setting_takes_socket_or_tgtadm():
    assert load(None, environ={}).tgt_control == "socket"
    assert load(None, environ={"VMATTACH_TGT_CONTROL": "tgtadm"}).tgt_control == "tgtadm"
    with pytest.raises(InvalidArgument, match="setting tgt_control: 'pipe' is not one of"):
        load(None, environ={"VMATTACH_TGT_CONTROL": "pipe"})


def test_a_target_whose_lun_is_refused_leaves_nothing_on_tgtd(both, tmp_path):
    """A refused LUN removes the target and the account the call made, and
    the same target made again afterwards is whole."""
    commands, direct = both
    with pytest.raises(CommandError, match="logicalunit"):
        direct.create_target(7, iqn(), str(tmp_path / "missing"), "user7", "secret-seven",
                             INITIATOR)
    assert commands.find(7) is None
    accounts = commands.runner.run(commands._argv("--mode", "account", "--op", "show")).stdout
    assert "user7" not in accounts
    direct.create_target(7, iqn(), backing(tmp_path, "c"), "user7", "secret-seven", INITIATOR)
    made = commands.find(7)
    assert made is not None and made.accounts == ["user7"] and made.acls == [INITIATOR]
