"""The one page-token scheme of every List RPC.

A token is opaque to callers: "p1." and the URL-safe base64 (no padding) of
a JSON list [list name, key, ...], where the keys are the sort key of the
last row of the page. decode() checks everything (length, alphabet, the
list it belongs to, the type and range of every key) and answers
INVALID_ARGUMENT naming page_token for anything else, so that no token
reaches a query with a value the database would refuse."""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import uuid
from collections.abc import Callable

from vmattach.common.errors import InvalidArgument

VERSION = "p1."
MAX_TOKEN = 256
_ALPHABET = re.compile(r"^p1\.[A-Za-z0-9_-]+$")
INT64_MAX = (1 << 63) - 1
FIELD = "page_token"


def _bad(why: str) -> InvalidArgument:
    return InvalidArgument(f"page_token is not valid ({why}); pass the next_page_token of the"
                           " previous page, or nothing for the first page",
                           reason="INVALID_PAGE_TOKEN", field=FIELD)


def row_id(value: object) -> int:
    """A key that is a row id: an integer between 0 and 2^63 - 1."""
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise _bad("a row id out of range")
    return value


def uuid_key(value: object) -> str:
    """A key that is a UUID, in its canonical form."""
    if not isinstance(value, str) or len(value) != 36:
        raise _bad("not a UUID")
    try:
        parsed = str(uuid.UUID(value))
    except ValueError:
        raise _bad("not a UUID") from None
    if parsed != value.lower():
        raise _bad("not a UUID")
    return value


def timestamp(value: object) -> datetime.datetime:
    """A key that is a time (ISO 8601, as encode() wrote it)."""
    if not isinstance(value, str) or len(value) > 40:
        raise _bad("not a time")
    try:
        return datetime.datetime.fromisoformat(value)
    except ValueError:
        raise _bad("not a time") from None


def encode(kind: str, *keys: int | str | datetime.datetime) -> str:
    """The token after a page whose last row has these sort keys."""
    values = [k.isoformat() if isinstance(k, datetime.datetime) else k for k in keys]
    raw = json.dumps([kind, *values], separators=(",", ":")).encode()
    return VERSION + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, kind: str, *key_types: Callable[[object], object]) -> tuple:
    """The sort keys of a token encode(kind, ...) made, each checked by its
    key type (row_id, uuid_key, timestamp); InvalidArgument for anything
    else."""
    if len(token) > MAX_TOKEN or not _ALPHABET.match(token):
        raise _bad("not a token of this service")
    body = token[len(VERSION):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        values = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise _bad("not a token of this service") from None
    if not isinstance(values, list) or not values or values[0] != kind:
        raise _bad(f"not a token of this list ({kind})")
    if len(values) != 1 + len(key_types):
        raise _bad("wrong number of keys")
    return tuple(check(value) for check, value in zip(key_types, values[1:], strict=True))
