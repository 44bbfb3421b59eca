"""The kernel iSCSI connector through the real CommandRunner: a stand-in
iscsiadm on PATH (an external command, hence here and not in tests/unit)
shows what the real runner logs and answers, with the CHAP password masked."""

from __future__ import annotations

import logging
import os

import pytest

from tests.support.node_helpers import CHAP_PASSWORD, iscsi_info, new_id
from tests.unit.test_node_connectors import kernel
from vmattach.common.runner import CommandError, CommandRunner

# The real runner (common/runner.py) in front of a stand-in iscsiadm on PATH
# that records its arguments: what the real runner logs and raises is masked.
STUB_ISCSIADM = r"""#!/bin/sh
printf '%s\n' "$*" >> "$STUB_ISCSIADM_LOG"
case "$*" in
  *"-m session"*) echo "iscsiadm: No active sessions." >&2; exit 21 ;;
  *node.session.auth.password*)
    if [ -n "$STUB_ISCSIADM_REJECT" ]; then echo "iscsiadm: rejected: $*" >&2; exit 7; fi ;;
esac
exit 0
"""


@pytest.fixture
def stub_iscsiadm(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "iscsiadm"
    script.write_text(STUB_ISCSIADM)
    script.chmod(0o700)
    log = tmp_path / "iscsiadm.log"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_ISCSIADM_LOG", str(log))
    return log


def test_real_runner_logs_the_password_update_masked(stub_iscsiadm, caplog):
    vid = new_id()
    with caplog.at_level(logging.DEBUG, logger="vmattach.common.runner"):
        kernel(CommandRunner()).stage(vid, iscsi_info(vid))
    # iscsiadm did get the password; the real runner's log line did not
    assert f"-n node.session.auth.password -v {CHAP_PASSWORD}" in stub_iscsiadm.read_text()
    lines = [r.getMessage() for r in caplog.records if r.name == "vmattach.common.runner"]
    assert any(line.endswith("node.session.auth.password -v ***") for line in lines), lines
    assert CHAP_PASSWORD not in caplog.text


def test_real_runner_failure_masks_the_password_it_echoes(stub_iscsiadm, monkeypatch, caplog):
    monkeypatch.setenv("STUB_ISCSIADM_REJECT", "1")
    vid = new_id()
    with caplog.at_level(logging.DEBUG), pytest.raises(CommandError) as err:
        kernel(CommandRunner()).stage(vid, iscsi_info(vid))
    assert "rc 7" in err.value.message and "rejected:" in err.value.message
    assert CHAP_PASSWORD not in err.value.message and "-v ***" in err.value.message
    assert CHAP_PASSWORD not in caplog.text
