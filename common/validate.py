"""Checks of request fields shared by the services."""

from __future__ import annotations

import uuid

from vmattach.common import fields
from vmattach.common.errors import InvalidArgument
from vmattach.common.rules import quote


def require_uuid(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(f"{field} {quote(value)} is not a UUID", field=field) from None
    return str(parsed)


def page_size(value: int, default: int = 100, maximum: int = 1000) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(value or default, maximum)


MODES = ("rw", "ro")
# 1 PiB: above any max_volume_gb; the services check their own limit
MAX_SIZE_GB = fields.MAX_SIZE_GB


def require_mode(value: str, field: str = "mode") -> str:
    """An attach mode: "rw" (the default, for an empty value) or "ro"."""
    if not value:
        return "rw"
    if value not in MODES:
        raise InvalidArgument(f"{field} {quote(value, 20)} must be 'rw' or 'ro'", reason="INVALID_MODE",
                              field=field)
    return value


def require_size_gb(value: int, field: str = "size_gb") -> int:
    """A size in GiB between 1 and MAX_SIZE_GB (the service's own maximum is
    checked where it is known)."""
    if not 1 <= value <= MAX_SIZE_GB:
        raise InvalidArgument(f"{field} must be between 1 and {MAX_SIZE_GB}", reason="INVALID_SIZE",
                              field=field)
    return value
