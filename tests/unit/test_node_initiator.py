"""The node's initiator IQN: system file, configuration, or generated once."""

from __future__ import annotations

import re
import threading

from tests.conftest import make_settings
from vmattach.node.app import node_config
from vmattach.node.initiator import STATE_FILE_NAME, initiator_iqn, read_initiator_file

GENERATED = re.compile(r"^iqn\.2004-10\.org\.vmattach:[a-z0-9.-]+-[0-9a-f]{12}$")


def test_system_file_wins(tmp_path):
    system = tmp_path / "initiatorname.iscsi"
    system.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abcdef\n")
    assert initiator_iqn(tmp_path / "state", "iqn.2000-01.x:configured", system) == \
        "iqn.1993-08.org.debian:01:abcdef"


def test_configured_when_no_system_file(tmp_path):
    assert initiator_iqn(tmp_path, "iqn.2000-01.x:configured", tmp_path / "absent") == \
        "iqn.2000-01.x:configured"
    assert not (tmp_path / STATE_FILE_NAME).exists()


def test_generated_once_and_kept_across_restarts(tmp_path):
    state = tmp_path / "state"
    first = initiator_iqn(state, "", tmp_path / "absent")
    assert GENERATED.match(first)
    assert initiator_iqn(state, "", tmp_path / "absent") == first  # a restarted node
    assert (state / STATE_FILE_NAME).read_text().strip() == first


def test_concurrent_generation_agrees(tmp_path):
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(initiator_iqn(tmp_path, "", tmp_path / "absent"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and GENERATED.match(results[0])
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE_NAME]  # no temporary left


def test_read_initiator_file_without_name(tmp_path):
    path = tmp_path / "f"
    path.write_text("# nothing\n")
    assert read_initiator_file(path) == ""


def test_restarted_node_reports_the_same_initiator(tmp_path):
    settings = make_settings(tmp_path)
    assert node_config(settings).initiator_iqn == node_config(settings).initiator_iqn
