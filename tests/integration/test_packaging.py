"""The package as a user gets it: a wheel built from a copy of the
repository's tracked files (as a fresh clone has them, with no gen/), with
only vmattach/ and its dist-info inside, installed into a new virtual
environment whose `vmattach` command answers --help and serves.

No download: the wheel is built with --no-build-isolation (the project's
venv has the build requirements) and installed with --no-deps; the new
venv sees the project venv's dependencies through a .pth line, which adds
that directory to sys.path without running its .pth files, so the project's
own editable install is not visible there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.vmattach_process import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _tracked_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    work = tmp_path_factory.mktemp("packaging")
    source = _tracked_copy(work / "src")
    assert not (source / "gen").exists()
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(work / "dist"), str(source)], check=True, timeout=600)
    [built] = (work / "dist").glob("vmattach-*.whl")
    return built


def test_the_wheel_holds_only_the_vmattach_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith("vmattach/")
               and not (n.split("/")[0].startswith("vmattach-") and ".dist-info/" in n)]
    assert outside == []
    tops = {n.split("/")[1] for n in names if n.startswith("vmattach/") and n.count("/") > 1}
    assert tops == {"common", "controller", "node", "server", "clients", "deploy", "v1"}
    # the service files travel as package data
    assert {"vmattach/deploy/vmattach.toml", "vmattach/deploy/systemd/vmattach.service",
            "vmattach/deploy/systemd/vmattach-node.service"} <= set(names)
    # the generated code is built by the package build, and tests are not shipped
    assert "vmattach/v1/servers_pb2.py" in names and "vmattach/v1/servers_pb2_grpc.py" in names
    assert not [n for n in names if "/tests/" in n or "fake" in n]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([PY, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def test_the_installed_package_is_the_wheels(installed):
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import vmattach.clients.cli as m, vmattach.v1.servers_pb2; print(m.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed))


def test_the_installed_command_answers_help(installed):
    out = subprocess.run([str(installed / "bin" / "vmattach"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "volume" in out.stdout


def test_the_installed_command_serves(installed, tmp_path):
    proc = ServeProcess(["--services", "servers", "--listen", "127.0.0.1:0",
                         "--state-dir", str(tmp_path / "state"), "--log-level", "WARNING",
                         "--controller-address", "127.0.0.1:9", "--nodes", "127.0.0.1:9"],
                        tmp_path / "serve.log", command=[str(installed / "bin" / "vmattach"), "serve"])
    try:
        assert proc.address, proc.first_line
        with grpc.insecure_channel(proc.address) as ch:
            answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.stop()
