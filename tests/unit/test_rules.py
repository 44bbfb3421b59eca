"""The rules written once (common/rules.py, common/pagetoken.py): device
names, iSCSI names, page tokens, quoting inputs."""

from __future__ import annotations

import ast
import datetime
import re
from pathlib import Path

import pytest

from vmattach.common import pagetoken
from vmattach.common.errors import InvalidArgument
from vmattach.common.rules import (
    MAX_ISCSI_NAME,
    check_iqn_prefix,
    disk_device,
    is_iscsi_name,
    prefix,
    quote,
)
from vmattach.node.hypervisor import BUS_BY_PREFIX
from vmattach.node.manager import parse_device
from vmattach.server.devices import pick_device

ROOT = Path(__file__).resolve().parents[2]
CODE = [p for d in ("common", "controller", "node", "server", "clients")
        for p in (ROOT / d).rglob("*.py") if "node/node_modules" not in str(p)]


# -- device names ---------------------------------------------------------------------

@pytest.mark.parametrize("device", ["/dev/vdb1", "/dev/sdb0", "/dev/vd", "/dev/xvdb", "/dev/vdb/",
                                    "/dev/" + "v" * 100_000, "/dev/vdb\x00", "/dev/VDB"])
def test_the_node_refuses_what_the_facade_never_hands_out(device):
    with pytest.raises(InvalidArgument, match=r"The supplied device path \(.*\) is invalid\.") as err:
        parse_device(device)
    assert err.value.field == "device"
    assert len(err.value.message) < 200


class _Server:
    def __init__(self, prefix):
        self.device_prefix, self.root_device, self.disks, self.server_id = prefix, "", "[]", "s"


@pytest.mark.parametrize("device", ["/dev/vdb", "/dev/vdaa", "/dev/sdc", "/dev/hdb", "/dev/vdzz"])
def test_every_name_the_facade_accepts_the_node_accepts(device):
    server = _Server(device[5:7])
    chosen = pick_device(device, server, [])
    assert parse_device(chosen)[0] == chosen.removeprefix("/dev/")


def test_every_name_the_facade_picks_the_node_accepts():
    for bus_prefix in BUS_BY_PREFIX:
        server = _Server(bus_prefix)
        live: list[str] = []
        for _ in range(40):
            live.append(pick_device("", server, live))
            assert disk_device(live[-1], BUS_BY_PREFIX)[1] == bus_prefix


@pytest.mark.parametrize("device", ["/dev/vdb1", "/dev/vd1", "/dev/" + "vd" + "b" * 40])
def test_the_facade_refuses_partitions_and_long_names(device):
    with pytest.raises(InvalidArgument, match="is invalid"):
        pick_device(device, _Server("vd"), [])


# -- iSCSI names ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["iqn.1993-08.org.debian:01:abc", "iqn.2004-10.org.vmattach:node-a",
                                  "iqn.2000-01.x:n", "iqn.2010-10.org.openstack:volume-" + "a" * 36,
                                  "eui.02004567A425678D", "naa.52004567BA64678D",
                                  "naa.52004567BA64678D52004567BA64678D",
                                  "iqn.2001-04.com.example", "iqn.2001-04.com.example:storage.disk2.sys1.xyz"])
def test_iscsi_names_of_rfc_3720(name):
    assert is_iscsi_name(name)


@pytest.mark.parametrize("name", ["", "iqn.", "iqn.x", "iqn.1993-13.org.debian:01:a", "iqn.1993-08.org.debian:01:x\n",
                                  "iqn.1993-08.org.debian:01:a\x00b", "iqn.1993-08.org.debian:01:a b",
                                  "iqn.1993-08.org.debian:01:a/b", "iqn.1993-08.Org.debian:01:a",
                                  "iqn.1993-08.org.debian:01:" + "a" * MAX_ISCSI_NAME,
                                  "iqn.1993-08.org.debian:01:" + "a" * (128 * 1024),
                                  "eui.02004567A425678", "naa.52004567BA64678D5", "iqn.1993-08.-org:a"])
def test_not_iscsi_names(name):
    assert not is_iscsi_name(name)


def test_223_bytes_counted_in_utf8():
    base = "iqn.1993-08.org.debian:"
    assert is_iscsi_name(base + "a" * (MAX_ISCSI_NAME - len(base)))
    assert not is_iscsi_name(base + "\u00e9" * (MAX_ISCSI_NAME - len(base)))


@pytest.mark.parametrize("value, ok", [("iqn.2010-10.org.openstack:volume-", True),
                                       ("iqn.2004-10.org.vmattach:", True),
                                       ("iqn.2010-10.org.openstack:" + "x" * 200, False),
                                       ("eui.0123", False), ("iqn.2010-10.org.openstack:vol ume-", False)])
def test_iqn_prefix(value, ok):
    if ok:
        assert check_iqn_prefix(value) == value
    else:
        with pytest.raises(InvalidArgument, match="iqn_prefix"):
            check_iqn_prefix(value)


# -- page tokens ----------------------------------------------------------------------

def test_a_page_token_round_trips():
    stamp = datetime.datetime(2026, 1, 2, 3, 4, 5, 6)
    vid = "0f2b6c1e-3f0a-4d0c-9a57-5b0e2b1c9d11"
    assert pagetoken.decode(pagetoken.encode("volumes", stamp, vid), "volumes",
                            pagetoken.timestamp, pagetoken.uuid_key) == (stamp, vid)
    assert pagetoken.decode(pagetoken.encode("attachments", 42), "attachments",
                            pagetoken.row_id) == (42,)


@pytest.mark.parametrize("token", ["\u00b2", "9" * 40, "bogus", "p1.", "p1.!!", "=" * 7, "\u2603" * 100,
                                   "p1." + "A" * 300,
                                   pagetoken.encode("volumes", 1),              # another list's token
                                   pagetoken.encode("attachments", 10 ** 40),   # out of range
                                   pagetoken.encode("attachments", -1),
                                   pagetoken.encode("attachments", True),
                                   pagetoken.encode("attachments", "12"),
                                   pagetoken.encode("attachments", 1, 2),
                                   "p1.W10", "p1.bnVsbA"])
def test_a_bad_page_token_is_invalid_argument_naming_page_token(token):
    with pytest.raises(InvalidArgument) as err:
        pagetoken.decode(token, "attachments", pagetoken.row_id)
    assert err.value.field == "page_token" and "page_token" in err.value.message
    assert token[:20] not in err.value.message or len(token) < 4


# -- quoting --------------------------------------------------------------------------

def test_quote_and_prefix_are_bounded():
    big = "x" * 5000
    assert len(quote(big)) < 120 and "5000 characters" in quote(big)
    assert quote("ab") == "'ab'"
    assert len(prefix(big)) < 120 and prefix(big).endswith("(5000 characters)")
    assert prefix("a\x00b") == "a\\x00b"


# -- one definition of each rule --------------------------------------------------------

def _sources():
    for path in CODE:
        yield path, path.read_text()


def test_each_rule_is_written_once():
    """The device grammar, the IQN grammar and the per-server limit are in
    common/rules.py only; page tokens are made in common/pagetoken.py only."""
    for path, text in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("common/rules.py", "common/pagetoken.py"):
            continue
        assert "x?[a-z]?d?" not in text, rel
        assert not re.search(r"iqn\\\\?\.\\\\?d\{4\}", text), rel
        assert "urlsafe_b64" not in text or rel == "common/secretbox.py", rel
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == 26 and not isinstance(node.value, bool):
                pytest.fail(f"{rel}:{node.lineno}: the per-server limit is MAX_VOLUMES_PER_SERVER")
