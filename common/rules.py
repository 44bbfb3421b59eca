"""The rules of vmattach's names, each written once: device names, iSCSI
names (IQN grammar), the per-server volume limit, and how much of an input
an error message or a log line may quote.

The services, the facade and the request checks of common/fields.py all
ask this module; none keeps a copy of a rule."""

from __future__ import annotations

import re
from collections.abc import Iterable

from vmattach.common.errors import InvalidArgument

# -- limits -------------------------------------------------------------------------

# Nova's default: at most 26 volumes on one server (vdb ... vdz beside the root disk).
MAX_VOLUMES_PER_SERVER = 26

# -- names --------------------------------------------------------------------------

# A project (a token's, a volume's, a server's owner): Keystone-like ids and names.
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# -- quoting inputs -------------------------------------------------------------------

QUOTE_LIMIT = 80


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A bounded, printable rendering of a caller's value for an error
    message or a log line: repr() of at most `limit` characters of it, with
    how much was left out. No message or log line carries a whole input."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def prefix(value: object, limit: int = QUOTE_LIMIT, escape: bool = True) -> str:
    """At most `limit` characters of value, unquoted (for a message that
    names a value in Nova's or Cinder's words, e.g. "device path (/dev/x)");
    with escape, non-printable characters escaped (a log line's traceback
    keeps its lines: escape=False)."""
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit]
    if escape and not cut.isprintable():
        cut = cut.encode("unicode_escape").decode("ascii")
    return cut + (f"... ({len(text)} characters)" if len(text) > limit else "")


# -- device names ----------------------------------------------------------------------

# Nova's check of a requested device name (nova/block_device.py), bounded.
DEVICE_RE = re.compile(r"^/dev/x?[a-z]?d?[a-z]+[0-9]*$")
MAX_DEVICE_LENGTH = 32
# The names a hypervisor is handed: a bus prefix and letters only (vdb, sdaa;
# never a partition such as vdb1, which libvirt refuses as a disk target).
DEVICE_LETTERS_RE = re.compile(r"^[a-z]{1,3}$")


def invalid_device(device: str, why: str = "", field: str = "device") -> InvalidArgument:
    return InvalidArgument(f"The supplied device path ({prefix(device)}) is invalid.{why}",
                           reason="INVALID_DEVICE", field=field,
                           metadata={"device": prefix(device)})


def check_device(device: str, field: str = "device") -> str:
    """A requested device name: Nova's grammar, at most MAX_DEVICE_LENGTH
    characters."""
    if len(device) > MAX_DEVICE_LENGTH or not DEVICE_RE.match(device):
        raise invalid_device(device, field=field)
    return device


def device_suffix(name: str, bus_prefix: str) -> str | None:
    """The letters after bus_prefix in a device name without /dev/ ("vdb",
    "vd" -> "b"); None when name is not bus_prefix followed by 1-3 letters."""
    if not name.startswith(bus_prefix):
        return None
    letters = name[len(bus_prefix):]
    return letters if DEVICE_LETTERS_RE.match(letters) else None


def disk_device(device: str, bus_prefixes: Iterable[str], field: str = "device") -> tuple[str, str]:
    """The disk name a hypervisor gets for a requested device: Nova's
    grammar, then one of bus_prefixes followed by letters only. Returns
    (name without /dev/, its bus prefix). The facade hands out only such
    names; the Node accepts only such names."""
    check_device(device, field)
    name = device.removeprefix("/dev/")
    for bus_prefix in bus_prefixes:
        if device_suffix(name, bus_prefix) is not None:
            return name, bus_prefix
    raise invalid_device(device, field=field)


# -- iSCSI names (RFC 3720 section 3.2.6) ----------------------------------------------

MAX_ISCSI_NAME = 223  # bytes, UTF-8
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
# iqn.YYYY-MM.reversed.domain[:anything of the name's alphabet]; the alphabet
# is ASCII lower case, digits, '-', '.', ':' (and non-ASCII characters, below)
_IQN_RE = re.compile(rf"^iqn\.\d{{4}}-(?:0[1-9]|1[0-2])\.{_LABEL}(?:\.{_LABEL})*(?::[a-z0-9.:\-\x80-\U0010ffff]*)?$")
_EUI_RE = re.compile(r"^eui\.[0-9A-Fa-f]{16}$")
_NAA_RE = re.compile(r"^naa\.(?:[0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})$")


def is_iscsi_name(value: str) -> bool:
    """An iSCSI name of RFC 3720: iqn., eui. or naa. form, printable, at
    most 223 bytes."""
    if not value or len(value) > MAX_ISCSI_NAME or not value.isprintable():
        return False
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ISCSI_NAME:
        return False
    return bool(_IQN_RE.match(value) or _EUI_RE.match(value) or _NAA_RE.match(value))


def require_iscsi_name(value: str, field: str) -> str:
    if not is_iscsi_name(value):
        raise InvalidArgument(f"{field} {quote(value)} is not an iSCSI name (RFC 3720: iqn., eui."
                              f" or naa. form, printable, at most {MAX_ISCSI_NAME} bytes)",
                              reason="INVALID_ISCSI_NAME", field=field)
    return value


# A volume id (36 characters) follows the prefix in a target's name.
VOLUME_ID_LENGTH = 36
MAX_IQN_PREFIX = MAX_ISCSI_NAME - VOLUME_ID_LENGTH


def check_iqn_prefix(value: str, field: str = "iqn_prefix") -> str:
    """A prefix of target names: prefix + a volume id is an iqn. name."""
    sample = value + "0" * VOLUME_ID_LENGTH
    if not value.startswith("iqn.") or not is_iscsi_name(sample):
        raise InvalidArgument(f"{field} {quote(value)} is not an iqn. name prefix of at most"
                              f" {MAX_IQN_PREFIX} characters", reason="INVALID_SETTING", field=field)
    return value
