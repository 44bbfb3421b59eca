"""Checks of request fields shared by the services."""

from __future__ import annotations

import uuid

from vmattach.common.errors import InvalidArgument


def require_uuid(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(f"{field} {value[:80]!r} is not a UUID") from None
    return str(parsed)


def page_size(value: int, default: int = 100, maximum: int = 1000) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(value or default, maximum)
