"""This host's iSCSI initiator name: /etc/iscsi/initiatorname.iscsi when it
exists, else the configured one, else one generated once and kept in the
state directory (so it never changes between restarts)."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path

LOG = logging.getLogger(__name__)

SYSTEM_INITIATOR_FILE = Path("/etc/iscsi/initiatorname.iscsi")
STATE_FILE_NAME = "initiator-iqn"
IQN_PREFIX = "iqn.2004-10.org.vmattach:"


def read_initiator_file(path: Path) -> str:
    """The InitiatorName=... of an open-iscsi initiatorname file ("" if none)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return ""
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "InitiatorName" and value.strip():
            return value.strip()
    return ""


def generated_iqn(hostname: str | None = None) -> str:
    host = re.sub(r"[^a-z0-9.-]", "-", (hostname or socket.gethostname()).lower()).strip("-.")
    return f"{IQN_PREFIX}{host or 'node'}-{secrets.token_hex(6)}"


def _persist_once(path: Path, value: str) -> str:
    """Write value to path unless it exists; the value path holds afterwards.
    Race-safe: the content is complete before the name appears (link(2) of a
    temporary file fails when another process won)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            LOG.info("generated initiator name %s (kept in %s)", value, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


def initiator_iqn(state_dir: str | os.PathLike, configured: str = "",
                  system_file: Path = SYSTEM_INITIATOR_FILE) -> str:
    """The initiator IQN of this host (see the module docstring for the order)."""
    from_system = read_initiator_file(system_file)
    if from_system:
        return from_system
    if configured:
        return configured
    state_file = Path(state_dir) / STATE_FILE_NAME
    existing = state_file.read_text().strip() if state_file.exists() else ""
    return existing or _persist_once(state_file, generated_iqn())
