"""The `vmattach` command as a user runs it (a child process, its output
read back): output formats and columns, names or ids, exit codes, the
progress of a long attach on a terminal and none when piped, completion.
Against all three services in this process on a real tgtd, with the fake
hypervisor at the outermost boundary."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.clients.client import VmattachClient
from vmattach.common import turns
from vmattach.v1 import controller_pb2

VMATTACH = str(Path(sys.executable).with_name("vmattach"))
DEAD_ADDRESS = "127.0.0.1:1"
TIMEOUT = 60


class Stack:
    def __init__(self, tmp_path, tgtd, serve):
        self.hv = FakeHypervisor()
        settings = make_settings(tmp_path, tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
                                 node_id="node-1", initiator_iqn="iqn.2004-10.org.vmattach:cli-node",
                                 reconcile_interval=3600)
        self.running = serve(settings, hypervisor=self.hv)
        self.address = f"127.0.0.1:{self.running.port}"
        self.client = VmattachClient(self.address, timeout=TIMEOUT)
        self.env = {**os.environ, "VMATTACH_ADDRESS": self.address, "COLUMNS": "80"}
        self.facade = next(s.servicer.f for s in self.running.services if hasattr(s.servicer, "f"))

    def server(self, name: str) -> str:
        """A new domain, known to the facade at once (as after its periodic refresh)."""
        server_id = self.hv.add_domain(name).uuid
        self.facade.nodes.refresh()
        return server_id

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([VMATTACH, *args], capture_output=True, text=True, timeout=TIMEOUT,
                              env={**self.env, **(env or {})})

    def ok(self, *args: str) -> str:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        return proc.stdout


@pytest.fixture
def stack(tmp_path, tgtd, serve):
    s = Stack(tmp_path, tgtd, serve)
    yield s
    s.client.close()


def on_terminal(stack: Stack, *args: str, columns: int = 80) -> tuple[int, str, str]:
    """Run the CLI with stdout piped and stderr on a terminal (a pty)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([VMATTACH, *args], stdout=subprocess.PIPE, stderr=slave, text=True,
                            env={**stack.env, "COLUMNS": str(columns)})
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=TIMEOUT)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


# -- formats and columns --------------------------------------------------------------------


def test_volume_list_in_every_format(stack):
    a = stack.client.create_volume("alpha", 1).volume_id
    stack.client.create_volume("beta", 2, multiattach=True)

    rows = json.loads(stack.ok("volume", "list", "-f", "json"))
    assert [list(r) for r in rows] == [["volume_id", "name", "size_gb", "status", "attach_status",
                                        "multiattach"]] * 2
    assert rows[0] == {"volume_id": a, "name": "alpha", "size_gb": 1, "status": "available",
                       "attach_status": "detached", "multiattach": False}
    assert rows[1]["multiattach"] is True

    assert yaml.safe_load(stack.ok("volume", "list", "-f", "yaml")) == rows

    assert stack.ok("volume", "list", "-f", "value", "-c", "name", "-c", "multiattach") == \
        "alpha false\nbeta true\n"

    parsed = list(csv.reader(io.StringIO(stack.ok("volume", "list", "-f", "csv", "-c", "name",
                                                  "-c", "size_gb"))))
    assert parsed == [["name", "size_gb"], ["alpha", "1"], ["beta", "2"]]

    table = stack.ok("volume", "list").splitlines()
    assert table[0].startswith("+-") and table[1].startswith("| volume_id ")
    assert [c.strip() for c in table[3].strip("|").split("|")][1:] == \
        ["alpha", "1", "available", "detached", "false"]


def test_show_prints_every_field_in_the_contracts_order_whatever_the_values(stack):
    vol = stack.client.create_volume("data1", 1).volume_id
    server = stack.server("web")
    before = json.loads(stack.ok("volume", "show", "data1", "-f", "json"))
    stack.ok("volume", "attach", "web", "data1", "-f", "json")
    after = json.loads(stack.ok("volume", "show", vol, "-f", "json"))
    fields = [f.name for f in controller_pb2.Volume.DESCRIPTOR.fields]  # the .proto's order
    assert fields[:7] == ["volume_id", "name", "size_gb", "status", "attach_status", "multiattach",
                          "attachments"]
    assert list(before) == list(after) == fields
    assert (before["status"], after["status"]) == ("available", "in-use")
    [att] = after["attachments"]
    assert (att["server_id"], att["attach_status"], att["attach_mode"]) == (server, "attached", "rw")

    table = stack.ok("volume", "show", "data1").splitlines()
    names = [line.split("|")[1].strip() for line in table if line.startswith("| ")]
    assert [n for n in names if n][1:] == fields
    assert stack.ok("volume", "show", "data1", "-f", "value", "-c", "status", "-c", "multiattach") == \
        "in-use\nfalse\n"
    assert yaml.safe_load(stack.ok("volume", "show", "data1", "-f", "yaml", "-c", "name")) == {"name": "data1"}


def test_options_work_before_and_after_the_command(stack):
    stack.client.create_volume("alpha", 1)
    after = json.loads(stack.ok("volume", "list", "--json"))
    before = json.loads(stack.ok("--json", "volume", "list"))
    assert after == before and after[0]["name"] == "alpha"
    # the address given after the command wins over the environment
    proc = stack.run("volume", "list", "-f", "value", "-c", "name", "--address", stack.address,
                     env={"VMATTACH_ADDRESS": DEAD_ADDRESS})
    assert (proc.returncode, proc.stdout) == (0, "alpha\n"), proc.stderr


def test_tables_fit_the_terminal_or_max_width(stack):
    server = stack.server("web")
    for i in range(3):
        stack.client.attach_volume(server, stack.client.create_volume(f"v{i}", 1).volume_id,
                                   tag=f"tag-{i}")
    wide = stack.ok("attachment", "list", "web", "-c", "attachment_id", "-c", "server_id",
                    "-c", "volume_id", "-c", "device", "-c", "guest_path_hint")
    assert max(len(line) for line in wide.splitlines()) > 140  # piped: nothing cut or wrapped
    narrow = stack.ok("attachment", "list", "web", "--max-width", "80", "-c", "attachment_id",
                      "-c", "server_id", "-c", "volume_id", "-c", "device", "-c", "guest_path_hint")
    assert max(len(line) for line in narrow.splitlines()) <= 80
    # every character is still there, wrapped inside its column
    assert "".join(narrow.split()).count("/dev/vd") == 3


# -- names or ids ---------------------------------------------------------------------------


def test_volumes_and_servers_by_name_or_id(stack):
    vol = stack.client.create_volume("data1", 1).volume_id
    server = stack.server("web")
    assert stack.ok("volume", "show", "data1", "-f", "value", "-c", "volume_id") == vol + "\n"
    assert stack.ok("volume", "show", vol, "-f", "value", "-c", "name") == "data1\n"
    assert stack.ok("server", "show", "web", "-f", "value", "-c", "server_id") == server + "\n"
    att = json.loads(stack.ok("volume", "attach", "web", "data1", "-f", "json"))
    assert (att["server_id"], att["volume_id"], att["state"]) == (server, vol, "attached")
    assert stack.ok("attachment", "show", server, "data1", "-f", "value", "-c", "device") == "/dev/vdb\n"
    stack.ok("volume", "detach", "web", "data1")
    stack.ok("volume", "delete", "data1")
    assert list(stack.client.list_volumes()) == []


def test_an_ambiguous_name_is_an_error_that_lists_the_matches(stack):
    first = stack.server("twin")
    second = stack.server("twin")
    proc = stack.run("server", "show", "twin")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "More than one server exists with the name 'twin'" in proc.stderr
    assert first in proc.stderr and second in proc.stderr


def test_a_missing_name_is_an_error(stack):
    proc = stack.run("volume", "show", "nope")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "No volume with a name or ID of 'nope' exists." in proc.stderr


# -- exit codes -----------------------------------------------------------------------------


def test_exit_codes(stack):
    vol = stack.client.create_volume("data1", 1).volume_id
    server = stack.server("web")

    refused = stack.run("volume", "detach", server, vol)
    assert refused.returncode == 1
    assert f"Instance {server} is not attached to volume {vol}" in refused.stderr
    assert "ATTACHMENT_NOT_FOUND" in refused.stderr

    usage = stack.run("volume", "list", "--no-such-option")
    assert usage.returncode == 2 and "usage: vmattach" in usage.stderr
    column = stack.run("volume", "list", "-c", "colour")
    assert column.returncode == 2 and "no column 'colour'" in column.stderr
    assert "volume_id, name, size_gb" in column.stderr
    assert stack.run("volume", "list", "-f", "xml").returncode == 2


def test_an_unreachable_address_says_which_and_how_to_set_another(stack):
    proc = stack.run("volume", "list", env={"VMATTACH_ADDRESS": DEAD_ADDRESS}, )
    assert proc.returncode == 3 and proc.stdout == ""
    assert f"could not reach vmattach at {DEAD_ADDRESS}" in proc.stderr
    assert "--address" in proc.stderr and "VMATTACH_ADDRESS" in proc.stderr


def test_without_a_connect_wait_an_unreachable_address_fails_at_once(stack):
    started = time.monotonic()
    proc = stack.run("volume", "list", env={"VMATTACH_ADDRESS": DEAD_ADDRESS,
                                            "VMATTACH_CONNECT_TIMEOUT": "0"})
    assert proc.returncode == 3
    assert f"could not reach vmattach at {DEAD_ADDRESS}" in proc.stderr
    assert time.monotonic() - started < 8  # not the default 10 s wait
    ok = stack.run("--connect-timeout", "0", "volume", "list")  # a live server: no wait needed
    assert ok.returncode == 0, ok.stderr
    bad = stack.run("volume", "list", env={"VMATTACH_CONNECT_TIMEOUT": "soon"})
    assert bad.returncode == 2 and "invalid float value: 'soon'" in bad.stderr


def test_an_audit_that_reaches_nothing_names_its_own_address_not_the_clis(tmp_path):
    proc = subprocess.run([VMATTACH, "audit", "--state-dir", str(tmp_path), "--listen", DEAD_ADDRESS],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "VMATTACH_ADDRESS": "127.0.0.1:2"})
    assert proc.returncode == 3 and proc.stdout == ""
    assert DEAD_ADDRESS in proc.stderr and "127.0.0.1:2" not in proc.stderr
    assert "VMATTACH_ADDRESS" not in proc.stderr  # the audit does not use it


def test_version():
    proc = subprocess.run([VMATTACH, "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0
    from importlib.metadata import version
    assert proc.stdout == f"vmattach {version('vmattach')}\n"


# -- progress -------------------------------------------------------------------------------


def slow_attach_disk(hv: FakeHypervisor, seconds: float) -> None:
    real = hv.attach_disk

    def attach_disk(*args, **kw):
        with turns.outside():  # a wait on libvirtd, as the real hypervisor's (common/turns.py)
            time.sleep(seconds)
        return real(*args, **kw)
    hv.attach_disk = attach_disk  # type: ignore[method-assign]


def test_a_long_attach_shows_its_step_on_a_terminal(stack):
    stack.client.create_volume("data1", 1)
    stack.server("web")
    slow_attach_disk(stack.hv, 2.5)
    code, out, terminal = on_terminal(stack, "volume", "attach", "web", "data1", "-f", "json")
    assert code == 0, terminal
    assert json.loads(out)["state"] == "attached"
    # (an attach records no step between the row's insert and its end)
    assert "attaching data1 to web: attaching (bdm_insert)" in terminal
    assert terminal.endswith("\r\x1b[K")  # the line is cleared at the end


def test_no_progress_when_not_a_terminal(stack):
    stack.client.create_volume("data1", 1)
    stack.server("web")
    slow_attach_disk(stack.hv, 1.5)
    proc = stack.run("volume", "attach", "web", "data1", "-f", "json")
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(proc.stdout)["state"] == "attached"
    proc = stack.run("volume", "detach", "web", "data1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


# -- completion -----------------------------------------------------------------------------


def bash_complete(*words: str) -> list[str]:
    script = subprocess.run([VMATTACH, "completion", "bash"], capture_output=True, text=True,
                            check=True, timeout=TIMEOUT).stdout
    line = " ".join(words)
    probe = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1};"
             " _vmattach; printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True,
                         timeout=TIMEOUT).stdout
    return sorted(out.split())


def test_bash_completion_from_the_parser():
    assert bash_complete("vmattach", "vo") == ["volume"]
    assert bash_complete("vmattach", "volume", "") == ["attach", "create", "delete", "detach",
                                                        "extend", "list", "show"]
    options = bash_complete("vmattach", "volume", "list", "--")
    assert {"--format", "--column", "--address", "--max-width"} <= set(options)
    assert bash_complete("vmattach", "volume", "list", "-f", "") == ["csv", "json", "table", "value",
                                                                      "yaml"]
    assert bash_complete("vmattach", "completion", "") == ["bash", "zsh"]


def zsh_complete(*words: str) -> list[str]:
    """Run the zsh completion function with compadd recording what it offers."""
    script = subprocess.run([VMATTACH, "completion", "zsh"], capture_output=True, text=True,
                            check=True, timeout=TIMEOUT).stdout
    assert script.startswith("#compdef vmattach\n")
    quoted = " ".join(f"'{w}'" for w in words)
    probe = (f"{script}\ncompadd() {{ [[ $1 == -- ]] && shift; print -l -- \"$@\"; }}\n"
             f"words=({quoted}); CURRENT={len(words)}; _vmattach")
    proc = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return sorted(proc.stdout.split())


def test_zsh_completion_from_the_parser():
    if shutil.which("zsh") is None:
        pytest.fail("zsh is missing: scripts/setup-host.sh installs it")
    # zsh itself keeps the candidates that match what is typed
    assert {"volume", "server", "attachment", "completion"} <= set(zsh_complete("vmattach", "att"))
    assert zsh_complete("vmattach", "server", "") == ["list", "show"]
    assert {"--format", "--column", "--address"} <= set(zsh_complete("vmattach", "server", "list", "-"))
    assert zsh_complete("vmattach", "server", "list", "-f", "") == ["csv", "json", "table", "value",
                                                                     "yaml"]
