"""Device names as the facade hands them out: Nova's check of a requested
name, Nova's order for the next free one, and where the disk shows up in
the guest."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from vmattach.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

# Nova's check of a requested device name (nova/block_device.py).
DEVICE_RE = re.compile(r"^/dev/x?[a-z]?d?[a-z]+[0-9]*$")
MAX_DEVICE_LENGTH = 32


def invalid_device(device: str, why: str = "") -> InvalidArgument:
    return InvalidArgument(f"The supplied device path ({device[:80]}) is invalid.{why}",
                           reason="INVALID_DEVICE")


def device_in_use(device: str) -> FailedPrecondition:
    return FailedPrecondition(f"The supplied device path ({device}) is in use.",
                              reason="DEVICE_IN_USE")


def check_device(device: str) -> None:
    """A requested device name: Nova's grammar, bounded."""
    if not DEVICE_RE.match(device) or len(device) > MAX_DEVICE_LENGTH:
        raise invalid_device(device)


def device_names(prefix: str) -> Iterator[str]:
    """vda, vdb, ... vdz, vdaa, vdab, ... (Nova's get_next_device_name)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for letter in letters:
        yield prefix + letter
    for first in letters:
        for second in letters:
            yield prefix + first + second


def pick_device(requested: str, server, live: list[str]) -> str:
    """The device name of a new attachment on server (a ServerRecord):
    the requested one when it fits the server's bus and is free, otherwise
    the first free name after the root disk's letter. live: the device
    names of the server's live attachments."""
    used = {d.removeprefix("/dev/") for d in live}
    used |= {d["device"] for d in json.loads(server.disks)}
    prefix = server.device_prefix or "vd"
    if requested:
        name = requested.removeprefix("/dev/")
        if not name.startswith(prefix) or not name[len(prefix):].isalpha():
            raise invalid_device(requested, f" The server's disks use /dev/{prefix}*.")
        if name in used:
            raise device_in_use(requested)
        return "/dev/" + name
    used.add(server.root_device or prefix + "a")  # the root disk's letter is never offered
    for name in device_names(prefix):
        if name not in used:
            return "/dev/" + name
    raise ResourceExhausted(f"no free device name on server {server.server_id}",
                            reason="TOO_MANY_VOLUMES")


def guest_path_hint(bus_prefix: str, volume_id: str) -> str:
    """Where the disk appears in the guest, whatever name the guest gives it."""
    if bus_prefix == "vd":
        return f"/dev/disk/by-id/virtio-{volume_id[:20]}"
    if bus_prefix == "sd":
        return f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{volume_id[:36]}"
    return ""
