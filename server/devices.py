"""Device names as the facade hands them out: Nova's check of a requested
name, Nova's order for the next free one, and where the disk shows up in
the guest."""

from __future__ import annotations

import json
from collections.abc import Iterator

from vmattach.common.errors import FailedPrecondition, ResourceExhausted
from vmattach.common.rules import check_device, device_suffix, invalid_device, prefix

__all__ = ["check_device", "device_in_use", "device_names", "guest_path_hint", "pick_device"]


def device_in_use(device: str) -> FailedPrecondition:
    return FailedPrecondition(f"The supplied device path ({prefix(device)}) is in use.",
                              reason="DEVICE_IN_USE")


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
    bus_prefix = server.device_prefix or "vd"
    if requested:
        check_device(requested)
        name = requested.removeprefix("/dev/")
        if device_suffix(name, bus_prefix) is None:
            raise invalid_device(requested, f" The server's disks use /dev/{bus_prefix}*.")
        if name in used:
            raise device_in_use(requested)
        return "/dev/" + name
    used.add(server.root_device or bus_prefix + "a")  # the root disk's letter is never offered
    for name in device_names(bus_prefix):
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
